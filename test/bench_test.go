package test

import (
	"net/http"
	"net/netip"
	"runtime"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/egressd/egressd/test/nstest"
)

// benchClients is how many clients BenchmarkNewConnections runs at once:
// as many as the load (16 clients, a new HTTPS tunnel per request).
const benchClients = 16

// BenchmarkNewConnections measures new HTTPS tunnels per second through
// egressd with default flags, on-link mode against routed mode, side by
// side in one run, against a router with the kernel's default neighbour
// settings: 16 clients, each opening a new CONNECT tunnel per request (a
// TLS handshake and one GET through it). On-link mode spends never-used
// addresses within its neighbour budget (each one added to the interface)
// and reuses warm ones past it; routed mode binds to the routed prefix and
// adds none. Besides the rate it reports egressd's CPU time per 1,000
// tunnels, failed requests, and the peak of the router's neighbour entries
// for the egress prefix, sampled every second.
//
// make bench runs it with -benchtime 5000x: enough to go well past the
// budget's burst (96 never-used addresses) into the warm regime.
func BenchmarkNewConnections(b *testing.B) {
	heavyOnLink.Lock()
	defer heavyOnLink.Unlock()
	for _, mode := range []struct {
		name   string
		prefix netip.Prefix
		args   []string
	}{
		{"onlink", nstest.Prefix, nil},
		{"routed", routedPrefix, []string{"-mode", "routed", "-prefix", routedPrefix.String()}},
	} {
		b.Run(mode.name, func(b *testing.B) {
			e := setup(b)
			e.tp.Router.Run(b, "ip", "-6", "route", "add", routedPrefix.String(), "via", nstest.HostAddr.String(), "dev", e.tp.RouterLink)
			e.restart(b, mode.args...)
			ctx := guardCtx(b)
			stopNeigh := e.tp.WatchNeighbours(mode.prefix, time.Second)
			var failed atomic.Int64
			cpu0 := cpuTime(b, e.ed.Pid)
			b.SetParallelism(max(1, benchClients/runtime.GOMAXPROCS(0)))
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				c := e.tp.Host.NewClient(b, proxyAddr, e.up.RootCAs, false)
				for pb.Next() {
					if code, _, err := c.Fetch(ctx, e.up.HTTPSURL); err != nil || code != http.StatusOK {
						failed.Add(1)
					}
				}
			})
			b.StopTimer()
			cpu := cpuTime(b, e.ed.Pid) - cpu0
			peak := slices.Max(stopNeigh())
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tunnels/s")
			b.ReportMetric(float64(cpu.Milliseconds())*1000/float64(b.N), "cpu-ms/1000")
			b.ReportMetric(float64(failed.Load()), "errors")
			b.ReportMetric(float64(peak), "router-neigh-peak")
			if n := failed.Load(); n > 0 {
				b.Errorf("%d of %d requests failed", n, b.N)
			}
		})
	}
}
