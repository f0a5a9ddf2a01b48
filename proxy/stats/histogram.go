package stats

import (
	"math"
	"math/bits"
	"sync/atomic"
	"time"
)

const (
	// firstBound is the upper bound of the first bucket; each further bound
	// doubles the one before.
	firstBound = 100 * time.Microsecond
	// numBounds is the number of finite bounds: 100µs … 100µs·2²⁰ ≈ 104.9s.
	numBounds = 21
)

// bounds are the finite upper bounds in seconds, ascending.
var bounds = func() (b [numBounds]float64) {
	for i := range b {
		// Not Duration.Seconds, which gives 1.6383999999999999 for 1.6384s.
		b[i] = float64(firstBound<<i) / 1e9
	}
	return b
}()

// Histogram is a lock-free latency histogram with fixed buckets: upper
// bounds 100µs, 200µs, 400µs, ... doubling up to 100µs·2²⁰ ≈ 104.9s (21
// bounds), plus +Inf. The zero value is ready to use.
type Histogram struct {
	counts [numBounds + 1]atomic.Uint64 // per bucket; the last is +Inf
	// sumMicros is the sum of the observations in whole microseconds: a
	// uint64 of them lasts 584,000 years of summed durations, where one of
	// nanoseconds would wrap after a few days of 10,000 ten-second requests
	// a second. The buckets start at 100µs, so nothing of value is lost.
	sumMicros atomic.Uint64
}

// bucketOf returns the index of the bucket d falls in: the first whose upper
// bound is at least d, or numBounds (+Inf).
func bucketOf(d time.Duration) int {
	if d <= firstBound {
		return 0
	}
	// The smallest i with d <= firstBound<<i is the bit length of
	// ceil(d/firstBound)-1, which is (d-1)/firstBound in integers.
	i := bits.Len64(uint64(d-1) / uint64(firstBound))
	return min(i, numBounds)
}

// Observe records one duration. Negative durations count as zero. It does
// not allocate and is safe for concurrent use.
func (h *Histogram) Observe(d time.Duration) {
	d = max(d, 0)
	h.counts[bucketOf(d)].Add(1)
	h.sumMicros.Add(uint64((d + time.Microsecond/2) / time.Microsecond))
}

// Snapshot returns the current counts. Concurrent observations may be half
// visible (counted in a bucket but not yet in Sum); Count is always the sum
// of Counts.
func (h *Histogram) Snapshot() HistogramSnapshot {
	s := HistogramSnapshot{
		Bounds: append([]float64(nil), bounds[:]...),
		Counts: make([]uint64, len(h.counts)),
	}
	for i := range h.counts {
		c := h.counts[i].Load()
		s.Counts[i] = c
		s.Count += c
	}
	s.Sum = float64(h.sumMicros.Load()) / 1e6
	return s
}

// HistogramSnapshot is the state of a Histogram at one moment.
type HistogramSnapshot struct {
	Bounds []float64 `json:"bounds"` // upper bounds in seconds, ascending, without +Inf
	Counts []uint64  `json:"counts"` // per bucket (not cumulative), len(Bounds)+1, last is +Inf
	Count  uint64    `json:"count"`
	Sum    float64   `json:"sum"` // seconds
}

// Quantile returns the q-quantile (0 <= q <= 1) in seconds, interpolating
// linearly inside the bucket it falls in (the first bucket starts at 0). A
// quantile that falls in the +Inf bucket is reported as the highest finite
// bound, as Prometheus's histogram_quantile does. The result is rounded to
// the nanosecond. It returns 0 when the histogram is empty or q is NaN; q
// outside [0, 1] is clamped.
func (s HistogramSnapshot) Quantile(q float64) float64 {
	var total uint64
	for _, c := range s.Counts {
		total += c
	}
	if total == 0 || math.IsNaN(q) {
		return 0
	}
	rank := min(max(q, 0), 1) * float64(total)
	var below uint64 // observations in the buckets before i
	for i, c := range s.Counts {
		if c == 0 {
			continue
		}
		if float64(below+c) < rank {
			below += c
			continue
		}
		if i >= len(s.Bounds) { // +Inf
			if len(s.Bounds) == 0 {
				return 0
			}
			return s.Bounds[len(s.Bounds)-1]
		}
		lower := 0.0
		if i > 0 {
			lower = s.Bounds[i-1]
		}
		upper := s.Bounds[i]
		v := lower + (upper-lower)*(rank-float64(below))/float64(c)
		// To the nanosecond: 0.0012, not 0.0012000000000000001, in JSON.
		return math.Round(v*1e9) / 1e9
	}
	return 0 // not reached: rank <= float64(total), the last sum above
}

// Quantiles returns the median, the 90th and the 99th percentiles.
func (s HistogramSnapshot) Quantiles() Quantiles {
	return Quantiles{
		P50: s.Quantile(0.5),
		P90: s.Quantile(0.9),
		P99: s.Quantile(0.99),
	}
}

// Quantiles are a few percentiles of a histogram, in seconds.
type Quantiles struct {
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
}
