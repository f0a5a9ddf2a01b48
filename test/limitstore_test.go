package test

import (
	"context"
	"fmt"
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

	"github.com/egressd/egressd/proxy/stats"
	"github.com/egressd/egressd/test/nstest"
)

// storeSecret is the password of the test's Redis.
const storeSecret = "fleet-s3cret-Pa55"

// fleetHost is one of the three egressd hosts of TestLimitStoreShared.
type fleetHost struct {
	ns     *nstest.NS
	egress netip.Prefix // routed to it: its egress addresses
	ed     *nstest.Process
}

// within returns the times in [from, to).
func within(ts []time.Time, from, to time.Time) []time.Time {
	return slices.DeleteFunc(slices.Clone(ts), func(at time.Time) bool { return at.Before(from) || !at.Before(to) })
}

// served counts the requests host's egressd answered 200 so far, by its
// access log.
func served(h *fleetHost) int {
	n := 0
	for _, rec := range h.ed.Log("request") {
		if rec["status"] == "200" {
			n++
		}
	}
	return n
}

// assertWithinRule checks that arrivals from start on, for span, keep to
// rate r with burst b: in every 2-second window and over the whole span,
// with a margin of 5 requests for the network's delays on a busy machine.
// Unshared, three hosts would each send the whole rule: three times as many.
func assertWithinRule(t *testing.T, what string, ts []time.Time, start time.Time, span time.Duration, r float64, b int) {
	t.Helper()
	const margin = 5
	allowed := func(d time.Duration) int { return int(r*d.Seconds()) + b + margin }
	assert.LessOrEqual(t, len(ts), allowed(span), "%s: %d requests in %v", what, len(ts), span)
	for w := start; !w.Add(2 * time.Second).After(start.Add(span)); w = w.Add(2 * time.Second) {
		n := 0
		for _, at := range ts {
			if !at.Before(w) && at.Before(w.Add(2*time.Second)) {
				n++
			}
		}
		assert.LessOrEqual(t, n, allowed(2*time.Second), "%s: %d requests in the 2s from %v", what, n, w.Sub(start))
	}
}

