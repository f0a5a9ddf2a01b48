package test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/proxy/stats"
	"github.com/egressd/egressd/test/nstest"
)

// arrivals records when each request reached the upstream, by the upstream's
// own clock, and how many were being served at once at most.
type arrivals struct {
	mu      sync.Mutex
	times   []time.Time
	now     atomic.Int64
	maxSeen atomic.Int64
	// meet, if set, holds each request until meet requests have been
	// served at once (or nstest.Guard has passed), before hold: requests
	// that egressd lets go together overlap at the upstream however
	// unevenly the network delivers them.
	meet int64
	hold time.Duration // how long each request is held
}

func (a *arrivals) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	a.times = append(a.times, time.Now())
	a.mu.Unlock()
	n := a.now.Add(1)
	defer a.now.Add(-1)
	for {
		m := a.maxSeen.Load()
		if n <= m || a.maxSeen.CompareAndSwap(m, n) {
			break
		}
	}
	for deadline := time.Now().Add(nstest.Guard); a.maxSeen.Load() < a.meet && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(a.hold)
	fmt.Fprintln(w, "ok")
}

func (a *arrivals) sorted() []time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.SortedFunc(slices.Values(a.times), time.Time.Compare)
}

// fireAll sends n GETs of url at once from separate client connections in H
// and returns the responses' statuses and Retry-After headers.
func fireAll(t *testing.T, e *env, n int, url string) (codes []int, retryAfter []string) {
	t.Helper()
	ctx := guardCtx(t)
	codes = make([]int, n)
	retryAfter = make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
			if !assert.NoError(t, err) {
				return
			}
			resp, err := c.Do(req)
			if !assert.NoError(t, err) {
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			codes[i] = resp.StatusCode
			retryAfter[i] = resp.Header.Get("Retry-After")
		})
	}
	wg.Wait()
	return codes, retryAfter
}

func count(codes []int, code int) int {
	n := 0
	for _, c := range codes {
		if c == code {
			n++
		}
	}
	return n
}

// adminGet fetches path from egressd's admin socket.
func adminGet(t *testing.T, socket, path string) []byte {
	t.Helper()
	return adminFetch(t, adminClient(socket), path)
}

// ctlStats is `egressctl stats -json` of e's egressd.
func ctlStats(t *testing.T, e *env) stats.Stats {
	t.Helper()
	return e.tp.Host.CtlStats(t, binary(t, "./cmd/egressctl"), e.ed.Admin)
}

// TestRateLimit: with upstream.test=5r/s,burst=1, 40 requests fired at once
// all succeed; egressd let them go upstream no faster than the rule allows,
// and none reached the upstream before that. egressctl's counts equal what
// the upstream saw.
func TestRateLimit(t *testing.T) {
	t.Parallel()
	const (
		n        = 40
		interval = 200 * time.Millisecond // 5r/s
		burst    = 1
	)
	e := setup(t)
	arr := &arrivals{}
	e.up.Handle("/timed", arr)
	e.ed = e.restart(t, "-limit", nstest.UpstreamName+"=5r/s,burst=1")

	codes, _ := fireAll(t, e, n, e.up.HTTPURL+"timed")
	assert.Equal(t, n, count(codes, http.StatusOK), "every request waits its turn and succeeds: %v", codes)

	times := arr.sorted()
	require.Len(t, times, n)
	admitted := admissions(t, e.ed, nstest.UpstreamName, n)
	assertPaced(t, admitted, interval, burst)
	assertAdmittedFirst(t, admitted, times)

	s := ctlStats(t, e)
	u := nstest.UpstreamStats(t, s, nstest.UpstreamName)
	assert.Equal(t, uint64(len(times)), u.Requests, "egressctl counts what the upstream saw")
	assert.Equal(t, nstest.UpstreamName, u.Rule)
	assert.Zero(t, u.Rejected)
	assert.Zero(t, u.InFlight)
	assert.Zero(t, u.Waiting)
	assert.Greater(t, u.WaitSeconds, 0.0, "most of them waited")
	assert.Equal(t, uint64(n*len("ok\n")), u.BytesDown)
	assert.Equal(t, uint64(n), s.Totals.Requests)
}

