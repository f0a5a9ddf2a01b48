package test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/test/nstest"
)

// The tests of issue 12: on-link mode against a router with the kernel's
// default neighbour settings, and routed mode without a cap on open
// tunnels.

// heavyOnLink keeps the heaviest on-link loads of this package (TestSoak,
// TestOnLinkNeighbourBudget, BenchmarkNewConnections) from running at once:
// the kernel's neighbour table is one for every namespace of the machine,
// and two of them at their peaks would fill most of it.
var heavyOnLink sync.Mutex

// hostService is a TCP service on H's own address, port 8080, that answers
// every connection with "ok\n": one of the host's own services, which the
// router must still reach.
func hostService(t *testing.T, tp *nstest.Topo) string {
	t.Helper()
	addr := net.JoinHostPort(nstest.HostAddr.String(), "8080")
	ln, err := tp.Host.Listen("tcp", addr)
	require.NoError(t, err)
	serveTCP(t, ln, func(c net.Conn) {
		io.WriteString(c, "ok\n")
		c.Close()
	})
	return addr
}

// probeHostService asks H's service from R every second until stop is
// called, which returns how many probes were made and the failures.
func probeHostService(tp *nstest.Topo, addr string) (stop func() (int, []error)) {
	done := make(chan struct{})
	type result struct {
		n    int
		errs []error
	}
	out := make(chan result, 1)
	probe := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := tp.Router.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err == nil && line != "ok\n" {
			err = errors.New("answered " + strconv.Quote(line))
		}
		return err
	}
	go func() {
		var r result
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			if err := probe(); err != nil {
				r.errs = append(r.errs, err)
			}
			r.n++
			select {
			case <-done:
				out <- r
				return
			case <-tick.C:
			}
		}
	}()
	return func() (int, []error) {
		close(done)
		r := <-out
		return r.n, r.errs
	}
}

// minReuseDistance is the fewest answers between two of the same address
// in peers, in the order the upstream saw them (len(peers) if none
// repeats).
func minReuseDistance(peers []netip.Addr) int {
	last := map[netip.Addr]int{}
	d := len(peers)
	for i, p := range peers {
		if j, ok := last[p]; ok {
			d = min(d, i-j)
		}
		last[p] = i
	}
	return d
}

