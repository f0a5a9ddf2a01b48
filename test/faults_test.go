package test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/netutil/kernel"
	"github.com/egressd/egressd/proxy"
	"github.com/egressd/egressd/proxy/stats"
	"github.com/egressd/egressd/test/nstest"
)

// ctlAddrs is `egressctl addrs -json` of e's egressd: each egress address
// egressd holds, with its state.
func ctlAddrs(t *testing.T, e *env) map[netip.Addr]string {
	t.Helper()
	out := e.tp.Host.Run(t, binary(t, "./cmd/egressctl"), "-admin", e.ed.Admin, "addrs", "-json")
	var list []stats.Addr
	require.NoError(t, json.Unmarshal([]byte(out), &list), out)
	m := map[netip.Addr]string{}
	for _, a := range list {
		m[netip.MustParseAddr(a.Addr)] = a.State
	}
	return m
}

// curlBody runs curl in ns through the proxy at proxy and returns the HTTP
// status (for a tunnel the proxy refused, its answer to CONNECT) and the
// body. curl fails when a tunnel is refused; the status says why.
func curlBody(t *testing.T, ns *nstest.NS, proxy string, args ...string) (code, body string) {
	t.Helper()
	out, _ := ns.Output("curl", append([]string{"-q", "-sS", "--max-time", "30", "-x", "http://" + proxy,
		"-w", "\n%{http_code} %{http_connect}"}, args...)...)
	i := strings.LastIndexByte(out, '\n')
	if i < 0 {
		t.Fatalf("curl printed no status: %q", out)
	}
	code, connect, _ := strings.Cut(out[i+1:], " ")
	if code == "000" {
		code = connect
	}
	return code, out[:i]
}

// TestUplinkDownUp: while the uplink is down, requests through egressd fail
// at once with 503 instead of each waiting for its dial timeout, and when it
// is up again they succeed, with no restart: first the router's end of the
// link goes down (H loses its carrier, keeps its addresses), then H's own
// end (the kernel flushes its IPv6 addresses, keep_addr_on_down being 0;
// the test puts H's address and route back, as a network manager would).
func TestUplinkDownUp(t *testing.T) {
	t.Parallel()
	e := start(t, "-dial-timeout", "30s")
	pid := e.ed.Pid
	works := func() bool {
		code, _ := curlBody(t, e.tp.Host, proxyAddr, e.up.HTTPURL)
		return code == "200"
	}
	require.True(t, works())
	const downMsg = "uplink is down: new connections fail closed until it is up again"

	refused := func(t *testing.T) {
		t.Helper()
		start := time.Now()
		code, body := curlBody(t, e.tp.Host, proxyAddr, e.up.HTTPURL)
		// A very wide margin: the point is not waiting out -dial-timeout 30s.
		assert.Less(t, time.Since(start), 15*time.Second, "answered before the dial timeout")
		assert.Equal(t, "503", code, body)
		assert.Equal(t, "no fresh egress address available: uplink "+e.tp.HostLink+" is down", strings.TrimSpace(body))
		code, _ = curlBody(t, e.tp.Host, proxyAddr, "--cacert", e.up.CAFile, e.up.HTTPSURL)
		assert.Equal(t, "503", code, "CONNECT")
		// egressd logs before it answers, but its stderr reaches the test
		// through a pipe: the line may come a moment after the answer.
		nstest.WaitFor(t, "the log to say why", func() bool {
			return slices.ContainsFunc(e.ed.Log("upstream failed"), func(rec map[string]string) bool {
				return rec["status"] == "503" && strings.Contains(rec["err"], "uplink "+e.tp.HostLink+" is down")
			})
		})
	}

	t.Run("carrier lost", func(t *testing.T) {
		e.tp.Router.Run(t, "ip", "link", "set", e.tp.RouterLink, "down")
		nstest.WaitFor(t, "egressd to hear the uplink is down", func() bool { return len(e.ed.Log(downMsg)) == 1 })
		refused(t)
		kept := slices.ContainsFunc(hostAddrs(t, e.tp), func(a netlink.Addr) bool { return nstest.AddrOf(a) == nstest.HostAddr })
		t.Logf("H's own IPv6 address kept through the carrier loss: %v", kept)
		e.tp.Router.Run(t, "ip", "link", "set", e.tp.RouterLink, "up")
		// Going down flushed R's IPv6 address too; a router's own
		// configuration puts it back.
		e.tp.Router.Run(t, "ip", "addr", "replace", nstest.RouterAddr.String()+"/64", "dev", e.tp.RouterLink, "nodad")
		nstest.WaitFor(t, "requests to work again", works)
	})

	t.Run("link down", func(t *testing.T) {
		e.tp.Host.Run(t, "ip", "link", "set", e.tp.HostLink, "down")
		nstest.WaitFor(t, "egressd to hear the uplink is down", func() bool { return len(e.ed.Log(downMsg)) == 2 })
		refused(t)
		flushed := !slices.ContainsFunc(hostAddrs(t, e.tp), func(a netlink.Addr) bool { return nstest.AddrOf(a) == nstest.HostAddr })
		t.Logf("H's own IPv6 address flushed by the link going down: %v", flushed)
		e.tp.Host.Run(t, "ip", "link", "set", e.tp.HostLink, "up")
		e.tp.Host.Run(t, "ip", "addr", "replace", nstest.HostAddr.String()+"/64", "dev", e.tp.HostLink, "nodad")
		e.tp.Host.Run(t, "ip", "-6", "route", "replace", "default", "via", nstest.RouterAddr.String(), "dev", e.tp.HostLink)
		nstest.WaitFor(t, "requests to work again", works)
	})

	assert.False(t, e.ed.Exited())
	assert.Equal(t, pid, e.ed.Pid)
	assert.Len(t, e.ed.Log("uplink is up again: handing out egress addresses"), 2)
}