// TestRateLimitRejects: past the rule's wait, the excess gets 429 with
// Retry-After, and never reaches the upstream.
func TestRateLimitRejects(t *testing.T) {
	t.Parallel()
	const n = 6
	e := setup(t)
	arr := &arrivals{}
	e.up.Handle("/timed", arr)
	e.ed = e.restart(t, "-limit", nstest.UpstreamName+"=1r/m,burst=2,wait=300ms")

	codes, retry := fireAll(t, e, n, e.up.HTTPURL+"timed")
	assert.Equal(t, 2, count(codes, http.StatusOK), "the burst passes: %v", codes)
	assert.Equal(t, n-2, count(codes, http.StatusTooManyRequests), "the rest would wait a minute: %v", codes)
	for i, c := range codes {
		if c == http.StatusTooManyRequests {
			secs, err := strconv.Atoi(retry[i])
			if assert.NoError(t, err, "Retry-After %q", retry[i]) {
				assert.GreaterOrEqual(t, secs, 1)
				assert.LessOrEqual(t, secs, 120)
			}
		}
	}
	assert.Len(t, arr.sorted(), 2, "rejected requests never reach the upstream")

	// A CONNECT tunnel counts as one request when it opens: it is refused
	// with 429 too, before anything is dialed.
	conn, resp, err := e.tp.Host.Connect(guardCtx(t), proxyAddr, nstest.UpstreamName+":443")
	require.NoError(t, err)
	conn.Close()
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.NotEmpty(t, resp.Header.Get("Retry-After"))

	u := nstest.UpstreamStats(t, ctlStats(t, e), nstest.UpstreamName)
	assert.Equal(t, uint64(n-2+1), u.Rejected)
	assert.Equal(t, uint64(n+1), u.Requests)
}

// TestConcurrencyLimit: concurrency=2 never lets a third request reach the
// upstream at once. The upstream holds the first request until a second is
// in, so that the cap is reached even when a busy network delivers the two
// far apart, and every request for 300 ms more, in which a third would show.
func TestConcurrencyLimit(t *testing.T) {
	t.Parallel()
	const n = 8
	e := setup(t)
	arr := &arrivals{meet: 2, hold: 300 * time.Millisecond}
	e.up.Handle("/timed", arr)
	e.ed = e.restart(t, "-limit", nstest.UpstreamName+"=1000r/s,burst=100,concurrency=2")

	codes, _ := fireAll(t, e, n, e.up.HTTPURL+"timed")
	assert.Equal(t, n, count(codes, http.StatusOK), "%v", codes)
	assert.Equal(t, int64(2), arr.maxSeen.Load(), "at most two at once, and the cap was reached")
}

// TestUpstreamPushback: an upstream's 429 with Retry-After holds its rule:
// the next request waits or, past its wait, gets 429 from egressd without
// reaching the upstream. The stats count the upstream's 429.
func TestUpstreamPushback(t *testing.T) {
	t.Parallel()
	e := setup(t)
	var hits atomic.Int64
	e.up.Handle("/busy", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		hits.Add(1)
		w.Header().Set("Retry-After", "30")
		http.Error(w, "upstream says no", http.StatusTooManyRequests)
	}))
	e.ed = e.restart(t, "-limit", nstest.UpstreamName+"=100r/s,burst=10,wait=1s")
	c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, true)

	code, _, err := c.Fetch(guardCtx(t), e.up.HTTPURL+"busy")
	require.NoError(t, err)
	assert.Equal(t, http.StatusTooManyRequests, code, "the upstream's own 429 is passed on")

	req, err := http.NewRequestWithContext(guardCtx(t), http.MethodGet, e.up.HTTPURL+"busy", nil)
	require.NoError(t, err)
	resp, err := c.Do(req)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.NotContains(t, string(body), "upstream says no", "this 429 is egressd's")
	secs, err := strconv.Atoi(resp.Header.Get("Retry-After"))
	require.NoError(t, err)
	assert.Greater(t, secs, 20, "the hold the upstream asked for")
	assert.Equal(t, int64(1), hits.Load(), "the held request never reached the upstream")

	u := nstest.UpstreamStats(t, ctlStats(t, e), nstest.UpstreamName)
	assert.Equal(t, uint64(1), u.Throttled)
	assert.Equal(t, uint64(1), u.Rejected)
	assert.Zero(t, u.InFlight, "an upstream 429 ends its request like any other")
}

