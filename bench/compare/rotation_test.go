package compare

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy/stats"
)

// addHistogram is the Prometheus histogram of egressd's address adds.
const addHistogram = "egress_address_add_duration_seconds"

// rotation is (e): plain GETs at a fixed rate, each on a new connection,
// through egressd on-link -rotate request (s), with its admin API's /stats
// sampled every second and its add-latency histogram every window.
func (b *bench) rotation(s *system) *Rotation {
	t := b.t
	admin := adminClient(s.proc.Admin)
	// The harness leaves -max-addrs at its default.
	r := &Rotation{Rate: b.p.rotateRate, MaxAddrs: netutil.DefaultMaxAddrs}
	if _, err := admin.stats(); err != nil {
		t.Fatal(err)
	}
	prev, err := admin.buckets()
	if err != nil {
		t.Fatal(err)
	}

	type outcome struct {
		lr  loadResult
		err error
	}
	done := make(chan outcome, 1)
	fulls := neighTableFulls()
	defer func() { r.TableFulls = neighTableFulls() - fulls }()
	start := time.Now()
	go func() {
		lr, err := b.runLoad(s, []string{"-mode", "rate", "-rate", fmt.Sprint(b.p.rotateRate), "-d", b.p.rotateDur.String()}, b.p.rotateDur+5*time.Minute)
		done <- outcome{lr, err}
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	nextWindow := start.Add(b.p.window)
	sample := func(now time.Time, window bool) {
		st, err := admin.stats()
		if err != nil {
			r.Note = err.Error()
			return
		}
		el := now.Sub(start).Seconds()
		neigh, err := b.tp.RouterNeighbours(s.onLink)
		if err != nil {
			r.Note = err.Error()
		}
		r.Ticks = append(r.Ticks, Tick{T: el, Live: st.Addresses.Live, Added: st.Addresses.Added, Removed: st.Addresses.Removed, RouterNeigh: neigh})
		if !window {
			return
		}
		cur, err := admin.buckets()
		if err != nil {
			r.Note = err.Error()
			return
		}
		w := Window{T: el}
		w.Adds, w.P50ms, w.P99ms = cur.since(prev)
		r.Windows = append(r.Windows, w)
		prev = cur
	}
	for {
		select {
		case o := <-done:
			sample(time.Now(), true)
			r.Seconds = time.Since(start).Seconds()
			if o.err != nil {
				r.Errors, r.Note = 1, o.err.Error()
				return r
			}
			r.Requests, r.Errors, r.P50ms, r.P99ms = o.lr.Requests, o.lr.Errors, o.lr.P50ms, o.lr.P99ms
			if len(o.lr.ErrorSamples) > 0 {
				r.Note = "load: " + strings.Join(o.lr.ErrorSamples, "; ")
			}
			return r
		case now := <-tick.C:
			window := !now.Before(nextWindow)
			if window {
				nextWindow = nextWindow.Add(b.p.window)
			}
			sample(now, window)
		}
	}
}

// neighTableFulls is the kernel's count of times its IPv6 neighbour table
// was full, summed over the CPUs' lines of /proc/net/stat/ndisc_cache.
func neighTableFulls() uint64 {
	b, err := os.ReadFile("/proc/net/stat/ndisc_cache")
	if err != nil {
		return 0
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	col := slices.Index(strings.Fields(lines[0]), "table_fulls")
	var n uint64
	for _, l := range lines[1:] {
		if f := strings.Fields(l); col >= 0 && col < len(f) {
			v, _ := strconv.ParseUint(f[col], 16, 64)
			n += v
		}
	}
	return n
}

// admin talks to egressd's admin API on its unix socket.
type admin struct{ c *http.Client }

func adminClient(socket string) admin {
	return admin{&http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}},
	}}
}