// TestEgressAddrDeletedDuringTunnel: an egress address deleted from outside
// while a CONNECT tunnel uses it ends the tunnel (the kernel alone would
// leave it hanging), egressd no longer lists the address, and the next
// request gets a fresh address and succeeds.
func TestEgressAddrDeletedDuringTunnel(t *testing.T) {
	t.Parallel()
	e := start(t)
	ctx := guardCtx(t)
	conn, resp, err := e.tp.Host.Connect(ctx, proxyAddr, nstest.UpstreamName+":80")
	require.NoError(t, err)
	defer conn.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)

	// A keep-alive request through the tunnel tells its egress address.
	br := bufio.NewReader(conn)
	_, err = fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", nstest.UpstreamName)
	require.NoError(t, err)
	r, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	body, err := io.ReadAll(r.Body)
	require.NoError(t, err)
	r.Body.Close()
	egress := netip.MustParseAddr(strings.TrimSpace(string(body)))
	assert.Equal(t, "in-use", ctlAddrs(t, e)[egress])

	e.tp.Host.Run(t, "ip", "addr", "del", egress.String()+"/128", "dev", e.tp.HostLink)
	require.NoError(t, conn.SetReadDeadline(time.Now().Add(nstest.Guard)))
	_, err = br.ReadByte()
	require.Error(t, err, "the tunnel ends")
	assert.False(t, errors.Is(err, syscall.ETIMEDOUT) || errors.Is(err, context.DeadlineExceeded) || isTimeout(err), "ended, not timed out: %v", err)
	nstest.WaitFor(t, "egressd to forget the address", func() bool {
		_, ok := ctlAddrs(t, e)[egress]
		return !ok
	})
	// The warning comes right after the address is forgotten, not before.
	const warning = "egress address removed by somebody else: forgotten, its connections ended"
	nstest.WaitFor(t, "the warning", func() bool { return len(e.ed.Log(warning)) > 0 })
	recs := e.ed.Log(warning)
	require.Len(t, recs, 1)
	assert.Equal(t, egress.String(), recs[0]["addr"])

	code, next, err := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false).Fetch(ctx, e.up.HTTPURL)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, code)
	assert.NotEqual(t, egress.String(), strings.TrimSpace(next))
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestSessionAddrDeleted: the address a session holds, deleted from
// outside, is given up: its kept-alive upstream connection ends, and the
// session's next request leases a fresh address, which it then keeps.
func TestSessionAddrDeleted(t *testing.T) {
	t.Parallel()
	e := start(t, "-rotate", "session")
	handleConns(e)
	c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, true)
	url := e.up.HTTPURL + "conn"
	first := fetchConn(t, c, url, "build1")
	require.Equal(t, first, fetchConn(t, c, url, "build1"), "one kept-alive upstream connection")

	e.tp.Host.Run(t, "ip", "addr", "del", first.Addr().String()+"/128", "dev", e.tp.HostLink)
	nstest.WaitFor(t, "egressd to forget the address", func() bool {
		_, ok := ctlAddrs(t, e)[first.Addr()]
		return !ok
	})
	next := fetchConn(t, c, url, "build1")
	assert.NotEqual(t, first.Addr(), next.Addr(), "a fresh address")
	assert.True(t, nstest.Prefix.Contains(next.Addr()))
	assert.Equal(t, next, fetchConn(t, c, url, "build1"), "held, on a new kept-alive connection")
}

