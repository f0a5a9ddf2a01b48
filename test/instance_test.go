package test

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/test/nstest"
)

// loop is a client that sends requests through egressd one after another,
// each on a new connection (so from a fresh address), until stopped, and
// counts what went wrong.
type loop struct {
	stop chan struct{}
	done chan struct{}

	mu       sync.Mutex
	requests int
	failures []string
}

// startLoop starts a loop client in H through the proxy at addr. A pause
// between requests keeps the router's neighbour table, which all
// namespaces share, far from its limit.
func startLoop(t *testing.T, e *env, addr string) *loop {
	t.Helper()
	l := &loop{stop: make(chan struct{}), done: make(chan struct{})}
	c := e.tp.Host.NewClient(t, addr, e.up.RootCAs, false)
	ctx := guardCtx(t)
	go func() {
		defer close(l.done)
		for {
			select {
			case <-l.stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			code, body, err := c.Fetch(ctx, e.up.HTTPURL)
			l.mu.Lock()
			l.requests++
			if err != nil || code != http.StatusOK {
				l.failures = append(l.failures, fmt.Sprintf("status %d, %v: %s", code, err, strings.TrimSpace(body)))
			}
			l.mu.Unlock()
		}
	}()
	t.Cleanup(func() { l.end() })
	return l
}

// waitFor waits until the loop has sent n more requests than it had.
func (l *loop) waitFor(t *testing.T, n int) {
	t.Helper()
	l.mu.Lock()
	target := l.requests + n
	l.mu.Unlock()
	nstest.WaitFor(t, fmt.Sprintf("%d more requests of the loop", n), func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.requests >= target
	})
}

// end stops the loop and returns how many requests it sent and what failed.
func (l *loop) end() (int, []string) {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.requests, l.failures
}

// download is a plain-HTTP download through egressd that the upstream holds
// open, half sent, until release.
type download struct {
	release chan struct{}
	result  chan error
}

const downloadHalf = 64 << 10

// startDownload starts a download through the proxy at addr and returns once
// the upstream sent its first half.
func startDownload(t *testing.T, e *env, addr string) *download {
	t.Helper()
	d := &download{release: make(chan struct{}), result: make(chan error, 1)}
	arrived := make(chan struct{})
	e.up.Handle("/download", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(2*downloadHalf))
		w.Write(make([]byte, downloadHalf))
		w.(http.Flusher).Flush()
		close(arrived)
		<-d.release
		w.Write(make([]byte, downloadHalf))
	}))
	c := e.tp.Host.NewClient(t, addr, e.up.RootCAs, false)
	ctx := guardCtx(t)
	go func() {
		code, body, err := c.Fetch(ctx, e.up.HTTPURL+"download")
		switch {
		case err != nil:
			d.result <- err
		case code != http.StatusOK || len(body) != 2*downloadHalf:
			d.result <- fmt.Errorf("status %d, %d bytes", code, len(body))
		default:
			d.result <- nil
		}
	}()
	select {
	case <-arrived:
	case err := <-d.result:
		t.Fatalf("download ended before the upstream sent half: %v", err)
	case <-time.After(nstest.Guard):
		t.Fatal("download did not start")
	}
	t.Cleanup(d.finish)
	return d
}

// finish lets the upstream send the rest.
func (d *download) finish() {
	select {
	case <-d.release:
	default:
		close(d.release)
	}
}

// prefixAddrs lists the addresses in prefix on H's veth, but H's own.
func prefixAddrs(t *testing.T, tp *nstest.Topo, prefix netip.Prefix) []netip.Addr {
	t.Helper()
	var out []netip.Addr
	for _, a := range hostAddrs(t, tp) {
		if ip := nstest.AddrOf(a); prefix.Contains(ip) && ip != nstest.HostAddr {
			out = append(out, ip)
		}
	}
	return out
}

// lockFiles lists the lock files egressd keeps in the topology's runtime
// directory.
func lockFiles(t *testing.T, tp *nstest.Topo) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(tp.RuntimeDir, "netns-*", "*.lock"))
	require.NoError(t, err)
	return files
}

// requireRefused waits for a second egressd to exit 1 and checks its one line:
// it names the first's pid, the interface, the first's prefix and its lock
// file.
func requireRefused(t *testing.T, tp *nstest.Topo, second, first *nstest.Process, prefix netip.Prefix) string {
	t.Helper()
	require.Equal(t, 1, second.Wait(t), "exit status of the second egressd")
	lines := slices.Collect(strings.Lines(second.Stderr()))
	require.Len(t, lines, 1, "one line on stderr:\n%s", second.Stderr())
	files := lockFiles(t, tp)
	require.Len(t, files, 1, "the first's lock file, and only it")
	for _, want := range []string{
		fmt.Sprintf("another egressd (pid %d) already serves %s on %s", first.Pid, prefix, tp.HostLink),
		"lock file " + files[0],
	} {
		assert.Contains(t, lines[0], want)
	}
	data, err := os.ReadFile(files[0])
	require.NoError(t, err)
	assert.Equal(t, strconv.Itoa(first.Pid)+"\n", string(data), "the lock file holds the first's pid")
	return lines[0]
}

