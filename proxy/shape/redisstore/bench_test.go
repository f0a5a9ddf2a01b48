package redisstore

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/proxy/shape"
)

// benchRule lets every request through at once: the benchmarks measure the
// decision, not the waiting.
const benchRule = "*.test=1000000r/s,burst=1000000"

// benchShaper is a shaper of benchRule, sharing its budgets through url
// when it is not empty.
func benchShaper(b *testing.B, url string) *shape.Shaper {
	b.Helper()
	rule, err := shape.ParseRule(benchRule)
	require.NoError(b, err)
	cfg := shape.Config{Rules: []shape.Rule{rule}}
	if url != "" {
		store, err := Open(url, time.Second, nil)
		require.NoError(b, err)
		b.Cleanup(func() { store.Close() })
		cfg.Shared = shape.NewShared(shape.SharedConfig{Store: store, Name: store.Name(), Timeout: time.Second})
	}
	s, err := shape.New(cfg)
	require.NoError(b, err)
	return s
}

// BenchmarkDecision is the latency of one shaping decision (Acquire and
// Release of a host that may go at once), in-process and through a Redis
// on loopback, with its 50th and 99th percentiles.
func BenchmarkDecision(b *testing.B) {
	srv := startRedis(b, "")
	for _, tt := range []struct{ name, url string }{{"in-process", ""}, {"redis", srv.URL()}} {
		b.Run(tt.name, func(b *testing.B) {
			s := benchShaper(b, tt.url)
			ctx := context.Background()
			var lat []time.Duration
			b.ReportAllocs()
			for b.Loop() {
				start := time.Now()
				p, err := s.Acquire(ctx, "h.test")
				if err != nil {
					b.Fatal(err)
				}
				p.Release()
				lat = append(lat, time.Since(start))
			}
			reportQuantiles(b, lat)
		})
	}
}

// BenchmarkThreeInstances is how many decisions a second one Redis serves
// to three egressd instances (three clients), each with 16 requests at
// once: to one upstream host, where each instance's line lets only its head
// ask the store, and to a host per request in flight, where nothing waits
// but Redis.
func BenchmarkThreeInstances(b *testing.B) {
	const instances, perInstance = 3, 16
	srv := startRedis(b, "")
	for _, hosts := range []string{"one host", "many hosts"} {
		b.Run(hosts, func(b *testing.B) {
			var shapers [instances]*shape.Shaper
			for i := range shapers {
				shapers[i] = benchShaper(b, srv.URL())
			}
			var left atomic.Int64
			left.Store(int64(b.N))
			var wg sync.WaitGroup
			ctx := context.Background()
			b.ResetTimer()
			start := time.Now()
			for i := range instances * perInstance {
				host := "h.test"
				if hosts == "many hosts" {
					host = fmt.Sprintf("h%d.test", i)
				}
				s := shapers[i%instances]
				wg.Go(func() {
					for left.Add(-1) >= 0 {
						p, err := s.Acquire(ctx, host)
						if err != nil {
							b.Error(err)
							return
						}
						p.Release()
					}
				})
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "decisions/s")
		})
	}
}

// reportQuantiles reports the 50th and 99th percentiles of lat.
func reportQuantiles(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "p50-ns")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns")
}
