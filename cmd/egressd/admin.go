package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy"
	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/stats"
	"golang.org/x/sys/unix"
)

// defaultAdmin is where the admin API listens unless -admin says otherwise;
// systemd's RuntimeDirectory=egressd makes the directory.
const defaultAdmin = "/run/egressd/admin.sock"

// isUnixAdmin reports whether an -admin value names a unix socket (a path)
// rather than host:port.
func isUnixAdmin(addr string) bool {
	return strings.HasPrefix(addr, "/") || strings.HasPrefix(addr, ".") || !strings.Contains(addr, ":")
}

// listenAdmin opens the admin listener: a unix socket of mode 0600 (its
// directory is made if missing), or a TCP address. A socket left by an
// egressd that was killed is replaced; one that answers belongs to an
// egressd that still runs, and is an error.
func listenAdmin(addr string) (net.Listener, error) {
	if !isUnixAdmin(addr) {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("admin listener %s: %w", addr, unwrapOp(err))
		}
		return ln, nil
	}
	if err := os.MkdirAll(filepath.Dir(addr), 0o755); err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", addr, err)
	}
	if c, err := net.DialTimeout("unix", addr, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("admin socket %s is in use: another egressd runs (give this one its own -admin)", addr)
	} else if errors.Is(err, syscall.ECONNREFUSED) {
		if err := os.Remove(addr); err != nil {
			return nil, fmt.Errorf("admin socket %s: removing the stale socket: %w", addr, err)
		}
	}
	// The umask makes the socket 0600 from its creation on, with no window
	// in which others could connect. Nothing else creates files now.
	old := unix.Umask(0o177)
	ln, err := net.Listen("unix", addr)
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", addr, unwrapOp(err))
	}
	return ln, nil
}

// statsSource assembles what the admin API reports.
type statsSource struct {
	started    time.Time
	srv        *proxy.Server
	pool       *netutil.Pool
	addLatency *stats.Histogram
	shared     *shape.Shared // -limit-store; nil without
}

var _ proxy.StatsSource = (*statsSource)(nil)

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
		},
		Clients:    s.srv.ClientStats(),
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