// TestSecondInstanceOnLink: while an egressd serves a loop of requests and a
// download, a second egressd for the same interface and prefix, on another
// port or on the same, exits 1 naming the first, before it touches anything:
// the first's ready and busy addresses stay, its clients see no error.
func TestSecondInstanceOnLink(t *testing.T) {
	nstest.RequireRoot(t)
	t.Parallel()
	for _, tt := range []struct {
		name   string
		listen string
	}{
		{"another port", "127.0.0.1:3129"},
		{"same port", proxyAddr},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := start(t)
			first := e.ed
			clients := startLoop(t, e, proxyAddr)
			clients.waitFor(t, 10)
			dl := startDownload(t, e, proxyAddr)

			// The first's addresses now: ready ones (the pool keeps 8), the
			// download's, the loop's. Leftover cleanup would take them all.
			nstest.WaitFor(t, "the first's ready addresses", func() bool { return len(prefixAddrs(t, e.tp, nstest.Prefix)) >= 8 })
			had := prefixAddrs(t, e.tp, nstest.Prefix)

			second := e.tp.StartEgressd(t, e.bin, "-listen", tt.listen, "-interface", e.tp.HostLink,
				"-prefix", nstest.Prefix.String(), "-log-level", "debug")
			line := requireRefused(t, e.tp, second, first, nstest.Prefix)
			assert.NotContains(t, line, "listening on", "refused by the lock, before any listener")

			// Every address the first had is still there, unless the first
			// used it since (addresses are never reused: it removed it
			// after its request, which is in its access log).
			now := prefixAddrs(t, e.tp, nstest.Prefix)
			var used []netip.Addr
			for _, rec := range first.Log("request") {
				if a, err := netip.ParseAddr(rec["egress"]); err == nil {
					used = append(used, a)
				}
			}
			for _, a := range had {
				assert.True(t, slices.Contains(now, a) || slices.Contains(used, a), "%s of the first egressd was removed", a)
			}

			// More requests than the pool had ready: each would get 503 if
			// its ready address had been taken away.
			clients.waitFor(t, 20)
			dl.finish()
			require.NoError(t, <-dl.result, "the download in flight")
			n, failures := clients.end()
			assert.Empty(t, failures, "the first's clients (%d requests)", n)
			assert.False(t, first.Exited())
			assert.Empty(t, first.Log("removed leftover egress addresses of an earlier run"))
		})
	}
}