// TestReadyAddrsDeletedBeforeUse: the ready addresses deleted from outside
// before any request used them cost no request: the next one succeeds from
// another address, and egressd lists none of them.
func TestReadyAddrsDeletedBeforeUse(t *testing.T) {
	t.Parallel()
	e := start(t, "-ready", "4")
	var ready []netip.Addr
	nstest.WaitFor(t, "4 ready addresses", func() bool {
		ready = ready[:0]
		for a, state := range ctlAddrs(t, e) {
			if state == "ready" {
				ready = append(ready, a)
			}
		}
		return len(ready) == 4
	})
	for _, a := range ready {
		e.tp.Host.Run(t, "ip", "addr", "del", a.String()+"/128", "dev", e.tp.HostLink)
	}
	code, body, err := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false).Fetch(guardCtx(t), e.up.HTTPURL)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, code, body)
	from := netip.MustParseAddr(strings.TrimSpace(body))
	assert.NotContains(t, ready, from)
	nstest.WaitFor(t, "egressd to forget the deleted addresses", func() bool {
		held := ctlAddrs(t, e)
		return !slices.ContainsFunc(ready, func(a netip.Addr) bool { _, ok := held[a]; return ok })
	})
}

// TestRoutedLocalRouteRemoved: in routed mode, the local route deleted from
// outside is restored, with one warning naming it, and requests keep
// working.
func TestRoutedLocalRouteRemoved(t *testing.T) {
	t.Parallel()
	e := setup(t)
	routeToHost(t, e.tp)
	ed := e.tp.StartEgressd(t, e.bin, "-listen", proxyAddr, "-interface", e.tp.HostLink, "-mode", "routed", "-prefix", routedPrefix.String())
	ed.WaitListening(t, 1)
	c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
	fetch := func() {
		t.Helper()
		code, body, err := c.Fetch(guardCtx(t), e.up.HTTPURL)
		require.NoError(t, err)
		require.Equal(t, http200, code, body)
		assert.True(t, routedPrefix.Contains(netip.MustParseAddr(strings.TrimSpace(body))))
	}
	fetch()

	for i := 1; i <= 2; i++ {
		e.tp.Host.Run(t, "ip", "-6", "route", "del", "local", routedPrefix.String(), "dev", "lo", "table", "local")
		nstest.WaitFor(t, "the route restored", func() bool { return strings.Contains(localRoutes(t, e.tp), "proto 71") })
		for range 5 {
			fetch()
		}
	}
	recs := ed.Log("local route was removed by somebody else: restored it")
	require.Len(t, recs, 2)
	assert.Equal(t, "local "+routedPrefix.String()+" dev lo table local", recs[0]["route"])

	require.NoError(t, ed.Signal(syscall.SIGTERM))
	assert.Equal(t, 0, ed.Wait(t))
	assert.Empty(t, strings.TrimSpace(localRoutes(t, e.tp)), "egressd removes the route it restored")
}

// failingAdds is an address manager whose adds fail on demand, as netlink's
// do when it refuses (EPERM without CAP_NET_ADMIN, ENOSPC, …).
type failingAdds struct {
	netutil.AddrManager
	mu  sync.Mutex
	err error
}

