package stats

import (
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// Upstream holds the live counters of one upstream host. All fields but
// Name, which is set once, are safe for concurrent use.
type Upstream struct {
	Name string // host, lower-case, no port

	rule atomic.Pointer[string] // Host of the -limit rule that applied last; nil: none

	Requests  atomic.Uint64 // requests and tunnels that reached our shaper
	IPv4      atomic.Uint64 // of those, the ones that left from the host's own IPv4 address (-ipv4 direct)
	InFlight  atomic.Int64  // admitted, not finished
	Waiting   atomic.Int64  // waiting in the shaper's line now
	WaitNanos atomic.Int64  // total time spent waiting in line
	Rejected  atomic.Uint64 // answered 429 by egressd
	Throttled atomic.Uint64 // upstream answered 429 (or 503 with Retry-After)
	Errors    atomic.Uint64 // 502/503/504 from egressd, and aborted responses
	BytesUp   atomic.Uint64 // client -> upstream
	BytesDown atomic.Uint64 // upstream -> client
	Latency   Histogram     // admission to response head, or to the tunnel being open
}

// Rule returns the Host of the -limit rule that applied to u's last
// request, "" if none.
func (u *Upstream) Rule() string {
	if p := u.rule.Load(); p != nil {
		return *p
	}
	return ""
}

// setRule records the rule that applies now: after a reload it may differ
// from the one the entry was created with. It allocates only when the rule
// changed.
func (u *Upstream) setRule(rule string) {
	if u.Rule() == rule {
		return
	}
	// A variable of its own, so that only this branch allocates; the clone
	// because rule may point into a request's buffers.
	r := strings.Clone(rule)
	u.rule.Store(&r)
}

// Stats returns a snapshot of u's counters.
func (u *Upstream) Stats() UpstreamStats {
	h := u.Latency.Snapshot()
	return UpstreamStats{
		Upstream: u.Name,
		Rule:     u.Rule(),
		Counters: Counters{
			Requests:    u.Requests.Load(),
			IPv4:        u.IPv4.Load(),
			InFlight:    u.InFlight.Load(),
			Waiting:     u.Waiting.Load(),
			WaitSeconds: time.Duration(u.WaitNanos.Load()).Seconds(),
			Rejected:    u.Rejected.Load(),
			Throttled:   u.Throttled.Load(),
			Errors:      u.Errors.Load(),
			BytesUp:     u.BytesUp.Load(),
			BytesDown:   u.BytesDown.Load(),
		},
		Latency:          h.Quantiles(),
		LatencyHistogram: h,
	}
}

// OtherName is the name of the entry that hosts share once the Registry is
// full, and that takes hosts which are not valid names (empty, not UTF-8).
const OtherName = "(other)"

// DefaultMaxUpstreams is the cap NewRegistry uses when given none.
const DefaultMaxUpstreams = 1000

// Registry maps hosts to their Upstream. It holds at most max named hosts;
// later hosts share one entry named OtherName, so that the number of series
// in the exposition stays bounded whatever clients ask for.
type Registry struct {
	max int

	mu    sync.RWMutex
	hosts map[string]*Upstream

	other     Upstream
	otherUsed atomic.Bool // other is only listed once some host maps to it
}

// NewRegistry returns an empty Registry that names at most max hosts
// (DefaultMaxUpstreams if max <= 0).
func NewRegistry(max int) *Registry {
	if max <= 0 {
		max = DefaultMaxUpstreams
	}
	r := &Registry{max: max, hosts: make(map[string]*Upstream)}
	r.other.Name = OtherName
	return r
}

// Upstream returns the entry of host, creating it if host is new and the
// Registry has room, and records rule as the rule that applies to it (the
// rules change on reload). host must not carry a port; it is lower-cased.
// The shared OtherName entry has no rule.
//
// For a host already known (and for any host once the Registry is full) it
// takes only a read lock and does not allocate unless the rule changed.
func (r *Registry) Upstream(host, rule string) *Upstream {
	if !utf8.ValidString(host) {
		return r.useOther()
	}
	host = strings.ToLower(host) // returns host itself when already lower-case ASCII
	if host == "" || host == OtherName {
		return r.useOther()
	}

	r.mu.RLock()
	u, ok := r.hosts[host]
	full := len(r.hosts) >= r.max
	r.mu.RUnlock()
	if ok {
		u.setRule(rule)
		return u
	}
	if full {
		return r.useOther()
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	if u, ok := r.hosts[host]; ok {
		u.setRule(rule)
		return u
	}
	if len(r.hosts) >= r.max {
		return r.useOther()
	}
	// Clone: host may point into a request's buffers, which the entry
	// would otherwise keep alive.
	u = &Upstream{Name: strings.Clone(host)}
	u.setRule(rule)
	r.hosts[u.Name] = u
	return u
}

func (r *Registry) useOther() *Upstream {
	if !r.otherUsed.Load() {
		r.otherUsed.Store(true)
	}
	return &r.other
}

// Snapshot returns the counters of every entry, sorted by name. The
// OtherName entry is included once a host has been mapped to it.
func (r *Registry) Snapshot() []UpstreamStats {
	r.mu.RLock()
	ups := make([]*Upstream, 0, len(r.hosts)+1)
	for _, u := range r.hosts {
		ups = append(ups, u)
	}
	r.mu.RUnlock()
	if r.otherUsed.Load() {
		ups = append(ups, &r.other)
	}

	out := make([]UpstreamStats, len(ups))
	for i, u := range ups {
		out[i] = u.Stats()
	}
	slices.SortFunc(out, func(a, b UpstreamStats) int { return strings.Compare(a.Upstream, b.Upstream) })
	return out
}