// TestSecondInstanceRouted: in routed mode a second egressd for the same
// prefix, or one overlapping it, exits 1 naming the first and leaves the
// local route alone; one for a prefix apart from the first's runs beside
// it and, when it stops, removes its own route only. The first serves
// throughout.
func TestSecondInstanceRouted(t *testing.T) {
	t.Parallel()
	e := setup(t)
	routeToHost(t, e.tp)
	firstPrefix := netip.MustParsePrefix("2001:db8:5:5:1::/80")
	routed := func(listen string, prefix netip.Prefix) []string {
		return []string{"-listen", listen, "-interface", e.tp.HostLink, "-mode", "routed", "-prefix", prefix.String(), "-log-level", "debug"}
	}
	first := e.tp.StartEgressd(t, e.bin, routed(proxyAddr, firstPrefix)...)
	first.WaitListening(t, 1)
	e.ed = first
	route := e.tp.Host.Run(t, "ip", "-6", "route", "show", "table", "local", firstPrefix.String())
	require.Contains(t, route, "proto 71", "the first's local route")
	clients := startLoop(t, e, proxyAddr)
	clients.waitFor(t, 5)

	for _, tt := range []struct {
		name   string
		prefix netip.Prefix
		overlp bool
	}{
		{"same prefix", firstPrefix, false},
		{"the /64 around it", routedPrefix, true},
		{"a /96 inside it", netip.MustParsePrefix("2001:db8:5:5:1::/96"), true},
	} {
		second := e.tp.StartEgressd(t, e.bin, routed("127.0.0.1:3129", tt.prefix)...)
		line := requireRefused(t, e.tp, second, first, firstPrefix)
		if tt.overlp {
			assert.Contains(t, line, "which overlaps -prefix "+tt.prefix.String(), tt.name)
		}
		assert.Equal(t, route, e.tp.Host.Run(t, "ip", "-6", "route", "show", "table", "local", firstPrefix.String()), "%s: the first's route", tt.name)
		if tt.overlp {
			assert.Empty(t, strings.TrimSpace(e.tp.Host.Run(t, "ip", "-6", "route", "show", "table", "local", tt.prefix.String())), "%s: a route of the second", tt.name)
		}
		clients.waitFor(t, 3)
	}

	// A prefix apart from the first's: the two run side by side, each with
	// its own route, and the second's stop leaves the first's.
	otherPrefix := netip.MustParsePrefix("2001:db8:5:5:2::/80")
	second := e.tp.StartEgressd(t, e.bin, routed("127.0.0.1:3129", otherPrefix)...)
	second.WaitListening(t, 1)
	code, body, err := e.tp.Host.NewClient(t, "127.0.0.1:3129", e.up.RootCAs, false).Fetch(guardCtx(t), e.up.HTTPURL)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, code)
	assert.True(t, otherPrefix.Contains(netip.MustParseAddr(strings.TrimSpace(body))), body)
	assert.Len(t, lockFiles(t, e.tp), 2)
	require.NoError(t, second.Signal(syscall.SIGTERM))
	require.Equal(t, 0, second.Wait(t))
	assert.Empty(t, strings.TrimSpace(e.tp.Host.Run(t, "ip", "-6", "route", "show", "table", "local", otherPrefix.String())), "the second removed its own route")
	assert.Equal(t, route, e.tp.Host.Run(t, "ip", "-6", "route", "show", "table", "local", firstPrefix.String()), "the first's route")
	assert.Len(t, lockFiles(t, e.tp), 1, "the second removed its lock file")

	clients.waitFor(t, 10)
	n, failures := clients.end()
	assert.Empty(t, failures, "the first's clients (%d requests)", n)
	for _, p := range e.up.Peers() {
		assert.True(t, firstPrefix.Contains(p) || otherPrefix.Contains(p), "%s", p)
	}
}

// TestRoutedKeepsRouteWhileOverlapHeld: the second guard. If another egressd
// holds a lock on an overlapping prefix when egressd stops (one that got past
// the start-up check somehow: here the test holds such a lock itself),
// egressd leaves the local route in place and says so.
func TestRoutedKeepsRouteWhileOverlapHeld(t *testing.T) {
	t.Parallel()
	e := setup(t)
	routeToHost(t, e.tp)
	ed := e.tp.StartEgressd(t, e.bin, "-listen", proxyAddr, "-interface", e.tp.HostLink, "-mode", "routed", "-prefix", routedPrefix.String())
	ed.WaitListening(t, 1)
	require.Contains(t, localRoutes(t, e.tp), "proto 71")
	files := lockFiles(t, e.tp)
	require.Len(t, files, 1)

	other := filepath.Join(filepath.Dir(files[0]), "other0_2001:db8:5:5:7::_80.lock")
	f, err := os.OpenFile(other, os.O_RDWR|os.O_CREATE, 0o644)
	require.NoError(t, err)
	defer f.Close()
	require.NoError(t, unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB))
	_, err = fmt.Fprintf(f, "%d\n", os.Getpid())
	require.NoError(t, err)

	require.NoError(t, ed.Signal(syscall.SIGTERM))
	assert.Equal(t, 0, ed.Wait(t))
	assert.Contains(t, localRoutes(t, e.tp), "proto 71", "the route stays while another egressd holds an overlapping prefix")
	recs := ed.Log("leaving the local route in place")
	require.Len(t, recs, 1, "%s", ed.Stderr())
	assert.Contains(t, recs[0]["reason"], fmt.Sprintf("pid %d", os.Getpid()))
	assert.Contains(t, recs[0]["reason"], other)
}