// TestLimitStoreShared: three egressd hosts, each with its own /64 behind
// one router, share `upstream.test=5r/s,burst=1` through one redis-server
// in R. 3 x 30 clients at once: the upstream sees no more than the rule
// allows in total. Redis killed mid-run: no request fails, each host falls
// back to its own limiter and its stats say so; Redis started again: they
// return to it, and the rule holds for all together again. The password
// never shows in a log, the stats or egressctl's output.
func TestLimitStoreShared(t *testing.T) {
	t.Parallel()
	bin := binary(t, "./cmd/egressd")
	ctl := binary(t, "./cmd/egressctl")
	tp := nstest.New(t)
	up := tp.StartUpstream(t)
	seen := new(arrivals)
	up.Handle("/limited", seen)

	// Redis on R's loopback address, which every host reaches through R.
	storeAddr := net.JoinHostPort(nstest.UpstreamAddr.String(), "6379")
	startStore := func() *nstest.Process {
		p := tp.Router.Start(t, nil, "redis-server", "--port", "6379", "--bind", nstest.UpstreamAddr.String(),
			"--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", t.TempDir(), "--logfile", "",
			"--requirepass", storeSecret)
		nstest.WaitFor(t, "redis-server listening", func() bool {
			c, err := tp.Router.DialContext(context.Background(), "tcp", storeAddr)
			if err == nil {
				c.Close()
			}
			return err == nil || p.Exited()
		})
		require.False(t, p.Exited(), "redis-server exited: %s", p.Stdout())
		return p
	}
	store := startStore()
	storeURL := "redis://:" + storeSecret + "@" + storeAddr + "/0"

	// Three hosts: H and two more, each its own link /64 and a routed /64
	// to egress from (routed mode costs R no neighbour entry per address).
	hosts := []*fleetHost{{ns: tp.Host}}
	links := []string{tp.HostLink}
	gateways := []netip.Addr{nstest.HostAddr}
	routerLinks := []string{tp.RouterLink}
	for i := range 2 {
		h := tp.AddHost(t, netip.MustParsePrefix(fmt.Sprintf("2001:db8:1:%d::/64", 3+i)))
		hosts = append(hosts, &fleetHost{ns: h.NS})
		links, gateways, routerLinks = append(links, h.Link), append(gateways, h.Addr), append(routerLinks, h.RouterLink)
	}
	for i, h := range hosts {
		h.egress = netip.MustParsePrefix(fmt.Sprintf("2001:db8:6:%d::/64", i+1))
		tp.Router.Run(t, "ip", "-6", "route", "add", h.egress.String(), "via", gateways[i].String(), "dev", routerLinks[i])
		args := []string{"-listen", proxyAddr, "-interface", links[i], "-mode", "routed", "-prefix", h.egress.String(),
			"-log-level", "debug", "-limit", nstest.UpstreamName + "=5r/s,burst=1,wait=1m", "-limit-store", storeURL}
		h.ed = h.ns.StartEgressd(t, bin, args...)
	}
	for _, h := range hosts {
		h.ed.WaitListening(t, 1)
	}
	statsOf := func(h *fleetHost) *stats.LimitStore {
		t.Helper()
		s := tp.Host.CtlStats(t, ctl, h.ed.Admin)
		require.NotNil(t, s.LimitStore)
		return s.LimitStore
	}
	allShared := func(want bool) func() bool {
		return func() bool {
			for _, h := range hosts {
				if statsOf(h).Shared != want {
					return false
				}
			}
			return true
		}
	}

	// 30 clients on each host, each sending one request after another.
	ctx, stopClients := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	stop := func() {
		stopClients()
		wg.Wait()
	}
	t.Cleanup(stop)
	for _, h := range hosts {
		for range 30 {
			c := h.ns.NewClient(t, proxyAddr, up.RootCAs, true)
			wg.Go(func() {
				for ctx.Err() == nil {
					code, body, err := c.Fetch(ctx, up.HTTPURL+"limited")
					if ctx.Err() != nil {
						return // stopped: not a failure
					}
					if err != nil || code != http.StatusOK {
						mu.Lock()
						failures = append(failures, fmt.Sprintf("%s: status %d, %v: %s", h.ns.Name, code, err, strings.TrimSpace(body)))
						mu.Unlock()
					}
				}
			})
		}
	}

	// Shared: the rule holds for the three together.
	nstest.WaitFor(t, "a first request upstream", func() bool { return len(seen.sorted()) > 0 })
	start := seen.sorted()[0]
	time.Sleep(time.Until(start.Add(10 * time.Second)))
	killed := time.Now()
	require.NoError(t, store.Signal(syscall.SIGKILL))
	store.Wait(t)
	ts := within(seen.sorted(), start, killed)
	assertWithinRule(t, "shared", ts, start, killed.Sub(start), 5, 1)

	// Redis gone: each host falls back and says so, and goes on serving.
	nstest.WaitFor(t, "every host falling back", allShared(false))
	var before []int
	for _, h := range hosts {
		before = append(before, served(h))
	}
	time.Sleep(5 * time.Second)
	for i, h := range hosts {
		st := statsOf(h)
		assert.False(t, st.Shared, h.ns.Name)
		assert.Equal(t, uint64(1), st.Fallbacks, h.ns.Name)
		assert.Positive(t, st.LocalDecisions, h.ns.Name)
		assert.NotEmpty(t, st.LastError, h.ns.Name)
		assert.Greater(t, served(h), before[i], "%s served nothing while Redis was down", h.ns.Name)
		out := h.ns.Run(t, ctl, "-admin", h.ed.Admin, "stats")
		assert.Contains(t, out, "limit store: redis://:xxxxx@"+storeAddr+"/0 fails: this egressd enforces every rule alone")
	}

	// Redis back: every host returns to it, and the rule holds for all
	// together again (from a second after the last returned, when what the
	// hosts let through alone has arrived).
	startStore()
	nstest.WaitFor(t, "every host back on Redis", allShared(true))
	back := time.Now().Add(time.Second)
	time.Sleep(time.Until(back.Add(8 * time.Second)))
	end := time.Now()
	ts = within(seen.sorted(), back, end)
	assertWithinRule(t, "shared again", ts, back, end.Sub(back), 5, 1)

	stop()
	mu.Lock()
	assert.Empty(t, failures, "requests that failed")
	mu.Unlock()
	t.Logf("%d requests upstream in %v: %d in the %v shared at first, %d in the %v shared again", len(within(seen.sorted(), start, end)),
		end.Sub(start).Round(time.Second), len(within(seen.sorted(), start, killed)), killed.Sub(start).Round(time.Second), len(ts), end.Sub(back).Round(time.Second))

	for _, h := range hosts {
		st := statsOf(h)
		assert.True(t, st.Shared, h.ns.Name)
		assert.Equal(t, uint64(1), st.Fallbacks, "%s: one fallback", h.ns.Name)
		assert.Positive(t, st.Decisions, h.ns.Name)
		assert.Equal(t, "redis://:xxxxx@"+storeAddr+"/0", st.Store)
		assert.Len(t, h.ed.Log("limit store fails: each egressd enforces every -limit rule alone until it answers"), 1, h.ns.Name)
		assert.Len(t, h.ed.Log("limit store answers again: -limit rules are shared again"), 1, h.ns.Name)
		ready := h.ed.Log("egressd ready")
		require.Len(t, ready, 1)
		assert.Equal(t, "redis://:xxxxx@"+storeAddr+"/0", ready[0]["limit_store"])
		assert.NotContains(t, h.ed.Stderr(), storeSecret, "%s: the password in the log", h.ns.Name)
		out := h.ns.Run(t, ctl, "-admin", h.ed.Admin, "stats", "-json")
		assert.NotContains(t, out, storeSecret, "%s: the password in /stats", h.ns.Name)
		metrics := h.ns.Run(t, "curl", "-sS", "--unix-socket", h.ed.Admin, "http://admin/metrics")
		assert.Contains(t, metrics, "\negress_limit_store_up 1\n")
		assert.Contains(t, metrics, "\negress_limit_store_fallbacks_total 1\n")
	}
}