// TestAdminAPI: /metrics parses with the Prometheus text parser and agrees
// with /stats; egressctl prints its tables, lists the live addresses, and
// says in one line when egressd is not there.
func TestAdminAPI(t *testing.T) {
	t.Parallel()
	e := start(t, "-limit", nstest.UpstreamName+"=100r/s,burst=10", "-ready", "3")
	c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, true)
	for range 5 {
		code, _, err := c.Fetch(guardCtx(t), e.up.HTTPURL)
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, code)
	}

	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(string(adminGet(t, e.ed.Admin, "/metrics"))))
	require.NoError(t, err, "/metrics must parse")
	reqs := families["egress_upstream_requests_total"]
	require.NotNil(t, reqs)
	found := false
	for _, m := range reqs.GetMetric() {
		for _, l := range m.GetLabel() {
			assert.Equal(t, "upstream", l.GetName(), "labelled by upstream only")
			if l.GetValue() == nstest.UpstreamName {
				found = true
				assert.Equal(t, 5.0, m.GetCounter().GetValue())
			}
		}
	}
	assert.True(t, found)
	for name, fam := range families {
		for _, m := range fam.GetMetric() {
			for _, l := range m.GetLabel() {
				// Never an address; the subnet label names a whole /64.
				if l.GetName() == "subnet" {
					p, err := netip.ParsePrefix(l.GetValue())
					assert.True(t, err == nil && p.Bits() == 64 || l.GetValue() == stats.OtherSubnet, "%s is labelled by %q, not a /64", name, l.GetValue())
					continue
				}
				assert.NotContains(t, l.GetValue(), "2001:db8", "%s is labelled by an address", name)
			}
		}
	}
	require.NotNil(t, families["egress_address_added_total"])
	assert.GreaterOrEqual(t, families["egress_address_added_total"].GetMetric()[0].GetCounter().GetValue(), 5.0)

	ctl := binary(t, "./cmd/egressctl")
	table := e.tp.Host.Run(t, ctl, "-admin", e.ed.Admin, "stats")
	assert.Contains(t, table, nstest.UpstreamName)
	addrs := e.tp.Host.Run(t, ctl, "-admin", e.ed.Admin, "addrs")
	assert.Contains(t, addrs, "2001:db8:1:2:", "the live egress addresses")
	assert.Contains(t, addrs, "ready")

	var list []stats.Addr
	require.NoError(t, json.Unmarshal(adminGet(t, e.ed.Admin, "/addrs"), &list))
	assert.NotEmpty(t, list)

	var stderr strings.Builder
	cmd := exec.Command(ctl, "-admin", e.ed.Admin+".nosuch", "stats")
	cmd.Stderr = &stderr
	err = cmd.Run()
	var exit *exec.ExitError
	require.ErrorAs(t, err, &exit)
	assert.Equal(t, 1, exit.ExitCode())
	lines := slices.Collect(strings.Lines(strings.TrimSpace(stderr.String())))
	require.Len(t, lines, 1, "%s", stderr.String())
	assert.Contains(t, lines[0], e.ed.Admin+".nosuch")
	assert.Contains(t, lines[0], "-admin")
}