// TestPortTakenChangesNothing: an egressd whose listener cannot be had exits
// 1 naming it, before it touches the interface: a leftover address that it
// would have removed is still there, and in routed mode no local route was
// installed. Its lock is gone with it.
func TestPortTakenChangesNothing(t *testing.T) {
	nstest.RequireRoot(t)
	t.Parallel()
	for _, tt := range []struct {
		name   string
		prefix netip.Prefix
		args   []string
		taken  string // an address that something else listens on
		unix   bool   // taken is a unix socket path (the admin socket)
		names  string
	}{
		{name: "on-link listen", prefix: nstest.Prefix, args: []string{"-listen", proxyAddr}, taken: proxyAddr, names: "listening on " + proxyAddr},
		{name: "routed listen", prefix: routedPrefix, args: []string{"-listen", proxyAddr, "-mode", "routed"}, taken: proxyAddr, names: "listening on " + proxyAddr},
		{name: "routed socks5", prefix: routedPrefix, args: []string{"-mode", "routed", "-socks5", "127.0.0.1:1080"}, taken: "127.0.0.1:1080", names: "127.0.0.1:1080 (socks5)"},
		{name: "admin socket", prefix: nstest.Prefix, args: nil, unix: true, names: "is in use"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := setup(t)
			routeToHost(t, e.tp)
			leftover := tt.prefix.Addr().Next().Next().Next() // ::3, neither H's nor R's
			e.tp.Host.Run(t, "ip", "addr", "add", leftover.String()+"/128", "dev", e.tp.HostLink,
				"nodad", "noprefixroute", "preferred_lft", "0", "valid_lft", "600")
			// The kernel inserts the address's local route from a work
			// queue, a moment after the add returns: the "before" is taken
			// once it is there.
			nstest.WaitFor(t, "the leftover's local route", func() bool {
				return strings.Contains(e.tp.Host.Run(t, "ip", "-6", "route", "show", "table", "local"), "local "+leftover.String()+" ")
			})
			args := append([]string{"-interface", e.tp.HostLink, "-prefix", tt.prefix.String()}, tt.args...)
			if tt.unix {
				admin := filepath.Join(t.TempDir(), "admin.sock")
				ln, err := e.tp.Host.Listen("unix", admin)
				require.NoError(t, err)
				t.Cleanup(func() { ln.Close() })
				args = append(args, "-admin", admin)
			} else {
				ln, err := e.tp.Host.Listen("tcp", tt.taken)
				require.NoError(t, err)
				t.Cleanup(func() { ln.Close() })
			}
			addrsBefore := addrStrings(hostAddrs(t, e.tp))
			routesBefore := e.tp.Host.Run(t, "ip", "-6", "route", "show", "table", "all")

			p := e.tp.StartEgressd(t, e.bin, args...)
			assert.Equal(t, 1, p.Wait(t), "exit status")
			lines := slices.Collect(strings.Lines(p.Stderr()))
			if assert.Len(t, lines, 1, "one line on stderr:\n%s", p.Stderr()) {
				assert.Contains(t, lines[0], tt.names)
			}
			assert.Equal(t, addrsBefore, addrStrings(hostAddrs(t, e.tp)), "addresses of %s", e.tp.HostLink)
			assert.Contains(t, addrsBefore, leftover.String()+"/128")
			assert.Equal(t, routesBefore, e.tp.Host.Run(t, "ip", "-6", "route", "show", "table", "all"), "routes")
			assert.Empty(t, lockFiles(t, e.tp), "the lock file went with it")
		})
	}
}

// TestCommandLine: a stray argument is an error naming it, and stops egressd
// before it does anything; -version prints one line and exits 0; -h opens
// with what egressd is. egressctl has -version too.
func TestCommandLine(t *testing.T) {
	t.Parallel()
	bin := binary(t, "./cmd/egressd")
	ctl := binary(t, "./cmd/egressctl")
	run := func(bin string, args ...string) (stdout, stderr string, code int) {
		ctx, cancel := context.WithTimeout(context.Background(), nstest.Guard)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, args...)
		var out, errOut strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err := cmd.Run()
		if ee, ok := err.(*exec.ExitError); ok {
			return out.String(), errOut.String(), ee.ExitCode()
		}
		require.NoError(t, err)
		return out.String(), errOut.String(), 0
	}

	stdout, stderr, code := run(bin, "-allow", "127.0.0.0/8", "::1/128", "-rotate", "session")
	assert.Equal(t, 1, code)
	assert.Empty(t, stdout)
	assert.Equal(t, "egressd: unexpected argument \"::1/128\": every value needs its flag (-allow A -allow B), and egressd takes no other arguments\n", stderr)

	for _, b := range []struct{ bin, name string }{{bin, "egressd"}, {ctl, "egressctl"}} {
		stdout, stderr, code = run(b.bin, "-version")
		assert.Equal(t, 0, code, b.name)
		assert.Empty(t, stderr, b.name)
		assert.Equal(t, 1, strings.Count(stdout, "\n"), "%s: one line: %q", b.name, stdout)
		assert.True(t, strings.HasPrefix(stdout, b.name+" "), stdout)
		assert.Regexp(t, ` go1\.\d+`, stdout, b.name)
	}

	stdout, stderr, code = run(bin, "-h")
	assert.Equal(t, 0, code)
	assert.Empty(t, stderr)
	first, rest, _ := strings.Cut(stdout, "\n")
	assert.Equal(t, "egressd is a forward proxy (HTTP, CONNECT, SOCKS5) that sends every upstream connection from a fresh IPv6 address of the host's prefix.", first)
	assert.Contains(t, rest, "usage: egressd [flags]")
	assert.Contains(t, rest, "-version")
	assert.Contains(t, rest, "-listen ADDR")
}