func (f *failingAdds) Add(a netip.Addr, lifetime time.Duration) error {
	f.mu.Lock()
	err := f.err
	f.mu.Unlock()
	if err != nil {
		return fmt.Errorf("adding %s: %w", a, err)
	}
	return f.AddrManager.Add(a, lifetime)
}

func (f *failingAdds) fail(err error) {
	f.mu.Lock()
	f.err = err
	f.mu.Unlock()
}

// TestAddFailureInjected: netlink refusing adds (EPERM, ENOSPC), injected
// through the address-manager seam of a pool, dialer and proxy built in
// process on H's interface: clients get 503 with the reason while it fails,
// nothing leaves from another source, each failure is counted, one warning
// is logged for each run of failures, and the next request after it stops
// failing succeeds, with no restart.
func TestAddFailureInjected(t *testing.T) {
	leaks := goleak.IgnoreCurrent() // not parallel: no other test runs meanwhile
	t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
	tp := nstest.New(t)
	up := tp.StartUpstream(t)

	h, err := netlink.NewHandleAt(tp.Host.Handle())
	require.NoError(t, err)
	t.Cleanup(h.Close)
	nl, err := kernel.NewNetlink(h, tp.HostLink)
	require.NoError(t, err)
	adds := &failingAdds{AddrManager: nl}
	var logs nstest.SyncBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	logged := func(msg string) int { return strings.Count(logs.String(), msg) }
	pool, err := netutil.NewPool(netutil.PoolConfig{
		Prefix:  nstest.Prefix,
		Exclude: []netip.Addr{nstest.HostAddr, nstest.RouterAddr},
		Manager: adds,
		Ready:   -1, // every request adds its address
		Logger:  log,
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	poolDone := make(chan struct{})
	go func() { defer close(poolDone); pool.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-poolDone
		_, err := pool.Close()
		assert.NoError(t, err)
	})

	d := &netutil.Dialer{Pool: pool, Timeout: 30 * time.Second}
	srv, err := proxy.New(proxy.Config{
		// The upstream sockets must be made in H.
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			err := tp.Host.Do(func() error {
				var err error
				c, err = d.DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
		Logger:      log,
		DialTimeout: 30 * time.Second,
	})
	require.NoError(t, err)
	ln, err := tp.Host.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		sctx, scancel := context.WithTimeout(context.Background(), nstest.Guard)
		defer scancel()
		assert.NoError(t, srv.Shutdown(sctx))
		<-served
	})
	addr := ln.Addr().String()
	// IP literals: the dial's name lookups would run in the test's own
	// namespace, not H's.
	httpURL := "http://[" + nstest.UpstreamAddr.String() + "]/"
	httpsURL := "https://[" + nstest.UpstreamAddr.String() + "]/"

	code, body := curlBody(t, tp.Host, addr, httpURL)
	require.Equal(t, "200", code, body)

	for i, errno := range []unix.Errno{unix.EPERM, unix.ENOSPC} {
		t.Run(errno.Error(), func(t *testing.T) {
			before := pool.Stats()
			peers := len(up.Peers())
			adds.fail(errno)
			for range 3 {
				code, body := curlBody(t, tp.Host, addr, httpURL)
				assert.Equal(t, "503", code)
				assert.Equal(t, "no fresh egress address available", strings.TrimSpace(body))
			}
			code, _ := curlBody(t, tp.Host, addr, "--cacert", up.CAFile, httpsURL)
			assert.Equal(t, "503", code, "CONNECT")
			assert.Len(t, up.Peers(), peers, "nothing reached the upstream")
			s := pool.Stats()
			assert.Equal(t, before.AddFailures+4, s.AddFailures, "every failure counted")
			assert.Equal(t, before.Added, s.Added)
			assert.Equal(t, i+1, logged("adding egress addresses fails"), "one warning for the run of failures")

			adds.fail(nil)
			code, body = curlBody(t, tp.Host, addr, httpURL)
			require.Equal(t, "200", code, body)
			from := netip.MustParseAddr(strings.TrimSpace(body))
			assert.True(t, nstest.Prefix.Contains(from) && from != nstest.HostAddr, "from a fresh address: %s", from)
			assert.Equal(t, i+1, logged("adding egress addresses works again"))
		})
	}
}
