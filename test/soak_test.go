package test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/proxy"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy/stats"
	"github.com/egressd/egressd/test/nstest"
)

// soakFor is how long TestSoak loads egressd: a minute in CI, ten with
// make soak (go test -run TestSoak ./test/ -args -soak 10m).
var soakFor = flag.Duration("soak", time.Minute, "how long TestSoak runs its load")

// Soak settings: 64 clients, each making one request a second, a third of
// them plain HTTP over keep-alive, a third HTTPS through a new CONNECT
// tunnel, a third HTTP through a new SOCKS5 connection; every request
// leaves from an address of its own, on-link with the default neighbour
// budget: never-used addresses at first (each one added to the interface),
// then warm ones reused past the budget, which are removed once unused for
// the window after the load stops.
const (
	soakClients  = 64
	soakInterval = time.Second
	soakSample   = 10 * time.Second
)

// soakSampleOf is what TestSoak records of egressd every soakSample.
type soakSampleOf struct {
	at                  time.Duration
	rssKiB, goroutines  int
	fds, live, requests int
}

// TestSoak: 64 clients of mixed HTTP, CONNECT and SOCKS5 with per-request
// rotation for -soak (a minute by default), printing egressd's RSS,
// goroutines, open file descriptors and live egress addresses every 10 s.
// No request may fail, and the live addresses stay within the neighbour
// budget's cap. Once the load stops and the addresses in use have gone,
// goroutines and descriptors are back where they were after the warm-up;
// once the neighbour window has passed, no warm address is left and the live
// addresses are only the ready ones; RSS stays within
// a wide bound of its post-warm-up value; after SIGTERM every address
// egressd added is gone.
func TestSoak(t *testing.T) {
	t.Parallel()
	heavyOnLink.Lock()
	defer heavyOnLink.Unlock()
	e := setup(t)
	before := hostAddrs(t, e.tp)
	e.ed = e.restart(t, "-socks5", socksAddr, "-log-level", "info")
	admin := adminClient(e.ed.Admin)

	sample := func(at time.Duration) soakSampleOf {
		s := soakSampleOf{at: at, rssKiB: rssKiB(t, e.ed.Pid), goroutines: goroutines(t, admin), fds: openFDs(t, e.ed.Pid)}
		st := adminStats(t, admin)
		s.live, s.requests = st.Addresses.Live, int(st.Totals.Requests)
		return s
	}
	logSample := func(s soakSampleOf) {
		t.Logf("%6s  rss %6d KiB  goroutines %4d  fds %4d  live addrs %4d  requests %7d",
			s.at.Round(time.Second), s.rssKiB, s.goroutines, s.fds, s.live, s.requests)
	}

	// The idle baseline, once the ready addresses are there.
	nstest.WaitFor(t, "the ready addresses", func() bool { return adminStats(t, admin).Addresses.Ready == netutil.DefaultReady })
	base := sample(0)
	logSample(base)

	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	var clients []*http.Client
	for i := range soakClients {
		c, do := soakClient(t, e, i%3)
		clients = append(clients, c)
		wg.Go(func() {
			tick := time.NewTicker(soakInterval)
			defer tick.Stop()
			for ctx.Err() == nil {
				if err := do(ctx); err != nil && ctx.Err() == nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				} else if err == nil {
					ok.Add(1)
				}
				select {
				case <-ctx.Done():
				case <-tick.C:
				}
			}
		})
	}

	// Warm-up: one sample period, then the baseline.
	start := time.Now()
	time.Sleep(soakSample)
	warm := sample(time.Since(start))
	logSample(warm)
	samples := []soakSampleOf{warm}
	for time.Since(start) < *soakFor {
		time.Sleep(min(soakSample, *soakFor-time.Since(start)+time.Millisecond))
		s := sample(time.Since(start))
		logSample(s)
		samples = append(samples, s)
	}
	stop()
	wg.Wait()
	t.Logf("%d requests, %d failed", ok.Load(), failed.Load())
	require.Zero(t, failed.Load(), "failed requests; the first: %v", firstErr.Load())
	require.Positive(t, ok.Load())

	// Idle again: nothing in use.
	nstest.WaitFor(t, "egress addresses to be given back", func() bool { return adminStats(t, admin).Addresses.InUse == 0 })
	for _, c := range clients {
		c.CloseIdleConnections() // the keep-alive clients' connections to egressd
	}
	// Back to the idle baseline: a few goroutines of slack for timers that
	// come and go (the pool's, the session janitor's), none for descriptors.
	var idle soakSampleOf
	nstest.WaitFor(t, "goroutines and descriptors to return to their idle baseline", func() bool {
		idle = sample(time.Since(start))
		return idle.goroutines <= base.goroutines+4 && idle.fds <= base.fds
	})
	logSample(idle)
	// The warm addresses go once unused for the window.
	window := netutil.DefaultBudget.Window
	deadline := time.Now().Add(window + nstest.Guard)
	for a := adminStats(t, admin).Addresses; a.Warm > 0 || a.Live > netutil.DefaultReady; a = adminStats(t, admin).Addresses {
		require.True(t, time.Now().Before(deadline), "warm addresses left %v after the load: %+v", window+nstest.Guard, a)
		time.Sleep(time.Second)
	}
	logSample(sample(time.Since(start)))
	// Flat under load: RSS never far above the warm-up's, goroutines and
	// descriptors never above what the clients' requests in flight can
	// hold at once (a few each: the client's connection, the upstream's,
	// a tunnel's two relay goroutines). A sample catches a moment when any
	// number of the 64 may be in flight, so the warm-up's own count is no
	// bound; a leak shows as the idle baseline not coming back, above.
	const perClient = 6
	for _, s := range samples {
		assert.Less(t, s.rssKiB, 2*warm.rssKiB+32<<10, "RSS at %v", s.at)
		assert.Less(t, s.goroutines, base.goroutines+perClient*soakClients, "goroutines at %v", s.at)
		assert.Less(t, s.fds, base.fds+perClient*soakClients, "descriptors at %v", s.at)
		assert.LessOrEqual(t, s.live, netutil.DefaultBudget.Cap()+netutil.DefaultReady+soakClients, "live addresses at %v", s.at)
	}

	require.NoError(t, e.ed.Signal(syscall.SIGTERM))
	require.Zero(t, e.ed.Wait(t))
	assert.Equal(t, addrStrings(before), addrStrings(hostAddrs(t, e.tp)), "every address egressd added is gone")
}

