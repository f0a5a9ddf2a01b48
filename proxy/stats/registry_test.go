package stats

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRegistryUpstream(t *testing.T) {
	r := NewRegistry(10)
	a := r.Upstream("api.example.com", "*.example.com")
	require.NotNil(t, a)
	assert.Equal(t, "api.example.com", a.Name)
	assert.Equal(t, "*.example.com", a.Rule())

	assert.Same(t, a, r.Upstream("api.example.com", "*.example.com"))
	assert.Same(t, a, r.Upstream("API.Example.COM", "*.example.com"), "hosts are case-insensitive")

	// After a reload another rule may apply: the entry says the current one.
	assert.Same(t, a, r.Upstream("api.example.com", "api.example.com"))
	assert.Equal(t, "api.example.com", a.Rule())
	assert.Same(t, a, r.Upstream("api.example.com", ""))
	assert.Empty(t, a.Rule(), "no rule applies any more")

	b := r.Upstream("b.example.org", "")
	assert.NotSame(t, a, b)
	assert.Empty(t, b.Rule())
}

func TestRegistryOddHostsGoToOther(t *testing.T) {
	r := NewRegistry(10)
	for _, host := range []string{"", OtherName, "(OTHER)", "bad\xffhost"} {
		assert.Equal(t, OtherName, r.Upstream(host, "").Name, "%q", host)
	}
	ups := r.Snapshot()
	require.Len(t, ups, 1)
	assert.Equal(t, OtherName, ups[0].Upstream)
}

func TestRegistryCap(t *testing.T) {
	r := NewRegistry(3)
	for _, h := range []string{"c.test", "a.test", "b.test"} {
		r.Upstream(h, "").Requests.Add(1)
	}
	assert.Len(t, r.Snapshot(), 3, "no (other) before it is used")

	o1 := r.Upstream("d.test", "rule")
	o2 := r.Upstream("e.test", "")
	assert.Same(t, o1, o2)
	assert.Equal(t, OtherName, o1.Name)
	assert.Empty(t, o1.Rule(), "(other) mixes hosts, so it has no rule")
	o1.Requests.Add(1)
	o2.Requests.Add(1)

	assert.Equal(t, "a.test", r.Upstream("a.test", "").Name, "known hosts keep their entry")

	ups := r.Snapshot()
	var names []string
	for _, u := range ups {
		names = append(names, u.Upstream)
	}
	assert.Equal(t, []string{"(other)", "a.test", "b.test", "c.test"}, names, "sorted by name")
	assert.Equal(t, uint64(2), ups[0].Requests)
}

func TestRegistryDefaultCap(t *testing.T) {
	r := NewRegistry(0)
	for i := range DefaultMaxUpstreams {
		r.Upstream(fmt.Sprintf("h%d.test", i), "")
	}
	assert.Equal(t, OtherName, r.Upstream("one-more.test", "").Name)
}

func TestRegistryUpstreamAllocs(t *testing.T) {
	r := NewRegistry(10)
	r.Upstream("known.example.com", "")
	full := NewRegistry(1)
	full.Upstream("first.test", "")
	full.Upstream("second.test", "")

	tests := []struct {
		name string
		r    *Registry
		host string
	}{
		{"known", r, "known.example.com"},
		{"over the cap", full, "third.test"},
		{"odd", r, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Zero(t, testing.AllocsPerRun(1000, func() {
				tt.r.Upstream(tt.host, "").Requests.Add(1)
			}))
		})
	}
}

func TestUpstreamStats(t *testing.T) {
	r := NewRegistry(10)
	u := r.Upstream("x.test", "*.test")
	u.Requests.Add(10)
	u.InFlight.Add(2)
	u.Waiting.Add(1)
	u.WaitNanos.Add(int64(1500 * time.Millisecond))
	u.Rejected.Add(3)
	u.Throttled.Add(4)
	u.Errors.Add(5)
	u.BytesUp.Add(100)
	u.BytesDown.Add(2000)
	for range 10 {
		u.Latency.Observe(150 * time.Microsecond)
	}

	s := u.Stats()
	assert.Equal(t, "x.test", s.Upstream)
	assert.Equal(t, "*.test", s.Rule)
	assert.Equal(t, uint64(10), s.Requests)
	assert.Equal(t, int64(2), s.InFlight)
	assert.Equal(t, int64(1), s.Waiting)
	assert.Equal(t, 1.5, s.WaitSeconds)
	assert.Equal(t, uint64(3), s.Rejected)
	assert.Equal(t, uint64(4), s.Throttled)
	assert.Equal(t, uint64(5), s.Errors)
	assert.Equal(t, uint64(100), s.BytesUp)
	assert.Equal(t, uint64(2000), s.BytesDown)
	assert.InDelta(t, 0.00015, s.Latency.P50, 1e-12)
	assert.Equal(t, uint64(10), s.LatencyHistogram.Count)
}

func TestRegistryConcurrent(t *testing.T) {
	r := NewRegistry(50)
	const workers, each = 8, 2000
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				u := r.Upstream(fmt.Sprintf("h%d.test", (w+i)%100), "")
				u.Requests.Add(1)
				u.InFlight.Add(1)
				u.Latency.Observe(time.Duration(i) * time.Microsecond)
				u.BytesDown.Add(10)
				u.InFlight.Add(-1)
				if i%500 == 0 {
					_ = r.Snapshot()
				}
			}
		})
	}
	wg.Wait()

	ups := r.Snapshot()
	assert.Len(t, ups, 51, "50 named hosts and (other)")
	tot := SumTotals(ups)
	assert.Equal(t, uint64(workers*each), tot.Requests)
	assert.Zero(t, tot.InFlight)
	assert.Equal(t, uint64(workers*each*10), tot.BytesDown)
	var count uint64
	for _, u := range ups {
		count += u.LatencyHistogram.Count
	}
	assert.Equal(t, uint64(workers*each), count)
}

func BenchmarkRegistryUpstream(b *testing.B) {
	r := NewRegistry(100)
	for i := range 100 {
		r.Upstream(fmt.Sprintf("h%d.example.com", i), "")
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r.Upstream("h42.example.com", "").Requests.Add(1)
		}
	})
}
