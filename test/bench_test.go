package test

import (
	"net/http"
	"testing"

	"github.com/egressd/egressd/test/nstest"
)

// BenchmarkNewConnections measures new upstream connections per second
// through egressd, on-link mode against routed mode, side by side in one
// run: every request goes over a new client connection and a new upstream
// connection from a fresh address. On-link mode adds and removes an address
// per connection; routed mode binds to the routed prefix and adds none.
//
// Run it with a fixed count (make bench uses -benchtime 500x): in on-link
// mode the router namespace learns a neighbour entry per address, and the
// kernel's neighbour table (1,024 entries, shared by every namespace of the
// machine, its limits settable only in the machine's own namespace) cannot
// drop an entry until it went stale (about a second on R's link, see
// nstest.New), so several hundred new addresses a second for longer than a
// few seconds overflow it and connections stall.
// A provider's router has a limit of its own too: one more reason for
// routed mode where the network allows it.
func BenchmarkNewConnections(b *testing.B) {
	for _, mode := range []struct {
		name string
		args []string
	}{
		{"onlink", nil},
		{"routed", []string{"-mode", "routed", "-prefix", routedPrefix.String()}},
	} {
		b.Run(mode.name, func(b *testing.B) {
			e := setup(b)
			e.tp.Router.Run(b, "ip", "-6", "route", "add", routedPrefix.String(), "via", nstest.HostAddr.String(), "dev", e.tp.RouterLink)
			e.restart(b, mode.args...)
			c := e.tp.Host.NewClient(b, proxyAddr, e.up.RootCAs, false)
			ctx := guardCtx(b)
			b.ResetTimer()
			for b.Loop() {
				code, _, err := c.Fetch(ctx, e.up.HTTPURL)
				if err != nil || code != http.StatusOK {
					b.Fatalf("status %d: %v", code, err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conns/s")
		})
	}
}