// soakClient returns one soak client's request: kind 0 is plain HTTP over a
// keep-alive client, 1 HTTPS through a new tunnel each time, 2 plain HTTP
// through a new SOCKS5 connection each time. Each checks the answer came
// from an address of the egress prefix.
func soakClient(t *testing.T, e *env, kind int) (*http.Client, func(context.Context) error) {
	var c *http.Client
	target := e.up.HTTPURL
	switch kind {
	case 0:
		c = e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, true).Client
	case 1:
		c = e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false).Client
		target = e.up.HTTPSURL
	default:
		d, err := proxy.FromURL(&url.URL{Scheme: "socks5h", Host: socksAddr}, nsDialer{e.tp.Host})
		require.NoError(t, err)
		tr := &http.Transport{
			DialContext:       d.(proxy.ContextDialer).DialContext,
			TLSClientConfig:   &tls.Config{RootCAs: e.up.RootCAs},
			DisableKeepAlives: true,
		}
		t.Cleanup(tr.CloseIdleConnections)
		c = &http.Client{Transport: tr, Timeout: nstest.Guard}
	}
	return c, func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
		if err != nil {
			return err
		}
		resp, err := c.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: status %d: %s", target, resp.StatusCode, body)
		}
		if a := strings.TrimSpace(string(body)); !strings.HasPrefix(a, "2001:db8:1:2:") {
			return fmt.Errorf("%s: answered from %q", target, a)
		}
		return nil
	}
}

// adminClient is an HTTP client of egressd's admin socket.
func adminClient(sock string) *http.Client {
	return &http.Client{
		Timeout: nstest.Guard,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}},
	}
}

// adminFetch GETs path from the admin API with c.
func adminFetch(t *testing.T, c *http.Client, path string) []byte {
	t.Helper()
	resp, err := c.Get("http://egressd" + path)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s: %s", path, b)
	return b
}

func adminStats(t *testing.T, c *http.Client) stats.Stats {
	t.Helper()
	var s stats.Stats
	require.NoError(t, json.Unmarshal(adminFetch(t, c, "/stats"), &s))
	return s
}

// goroutines reads the count from the admin API's goroutine profile.
func goroutines(t *testing.T, c *http.Client) int {
	t.Helper()
	first, _, _ := strings.Cut(string(adminFetch(t, c, "/debug/pprof/goroutine?debug=1")), "\n")
	n, err := strconv.Atoi(strings.TrimPrefix(first, "goroutine profile: total "))
	require.NoError(t, err, "%q", first)
	return n
}

// rssKiB reads VmRSS of a process.
func rssKiB(t *testing.T, pid int) int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			require.NoError(t, err)
			return n
		}
	}
	t.Fatalf("no VmRSS for pid %d", pid)
	return 0
}

// openFDs counts a process's open file descriptors.
func openFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "fd"))
	require.NoError(t, err)
	return len(ents)
}