// TestOnLinkNeighbourBudget: 16 clients open a new HTTPS tunnel per request
// for 20 s through egressd on-link with default flags, against a router
// with the kernel's default neighbour settings. No request fails; the
// router's entries for the prefix, sampled every second, never go above
// 512; the upstream never sees an address twice within 64 consecutive
// answers; the host's own service address answers the router throughout;
// and egressd handed out no more never-used addresses than the budget
// allows (96 + 5 a second since it started), reusing warm ones past it.
func TestOnLinkNeighbourBudget(t *testing.T) {
	t.Parallel()
	heavyOnLink.Lock()
	defer heavyOnLink.Unlock()
	const (
		clients  = 16
		loadFor  = 20 * time.Second
		maxNeigh = 512
		spread   = 64
	)
	e := setup(t)
	svc := hostService(t, e.tp)
	started := time.Now()
	e.restart(t)
	stopNeigh := e.tp.WatchNeighbours(nstest.Prefix, time.Second)
	stopProbe := probeHostService(e.tp, svc)

	var ok atomic.Int64
	var mu sync.Mutex
	var errs []error
	end := time.Now().Add(loadFor)
	var wg sync.WaitGroup
	for range clients {
		c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
		wg.Go(func() {
			for time.Now().Before(end) {
				code, body, err := c.Fetch(guardCtx(t), e.up.HTTPSURL)
				if err == nil && code != http.StatusOK {
					err = errors.New(strconv.Itoa(code) + ": " + body)
				}
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					continue
				}
				ok.Add(1)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(started)
	probes, probeErrs := stopProbe()
	neigh := stopNeigh()
	s := ctlStats(t, e)
	peers := e.up.Peers()
	a := s.Addresses
	t.Logf("%d tunnels in %v (%.0f/s), %d errors; router entries for the prefix: peak %d of samples %v; "+
		"fresh %d, reused %d, warm %d, live %d; fewest answers between two uses of one address: %d; host service: %d probes, %d failed",
		ok.Load(), loadFor, float64(ok.Load())/loadFor.Seconds(), len(errs), slices.Max(neigh), neigh,
		a.Fresh, a.Reused, a.Warm, a.Live, minReuseDistance(peers), probes, len(probeErrs))

	require.Empty(t, errs, "client errors")
	require.Positive(t, ok.Load())
	assert.NotContains(t, neigh, -1, "every sample of the router's table worked")
	assert.LessOrEqual(t, slices.Max(neigh), maxNeigh, "router's neighbour entries for the prefix")
	assert.Len(t, peers, int(ok.Load()), "the upstream saw every request")
	assert.GreaterOrEqual(t, minReuseDistance(peers), spread, "an address seen twice within %d answers", spread)
	assert.Empty(t, probeErrs, "the host's own service, asked from the router")
	assert.GreaterOrEqual(t, probes, int(loadFor/time.Second)-2)

	b := netutil.DefaultBudget
	assert.LessOrEqual(t, float64(a.Fresh), float64(b.Burst)+b.Rate*elapsed.Seconds()+1, "never-used addresses beyond the budget")
	assert.Positive(t, a.Reused, "past the budget, warm addresses")
	assert.Equal(t, uint64(ok.Load()), a.Fresh+a.Reused, "one address per tunnel")
	assert.LessOrEqual(t, a.Warm+a.InUse, b.Cap(), "distinct addresses within the window")
	require.NotNil(t, a.Budget)
	assert.Equal(t, float64(b.Cap()), float64(a.Budget.Cap))
}

// TestOnLinkSustainedRate: at 5 requests a second, each on a new tunnel,
// every request leaves from a never-used address: 30 s of it is 150
// requests, past the burst of 96, so the rate is what carries them.
func TestOnLinkSustainedRate(t *testing.T) {
	t.Parallel()
	const (
		rate = 5
		n    = 150
	)
	e := start(t)
	c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
	tick := time.NewTicker(time.Second / rate)
	defer tick.Stop()
	for i := range n {
		<-tick.C
		code, body, err := c.Fetch(guardCtx(t), e.up.HTTPSURL)
		require.NoError(t, err, "request %d", i)
		require.Equal(t, http.StatusOK, code, "request %d: %s", i, body)
	}
	assertFresh(t, e.up.Peers(), n)
	s := ctlStats(t, e)
	assert.Equal(t, uint64(n), s.Addresses.Fresh)
	assert.Zero(t, s.Addresses.Reused, "no warm address reused")
	assert.Zero(t, s.Addresses.Retries)
}

// TestOnLinkRouterOverflow: once the router cannot learn a new neighbour
// (its link's mcast_solicit is 0: it never asks who holds an address it
// does not know, which to egressd's new addresses is what a full table
// does, without filling the table every namespace of the machine shares),
// connections from never-used addresses get no answer, and every client
// request still succeeds through a retry from a warm address. The stats
// count the retries and the overflows, the new-address rate is lowered,
// and one warning names the router's neighbour table and -new-addrs.
func TestOnLinkRouterOverflow(t *testing.T) {
	t.Parallel()
	e := start(t)
	c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
	fetch := func(i int) {
		t.Helper()
		code, body, err := c.Fetch(guardCtx(t), e.up.HTTPURL)
		require.NoError(t, err, "request %d", i)
		require.Equal(t, http.StatusOK, code, "request %d: %s", i, body)
	}
	for i := range 20 { // warm addresses, which the router knows
		fetch(i)
	}
	known := e.up.Peers()
	e.tp.Router.Run(t, "sysctl", "-qw", "net.ipv6.neigh."+e.tp.RouterLink+".mcast_solicit=0")
	e.up.Reset()
	start := time.Now()
	for i := range 30 {
		fetch(i)
	}
	took := time.Since(start)

	s := ctlStats(t, e)
	a := s.Addresses
	require.NotNil(t, a.Budget)
	t.Logf("30 requests in %v: %d retries, %d overflows; rate %g of %g; fresh %d, reused %d",
		took.Round(time.Millisecond), a.Retries, a.Overflows, a.Budget.Rate, a.Budget.MaxRate, a.Fresh, a.Reused)
	assert.Positive(t, a.Retries, "a new address's connection got no answer and was retried")
	assert.Positive(t, a.Overflows)
	assert.LessOrEqual(t, a.Overflows, a.Retries)
	// It rises again only after 30 s without an overflow.
	assert.Less(t, a.Budget.Rate, a.Budget.MaxRate, "the new-address rate is lowered")
	const warning = "connections from new egress addresses get no answer while reused ones do: the router's neighbour table is likely full " +
		"(Linux routers keep 1,024 entries by default); handing out fewer new addresses for a while (lower -new-addrs to keep it so)"
	assert.Len(t, e.ed.Log(warning), 1, "one warning a minute at most")
	// Whatever left from a new address never got an answer: every answer
	// came from an address the router knew before, or one it learned from
	// a solicitation of H's.
	unknown := 0
	for _, p := range e.up.Peers() {
		if !slices.Contains(known, p) {
			unknown++
		}
	}
	t.Logf("%d of 30 answers from addresses the router had not seen before the switch", unknown)
	assert.NotContains(t, e.ed.Stderr(), "status=504")
}

// TestRoutedIdleTunnels: in routed mode with default flags one client holds
// 1,500 idle tunnels at once, more than -max-addrs's on-link default and
// -max-conns-per-client's old 1,024; each works, and closing them gives
// everything back.
func TestRoutedIdleTunnels(t *testing.T) {
	t.Parallel()
	const tunnels = 1500
	e := startRouted(t)
	e.ed.WaitListening(t, 1)
	var open []net.Conn
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	for i := range tunnels {
		c, resp, err := e.tp.Host.Connect(guardCtx(t), proxyAddr, nstest.UpstreamName+":443")
		require.NoError(t, err, "tunnel %d", i)
		if resp.StatusCode != http.StatusOK {
			body, _ := io.ReadAll(resp.Body)
			c.Close()
			t.Fatalf("tunnel %d: %d %s", i, resp.StatusCode, strings.TrimSpace(string(body)))
		}
		open = append(open, c)
	}
	s := ctlStats(t, e)
	assert.Equal(t, tunnels, s.Addresses.InUse, "an address per tunnel")
	assert.EqualValues(t, tunnels, s.Clients.Connections)
	assert.Nil(t, s.Addresses.Budget, "routed mode has no neighbour budget")
	// The first and the last still carry a request.
	for _, i := range []int{0, tunnels - 1} {
		code, err := httpsOver(open[i], e)
		require.NoError(t, err, "tunnel %d", i)
		assert.Equal(t, http.StatusOK, code, "tunnel %d", i)
	}
	for _, c := range open {
		c.Close()
	}
	open = nil
	nstest.WaitFor(t, "the tunnels' addresses to go back", func() bool { return ctlStats(t, e).Addresses.InUse == 0 })
}

// httpsOver sends one HTTPS request to the upstream through an open tunnel
// and returns the status.
func httpsOver(c net.Conn, e *env) (int, error) {
	tc := tls.Client(c, &tls.Config{RootCAs: e.up.RootCAs, ServerName: nstest.UpstreamName})
	tc.SetDeadline(time.Now().Add(nstest.Guard))
	req, err := http.NewRequest(http.MethodGet, e.up.HTTPSURL, nil)
	if err != nil {
		return 0, err
	}
	if err := req.Write(tc); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(tc), req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}
