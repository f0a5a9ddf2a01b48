package stats

import (
	"math"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestBounds(t *testing.T) {
	s := new(Histogram).Snapshot()
	require.Len(t, s.Bounds, 21)
	require.Len(t, s.Counts, 22)
	assert.Equal(t, 0.0001, s.Bounds[0])
	assert.Equal(t, 0.0002, s.Bounds[1])
	assert.Equal(t, 0.0004, s.Bounds[2])
	assert.Equal(t, 104.8576, s.Bounds[20])
	for i := 1; i < len(s.Bounds); i++ {
		assert.Equal(t, 2*s.Bounds[i-1], s.Bounds[i], "bound %d", i)
	}
}

func TestBucketOf(t *testing.T) {
	tests := []struct {
		d    time.Duration
		want int
	}{
		{-time.Second, 0},
		{0, 0},
		{time.Nanosecond, 0},
		{100 * time.Microsecond, 0},
		{100*time.Microsecond + 1, 1},
		{200 * time.Microsecond, 1},
		{200*time.Microsecond + 1, 2},
		{400 * time.Microsecond, 2},
		{time.Millisecond, 4}, // (800µs, 1.6ms]
		{time.Second, 14},     // (819.2ms, 1.6384s]
		{104857600 * time.Microsecond, 20},
		{104857600*time.Microsecond + 1, 21},
		{time.Hour, 21},
		{math.MaxInt64, 21},
	}
	for _, tt := range tests {
		t.Run(tt.d.String(), func(t *testing.T) {
			assert.Equal(t, tt.want, bucketOf(tt.d))
			if tt.want < numBounds {
				assert.LessOrEqual(t, max(tt.d, 0).Seconds(), bounds[tt.want]+1e-15)
			}
			if tt.want > 0 {
				assert.Greater(t, tt.d.Seconds(), bounds[tt.want-1])
			}
		})
	}
}

func TestObserveSnapshot(t *testing.T) {
	var h Histogram
	h.Observe(50 * time.Microsecond)
	h.Observe(150 * time.Microsecond)
	h.Observe(150 * time.Microsecond)
	h.Observe(2 * time.Minute)
	h.Observe(-time.Second) // counts as 0

	s := h.Snapshot()
	assert.Equal(t, uint64(5), s.Count)
	assert.Equal(t, uint64(2), s.Counts[0])
	assert.Equal(t, uint64(2), s.Counts[1])
	assert.Equal(t, uint64(1), s.Counts[21])
	assert.InDelta(t, 120.00035, s.Sum, 1e-9)
}

func TestQuantile(t *testing.T) {
	// observe returns a snapshot with n observations of each duration.
	observe := func(n int, ds ...time.Duration) HistogramSnapshot {
		var h Histogram
		for _, d := range ds {
			for range n {
				h.Observe(d)
			}
		}
		return h.Snapshot()
	}
	tests := []struct {
		name string
		s    HistogramSnapshot
		q    float64
		want float64
	}{
		{"empty", observe(0), 0.5, 0},
		{"empty p99", observe(0), 0.99, 0},
		{"one bucket median", observe(100, 150*time.Microsecond), 0.5, 0.00015},
		{"one bucket p90", observe(100, 150*time.Microsecond), 0.9, 0.00019},
		{"one bucket max", observe(100, 150*time.Microsecond), 1, 0.0002},
		{"one bucket min", observe(100, 150*time.Microsecond), 0, 0.0001},
		{"first bucket from zero", observe(10, 10*time.Microsecond), 0.5, 0.00005},
		{"two halves median", observe(50, 50*time.Microsecond, 150*time.Microsecond), 0.5, 0.0001},
		{"two halves p90", observe(50, 50*time.Microsecond, 150*time.Microsecond), 0.9, 0.00018},
		{"two halves p99", observe(50, 50*time.Microsecond, 150*time.Microsecond), 0.99, 0.000198},
		{"skips empty buckets", observe(10, 50*time.Microsecond, time.Second), 0.75, 0.8192 + 0.8192*0.5},
		{"all in +Inf", observe(10, 5*time.Minute), 0.5, 104.8576},
		{"all in +Inf p99", observe(10, 5*time.Minute), 0.99, 104.8576},
		{"tail in +Inf", observe(10, 50*time.Microsecond, 5*time.Minute), 0.99, 104.8576},
		{"q above 1 clamps", observe(100, 150*time.Microsecond), 7, 0.0002},
		{"q below 0 clamps", observe(100, 150*time.Microsecond), -1, 0.0001},
		{"NaN", observe(100, 150*time.Microsecond), math.NaN(), 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.InDelta(t, tt.want, tt.s.Quantile(tt.q), 1e-12)
		})
	}
}

func TestQuantileUniform(t *testing.T) {
	// 1..1000ms, one each. With buckets that double, the estimate is only
	// as good as the bucket: it must land in the bucket of the exact value.
	var h Histogram
	for i := 1; i <= 1000; i++ {
		h.Observe(time.Duration(i) * time.Millisecond)
	}
	s := h.Snapshot()
	for _, q := range []float64{0.1, 0.5, 0.9, 0.99} {
		exact := time.Duration(q*1000) * time.Millisecond
		b := bucketOf(exact)
		got := s.Quantile(q)
		assert.Greater(t, got, bounds[b-1], "q=%v", q)
		assert.LessOrEqual(t, got, bounds[b], "q=%v", q)
	}
	assert.InDelta(t, 0.5, s.Quantile(0.5), 0.05, "interpolated inside (409.6ms, 819.2ms]")
	qs := s.Quantiles()
	assert.LessOrEqual(t, qs.P50, qs.P90)
	assert.LessOrEqual(t, qs.P90, qs.P99)
}

func TestQuantileHandMade(t *testing.T) {
	// A snapshot decoded or built by hand, without bounds, must not panic.
	assert.Equal(t, 0.0, HistogramSnapshot{Counts: []uint64{3}, Count: 3}.Quantile(0.5))
	assert.Equal(t, 0.0, HistogramSnapshot{}.Quantile(0.5))
}

func TestHistogramConcurrent(t *testing.T) {
	var h Histogram
	const workers, each = 8, 10000
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				h.Observe(time.Duration(w*each+i) * time.Microsecond)
				if i%1000 == 0 {
					s := h.Snapshot()
					_ = s.Quantiles()
				}
			}
		})
	}
	wg.Wait()
	s := h.Snapshot()
	assert.Equal(t, uint64(workers*each), s.Count)
	n := workers * each
	assert.InDelta(t, float64(n-1)*float64(n)/2/1e6, s.Sum, 1e-6)
}

func TestObserveAllocs(t *testing.T) {
	var h Histogram
	assert.Zero(t, testing.AllocsPerRun(100, func() { h.Observe(time.Millisecond) }))
}

func BenchmarkObserve(b *testing.B) {
	var h Histogram
	b.ReportAllocs()
	for b.Loop() {
		h.Observe(3 * time.Millisecond)
	}
}

func BenchmarkObserveParallel(b *testing.B) {
	var h Histogram
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			h.Observe(3 * time.Millisecond)
		}
	})
}
