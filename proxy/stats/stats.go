// Package stats is egressd's per-upstream accounting: live counters that the
// proxy updates on its hot path (Upstream, Histogram), and the JSON documents the
// admin API serves and egressctl decodes (Stats, Addr). Their Prometheus
// exposition is package promstats', which this package does not import, so
// that decoding the documents does not link client_golang.
//
// The counters are atomics, so the proxy never takes a lock to count, and
// Registry.Upstream does not allocate for a host it has seen. Series are
// labelled by upstream host only, never by egress address, and the number of
// hosts is capped (see NewRegistry) so that a client cannot grow the
// exposition without bound.
package stats

import (
	"time"
)

// Stats is the JSON document of GET /stats.
type Stats struct {
	Started       time.Time       `json:"started"`
	UptimeSeconds float64         `json:"uptime_seconds"`
	Totals        Counters        `json:"totals"`
	Upstreams     []UpstreamStats `json:"upstreams"`
	Addresses     AddressStats    `json:"addresses"`
	Clients       ClientStats     `json:"clients"`
	Sessions      SessionStats    `json:"sessions"`
	// LimitStore is the store of shared budgets (-limit-store); nil
	// without one.
	LimitStore *LimitStore `json:"limit_store,omitempty"`
}

// LimitStore describes the store that -limit budgets are shared through.
type LimitStore struct {
	Store string `json:"store"` // the URL, its password replaced by xxxxx
	// Shared is whether decisions go to the store now; false while it does
	// not answer and this egressd enforces every rule alone.
	Shared bool      `json:"shared"`
	Since  time.Time `json:"since"` // when Shared last changed, or the start
	// Decisions counts answers of the store; LocalDecisions decisions made
	// in-process because it did not answer; Errors store calls that failed
	// or timed out; Fallbacks the times decisions went in-process.
	Decisions      uint64 `json:"decisions"`
	LocalDecisions uint64 `json:"local_decisions"`
	Errors         uint64 `json:"errors"`
	Fallbacks      uint64 `json:"fallbacks"`
	LastError      string `json:"last_error,omitempty"`
}

// Counters are what egressd counts per upstream (see Upstream for what each
// counts): one upstream's in UpstreamStats, all upstreams' added up in
// Stats.Totals.
type Counters struct {
	Requests    uint64  `json:"requests"`
	IPv4        uint64  `json:"ipv4"`
	InFlight    int64   `json:"in_flight"`
	Waiting     int64   `json:"waiting"`
	WaitSeconds float64 `json:"wait_seconds"`
	Rejected    uint64  `json:"rejected"`
	Throttled   uint64  `json:"throttled"`
	Errors      uint64  `json:"errors"`
	BytesUp     uint64  `json:"bytes_up"`
	BytesDown   uint64  `json:"bytes_down"`
}

// SumTotals adds up the counters of ups.
func SumTotals(ups []UpstreamStats) Counters {
	var t Counters
	for _, u := range ups {
		t.Requests += u.Requests
		t.IPv4 += u.IPv4
		t.InFlight += u.InFlight
		t.Waiting += u.Waiting
		t.WaitSeconds += u.WaitSeconds
		t.Rejected += u.Rejected
		t.Throttled += u.Throttled
		t.Errors += u.Errors
		t.BytesUp += u.BytesUp
		t.BytesDown += u.BytesDown
	}
	return t
}

// UpstreamStats is a snapshot of one Upstream. In its JSON the counters sit
// beside upstream and rule, not in an object of their own.
type UpstreamStats struct {
	Upstream string `json:"upstream"`
	Rule     string `json:"rule,omitempty"`
	Counters
	Latency Quantiles `json:"latency_seconds"`
	// LatencyHistogram feeds the Prometheus histogram; it is not part of
	// the JSON, so it is empty in a Stats decoded from it.
	LatencyHistogram HistogramSnapshot `json:"-"`
}

// AddressStats describes the pool of egress addresses.
type AddressStats struct {
	Live  int `json:"live"`   // on the interface now, in any state
	Ready int `json:"ready"`  // added, not yet used
	InUse int `json:"in_use"` // bound by an open connection
	// Warm addresses were used and released within the neighbour window:
	// reused past the budget, removed once unused for the window.
	Warm int `json:"warm"`

	// Fresh counts addresses handed out never used before, Reused warm
	// ones handed out again past the budget.
	Fresh  uint64 `json:"fresh"`
	Reused uint64 `json:"reused"`
	// Retries counts connections from a never-used address that got no
	// answer at first and were made again from a warm address; Overflows
	// those of them that worked then: the router's neighbour table taken
	// as full, and the new-address rate lowered.
	Retries   uint64 `json:"retries"`
	Overflows uint64 `json:"overflows"`
	// Budget is the neighbour budget in force (on-link mode); nil without
	// one (routed mode).
	Budget *Budget `json:"budget,omitempty"`

	Added          uint64 `json:"added"`
	Removed        uint64 `json:"removed"`
	AddFailures    uint64 `json:"add_failures"`
	RemoveFailures uint64 `json:"remove_failures"`
	// Lost counts addresses that somebody else removed from the
	// interface while egressd held them.
	Lost uint64 `json:"lost"`

	AddLatency Quantiles `json:"add_latency_seconds"`
	// AddLatencyHistogram feeds the Prometheus histogram; it is not part of
	// the JSON.
	AddLatencyHistogram HistogramSnapshot `json:"-"`

	// Subnets counts upstream connections per /64 of the egress prefixes,
	// in address order: at most 256 /64s, those with connections open and
	// then those used last; the connections of the others are counted
	// together in a last entry named OtherSubnet, present once it counts
	// any.
	Subnets []Subnet `json:"subnets,omitempty"`
}

// OtherSubnet is the name of the entry that counts the connections of the
// /64s past the bound of AddressStats.Subnets.
const OtherSubnet = "(other)"

// Subnet is the count of upstream connections from one /64.
type Subnet struct {
	Subnet string `json:"subnet"` // 2001:db8:1:2::/64, or OtherSubnet
	// Conns counts the connections made from the /64 since egressd began
	// to count it apart; Open those open now.
	Conns uint64 `json:"conns"`
	Open  int    `json:"open"`
}

// Budget is the neighbour budget in force: how many never-used addresses
// egressd hands out (see -new-addrs and -neigh-window).
type Budget struct {
	// Rate is the never-used addresses a second allowed now; MaxRate the
	// rate set, which Rate is below for a while after an overflow.
	Rate    float64 `json:"rate"`
	MaxRate float64 `json:"max_rate"`
	Burst   int     `json:"burst"`
	// Cap is the most distinct addresses used within the window that still
	// let a never-used one be handed out: Burst + Rate x Window.
	Cap           int     `json:"cap"`
	WindowSeconds float64 `json:"window_seconds"`
}

// Addr is one element of the JSON array of GET /addrs.
type Addr struct {
	Addr       string    `json:"addr"`
	State      string    `json:"state"` // ready, in-use, warm, adding, removing
	Since      time.Time `json:"since"`
	AgeSeconds float64   `json:"age_seconds"`
}