func (a admin) get(path string) ([]byte, error) {
	resp, err := a.c.Get("http://egressd" + path)
	if err != nil {
		return nil, fmt.Errorf("admin API %s: %w", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("admin API %s: %s %v", path, resp.Status, err)
	}
	return body, nil
}

func (a admin) stats() (*stats.Stats, error) {
	body, err := a.get("/stats")
	if err != nil {
		return nil, err
	}
	var st stats.Stats
	if err := json.Unmarshal(body, &st); err != nil {
		return nil, fmt.Errorf("admin API /stats: %w", err)
	}
	return &st, nil
}

// buckets are the cumulative counts of a histogram by upper bound in
// seconds (+Inf last).
type buckets []bucket

type bucket struct {
	le    float64
	count uint64
}

// buckets reads the address-add histogram from /metrics.
func (a admin) buckets() (buckets, error) {
	body, err := a.get("/metrics")
	if err != nil {
		return nil, err
	}
	return parseBuckets(string(body), addHistogram)
}

// parseBuckets reads the _bucket lines of histogram name from Prometheus
// text.
func parseBuckets(text, name string) (buckets, error) {
	var bs buckets
	for line := range strings.Lines(text) {
		rest, ok := strings.CutPrefix(line, name+"_bucket{")
		if !ok {
			continue
		}
		_, le, _ := strings.Cut(rest, `le="`)
		le, _, _ = strings.Cut(le, `"`)
		fields := strings.Fields(line)
		bound, err1 := strconv.ParseFloat(le, 64) // "+Inf" parses as +Inf
		count, err2 := strconv.ParseUint(fields[len(fields)-1], 10, 64)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("bad bucket line %q", strings.TrimSpace(line))
		}
		bs = append(bs, bucket{bound, count})
	}
	if len(bs) == 0 {
		return nil, fmt.Errorf("no %s in /metrics", name)
	}
	sort.Slice(bs, func(i, j int) bool { return bs[i].le < bs[j].le })
	return bs, nil
}

// since returns the observations between prev and cur and their p50 and
// p99 in milliseconds, interpolated linearly inside a bucket.
func (cur buckets) since(prev buckets) (n uint64, p50, p99 float64) {
	delta := make(buckets, len(cur))
	for i, b := range cur {
		delta[i] = b
		if i < len(prev) {
			delta[i].count -= prev[i].count
		}
	}
	n = delta[len(delta)-1].count
	return n, delta.quantile(0.5) * 1000, delta.quantile(0.99) * 1000
}

func (d buckets) quantile(q float64) float64 {
	total := d[len(d)-1].count
	if total == 0 {
		return 0
	}
	rank := q * float64(total)
	lower, below := 0.0, uint64(0)
	for _, b := range d {
		if float64(b.count) >= rank {
			if b.le > 1e300 { // +Inf: the last finite bound
				return lower
			}
			inBucket := float64(b.count - below)
			return lower + (b.le-lower)*(rank-float64(below))/inBucket
		}
		lower, below = b.le, b.count
	}
	return lower
}

func TestBucketsSince(t *testing.T) {
	text := `# TYPE egress_address_add_duration_seconds histogram
egress_address_add_duration_seconds_bucket{le="0.001"} 10
egress_address_add_duration_seconds_bucket{le="0.002"} 90
egress_address_add_duration_seconds_bucket{le="+Inf"} 100
egress_address_add_duration_seconds_sum 0.1
egress_address_add_duration_seconds_count 100
`
	cur, err := parseBuckets(text, addHistogram)
	require.NoError(t, err)
	prev := buckets{{0.001, 10}, {0.002, 10}, {math.Inf(1), 10}}
	n, p50, p99 := cur.since(prev)
	assert.Equal(t, uint64(90), n)
	assert.InDelta(t, 1.5625, p50, 1e-9, "the 45th of 90 is the 45th of the 80 between 1 and 2 ms")
	assert.InDelta(t, 2, p99, 1e-9, "in +Inf: the last finite bound")
	_, err = parseBuckets("other_bucket{le=\"1\"} 3\n", addHistogram)
	assert.Error(t, err)
}
