package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"time"

	"github.com/egressd/egressd/internal/admin"
	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy"
	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/stats"
	"github.com/egressd/egressd/proxy/stats/promstats"
)

// statsSource assembles what the admin API reports.
type statsSource struct {
	started    time.Time
	srv        *proxy.Server
	pool       *netutil.Pool
	addLatency *stats.Histogram
	shared     *shape.Shared // -limit-store; nil without
}

// adminHandler is the admin API over s; reload serves POST /reload.
func (s *statsSource) adminHandler(reload func() (string, error)) http.Handler {
	return admin.NewHandler(admin.Config{
		Stats:   s.Stats,
		Addrs:   s.Addrs,
		Metrics: promstats.Handler(s.Stats),
		Reload:  reload,
		Rotate:  s.Rotate,
	})
}

// Rotate serves POST /sessions/KEY/rotate: the proxy's errors become the
// admin API's.
func (s *statsSource) Rotate(ctx context.Context, key string) (bool, netip.Addr, error) {
	old, rotated, err := s.srv.RotateSession(ctx, key)
	switch {
	case errors.Is(err, proxy.ErrNoSession):
		err = fmt.Errorf("%w: %w", admin.ErrNoSession, err)
	case errors.Is(err, proxy.ErrNoSessions):
		err = fmt.Errorf("%w: %w", admin.ErrNoSessions, err)
	}
	return rotated, old, err
}

func (s *statsSource) Stats() *stats.Stats {
	ups := s.srv.Upstreams()
	ps := s.pool.Stats()
	h := s.addLatency.Snapshot()
	return &stats.Stats{
		Started:       s.started,
		UptimeSeconds: time.Since(s.started).Seconds(),
		Totals:        stats.SumTotals(ups),
		Upstreams:     ups,
		Addresses: stats.AddressStats{
			Live:                ps.Live,
			Ready:               ps.Ready,
			InUse:               ps.InUse,
			Warm:                ps.Warm,
			Fresh:               ps.Fresh,
			Reused:              ps.Reused,
			Retries:             ps.Retries,
			Overflows:           ps.Overflows,
			Budget:              budgetStats(ps.Budget),
			Added:               ps.Added,
			Removed:             ps.Removed,
			AddFailures:         ps.AddFailures,
			RemoveFailures:      ps.RemoveFailures,
			Lost:                ps.Lost,
			AddLatency:          h.Quantiles(),
			AddLatencyHistogram: h,
			Subnets:             subnetStats(ps.Subnets, ps.OtherSubnets),
		},
		Clients:    s.srv.ClientStats(),
		Sessions:   s.srv.SessionStats(),
		LimitStore: limitStoreStats(s.shared),
	}
}

// limitStoreStats is the state of -limit-store as /stats has it; nil
// without one.
func limitStoreStats(sh *shape.Shared) *stats.LimitStore {
	if sh == nil {
		return nil
	}
	st := sh.Stats()
	return &stats.LimitStore{Store: st.Store, Shared: st.Shared, Since: st.Since, Decisions: st.Decisions,
		LocalDecisions: st.LocalDecisions, Errors: st.Errors, Fallbacks: st.Fallbacks, LastError: st.LastError}
}

// budgetStats is the pool's budget in force as /stats has it; nil without
// one (routed mode).
func budgetStats(b *netutil.BudgetStats) *stats.Budget {
	if b == nil {
		return nil
	}
	return &stats.Budget{Rate: b.Rate, MaxRate: b.MaxRate, Burst: b.Burst, Cap: b.Cap, WindowSeconds: b.Window.Seconds()}
}

// subnetStats is the pool's count of connections per /64 as /stats has
// it: the others last, once they count any.
func subnetStats(list []netutil.SubnetStats, others netutil.SubnetStats) []stats.Subnet {
	out := make([]stats.Subnet, 0, len(list)+1)
	for _, s := range list {
		out = append(out, stats.Subnet{Subnet: s.Subnet.String(), Conns: s.Conns, Open: s.Open})
	}
	if others.Conns > 0 || others.Open > 0 {
		out = append(out, stats.Subnet{Subnet: stats.OtherSubnet, Conns: others.Conns, Open: others.Open})
	}
	return out
}

func (s *statsSource) Addrs() []stats.Addr {
	now := time.Now()
	list := s.pool.Addrs()
	out := make([]stats.Addr, 0, len(list))
	for _, a := range list {
		added := a.Added
		if added.IsZero() {
			added = a.Since // still being added
		}
		out = append(out, stats.Addr{
			Addr:       a.Addr.String(),
			State:      a.State.String(),
			Since:      added,
			AgeSeconds: now.Sub(added).Seconds(),
		})
	}
	slices.SortFunc(out, func(a, b stats.Addr) int { return a.Since.Compare(b.Since) })
	return out
}
