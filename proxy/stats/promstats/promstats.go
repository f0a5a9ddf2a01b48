// Package promstats serves egressd's statistics to Prometheus: a
// prometheus.Collector that reads a stats.Stats snapshot at scrape time, and
// the promhttp handler of the admin API's GET /metrics.
//
// It is a package of its own, apart from proxy/stats, so that what only
// decodes the JSON of /stats (egressctl) does not link client_golang. The
// proxy's hot path never sees it: the counters are stats' atomics, and
// nothing is registered per request or per upstream.
package promstats

import (
	"net/http"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/egressd/egressd/proxy/stats"
)

// Family describes one metric family of the exposition.
type Family struct {
	Name string
	Type string // counter, gauge or histogram
	Help string
}

// Series lists every metric family the Collector describes. It is what the
// README's list of series is made from.
var Series = func() []Family {
	fs := make([]Family, len(families))
	for i, f := range families {
		fs[i] = f.Family
	}
	return fs
}()

// Handler serves the Prometheus exposition of the Stats that snapshot
// returns, taken once per scrape, through a registry of its own (no Go
// runtime or process series, nothing on the default registry).
func Handler(snapshot func() *stats.Stats) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(snapshot))
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.HTTPErrorOnError})
}

// Collector is a prometheus.Collector over a stats snapshot. Upstream series
// carry the label upstream; egress addresses are never a label.
type Collector struct {
	snapshot func() *stats.Stats
}

var _ prometheus.Collector = (*Collector)(nil)

// NewCollector returns a Collector that calls snapshot once per Collect.
func NewCollector(snapshot func() *stats.Stats) *Collector {
	return &Collector{snapshot: snapshot}
}

// Describe sends the descriptor of every family in Series.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for i := range families {
		ch <- families[i].desc
	}
}

// Collect takes a snapshot and sends its samples. A family without samples
// (no upstream yet, no budget in routed mode) sends none.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	s := c.snapshot()
	for i := range families {
		f := &families[i]
		f.collect(f, ch, s)
	}
}

// family is a Family, its descriptor and how to collect its samples.
type family struct {
	Family
	desc    *prometheus.Desc
	collect func(f *family, ch chan<- prometheus.Metric, s *stats.Stats)
}

func newFamily(name, typ, help string, labels []string, collect func(*family, chan<- prometheus.Metric, *stats.Stats)) family {
	return family{
		Family:  Family{Name: name, Type: typ, Help: help},
		desc:    prometheus.NewDesc(name, help, labels, nil),
		collect: collect,
	}
}

// valueType is the prometheus type of a counter or gauge family.
func (f *family) valueType() prometheus.ValueType {
	if f.Type == "counter" {
		return prometheus.CounterValue
	}
	return prometheus.GaugeValue
}

// sample sends one counter or gauge sample.
func (f *family) sample(ch chan<- prometheus.Metric, v float64, labels ...string) {
	ch <- prometheus.MustNewConstMetric(f.desc, f.valueType(), v, labels...)
}

// histogram sends h as a histogram sample; one without buckets (as in a
// Stats decoded from JSON) has its +Inf bucket only.
func (f *family) histogram(ch chan<- prometheus.Metric, h *stats.HistogramSnapshot, labels ...string) {
	buckets := make(map[float64]uint64, len(h.Bounds))
	var cum uint64
	for i, b := range h.Bounds {
		if i < len(h.Counts) {
			cum += h.Counts[i]
		}
		buckets[b] = cum
	}
	ch <- prometheus.MustNewConstHistogram(f.desc, h.Count, h.Sum, buckets, labels...)
}

// upstreamLabel is a host as a label value, which must be UTF-8: invalid
// bytes (which the Registry keeps out of names) become U+FFFD.
func upstreamLabel(host string) string { return strings.ToValidUTF8(host, "\uFFFD") }

var upstreamLabels = []string{"upstream"}

// upstreamFamily has one sample per upstream.
func upstreamFamily(name, typ, help string, value func(*stats.UpstreamStats) float64) family {
	return newFamily(name, typ, help, upstreamLabels, func(f *family, ch chan<- prometheus.Metric, s *stats.Stats) {
		for i := range s.Upstreams {
			u := &s.Upstreams[i]
			f.sample(ch, value(u), upstreamLabel(u.Upstream))
		}
	})
}

// plainFamily has one sample without labels.
func plainFamily(name, typ, help string, value func(*stats.Stats) float64) family {
	return newFamily(name, typ, help, nil, func(f *family, ch chan<- prometheus.Metric, s *stats.Stats) {
		f.sample(ch, value(s))
	})
}

// budgetFamily has one gauge sample without labels, or none without a
// budget (routed mode).
func budgetFamily(name, help string, value func(*stats.Budget) float64) family {
	return newFamily(name, "gauge", help, nil, func(f *family, ch chan<- prometheus.Metric, s *stats.Stats) {
		if b := s.Addresses.Budget; b != nil {
			f.sample(ch, value(b))
		}
	})
}

// storeFamily has one sample without labels, or none without a limit
// store.
func storeFamily(name, typ, help string, value func(*stats.LimitStore) float64) family {
	return newFamily(name, typ, help, nil, func(f *family, ch chan<- prometheus.Metric, s *stats.Stats) {
		if l := s.LimitStore; l != nil {
			f.sample(ch, value(l))
		}
	})
}

// subnetFamily has one sample per /64 of AddressStats.Subnets: a bounded
// set, never one per address.
func subnetFamily(name, typ, help string, value func(*stats.Subnet) float64) family {
	return newFamily(name, typ, help, []string{"subnet"}, func(f *family, ch chan<- prometheus.Metric, s *stats.Stats) {
		for i := range s.Addresses.Subnets {
			sn := &s.Addresses.Subnets[i]
			f.sample(ch, value(sn), sn.Subnet)
		}
	})
}

// reasonFamily is a counter with one sample per reason, labelled reason,
// every one of names, zeros included.
func reasonFamily(name, help string, names []string, counts func(*stats.Stats) map[string]uint64) family {
	return newFamily(name, "counter", help, []string{"reason"}, func(f *family, ch chan<- prometheus.Metric, s *stats.Stats) {
		m := counts(s)
		for _, r := range names {
			f.sample(ch, float64(m[r]), r)
		}
	})
}

var families = []family{
	upstreamFamily("egress_upstream_requests_total", "counter",
		"Requests and CONNECT tunnels to the upstream host that reached the shaper.",
		func(u *stats.UpstreamStats) float64 { return float64(u.Requests) }),
	upstreamFamily("egress_upstream_ipv4_requests_total", "counter",
		"Requests and CONNECT tunnels to the upstream host that left from egressd's own IPv4 address, because the upstream has no IPv6 address (-ipv4 direct).",
		func(u *stats.UpstreamStats) float64 { return float64(u.IPv4) }),
	upstreamFamily("egress_upstream_requests_in_flight", "gauge",
		"Requests and tunnels to the upstream host admitted by the shaper and not finished.",
		func(u *stats.UpstreamStats) float64 { return float64(u.InFlight) }),
	upstreamFamily("egress_upstream_requests_waiting", "gauge",
		"Requests and tunnels to the upstream host waiting in the shaper's line.",
		func(u *stats.UpstreamStats) float64 { return float64(u.Waiting) }),
	upstreamFamily("egress_upstream_wait_seconds_total", "counter",
		"Time requests to the upstream host spent waiting in the shaper's line.",
		func(u *stats.UpstreamStats) float64 { return u.WaitSeconds }),
	upstreamFamily("egress_upstream_rejected_total", "counter",
		"Requests to the upstream host that egressd answered with 429.",
		func(u *stats.UpstreamStats) float64 { return float64(u.Rejected) }),
	upstreamFamily("egress_upstream_throttled_total", "counter",
		"Responses of the upstream host with status 429, or 503 with Retry-After.",
		func(u *stats.UpstreamStats) float64 { return float64(u.Throttled) }),
	upstreamFamily("egress_upstream_errors_total", "counter",
		"Requests to the upstream host that egressd answered with 502, 503 or 504, and aborted responses.",
		func(u *stats.UpstreamStats) float64 { return float64(u.Errors) }),
	upstreamFamily("egress_upstream_sent_bytes_total", "counter",
		"Bytes sent from clients to the upstream host.",
		func(u *stats.UpstreamStats) float64 { return float64(u.BytesUp) }),
	upstreamFamily("egress_upstream_received_bytes_total", "counter",
		"Bytes received from the upstream host and passed to clients.",
		func(u *stats.UpstreamStats) float64 { return float64(u.BytesDown) }),
	newFamily("egress_upstream_request_duration_seconds", "histogram",
		"Time from admission by the shaper to the upstream host's response head, or to the CONNECT tunnel being open.",
		upstreamLabels, func(f *family, ch chan<- prometheus.Metric, s *stats.Stats) {
			for i := range s.Upstreams {
				u := &s.Upstreams[i]
				f.histogram(ch, &u.LatencyHistogram, upstreamLabel(u.Upstream))
			}
		}),

	plainFamily("egress_address_live", "gauge",
		"Egress addresses on the interface, in any state.",
		func(s *stats.Stats) float64 { return float64(s.Addresses.Live) }),
	plainFamily("egress_address_ready", "gauge",
		"Egress addresses added and not yet used.",
		func(s *stats.Stats) float64 { return float64(s.Addresses.Ready) }),
	plainFamily("egress_address_in_use", "gauge",
		"Egress addresses bound by an open connection.",
		func(s *stats.Stats) float64 { return float64(s.Addresses.InUse) }),
	plainFamily("egress_address_warm", "gauge",
		"Egress addresses used within the neighbour window and released: reused past the budget, removed once unused for the window.",
		func(s *stats.Stats) float64 { return float64(s.Addresses.Warm) }),
	plainFamily("egress_address_fresh_total", "counter",
		"Egress addresses handed out never used before.",
		func(s *stats.Stats) float64 { return float64(s.Addresses.Fresh) }),
	plainFamily("egress_address_reused_total", "counter",
		"Warm egress addresses handed out again, past the new-address budget.",
		func(s *stats.Stats) float64 { return float64(s.Addresses.Reused) }),
	plainFamily("egress_address_retries_total", "counter",
		"Connections from a never-used egress address that got no answer at first and were made again from a warm one.",
		func(s *stats.Stats) float64 { return float64(s.Addresses.Retries) }),
	plainFamily("egress_address_overflows_total", "counter",
		"Retries from a warm address that worked: the router's neighbour table taken as full, and the new-address rate lowered.",
		func(s *stats.Stats) float64 { return float64(s.Addresses.Overflows) }),
	budgetFamily("egress_address_budget_rate",
		"Never-used egress addresses a second the budget allows now (-new-addrs; lower for a while after an overflow).",
		func(b *stats.Budget) float64 { return b.Rate }),
	budgetFamily("egress_address_budget_max_rate",
		"Never-used egress addresses a second set by -new-addrs.",
		func(b *stats.Budget) float64 { return b.MaxRate }),
	budgetFamily("egress_address_budget_burst",
		"Never-used egress addresses the budget allows at once beyond its rate (-new-addrs burst).",
		func(b *stats.Budget) float64 { return float64(b.Burst) }),
	budgetFamily("egress_address_budget_cap",
		"Most distinct egress addresses used within the neighbour window that still let a never-used one be handed out.",
		func(b *stats.Budget) float64 { return float64(b.Cap) }),
	budgetFamily("egress_address_budget_window_seconds",
		"How long the router is taken to remember an egress address after its last use (-neigh-window).",
		func(b *stats.Budget) float64 { return b.WindowSeconds }),
	plainFamily("egress_address_added_total", "counter",
		"Egress addresses added to the interface.",
		func(s *stats.Stats) float64 { return float64(s.Addresses.Added) }),
	plainFamily("egress_address_removed_total", "counter",
		"Egress addresses removed from the interface.",
		func(s *stats.Stats) float64 { return float64(s.Addresses.Removed) }),
	plainFamily("egress_address_add_failures_total", "counter",
		"Failures to add an egress address to the interface.",
		func(s *stats.Stats) float64 { return float64(s.Addresses.AddFailures) }),
	plainFamily("egress_address_remove_failures_total", "counter",
		"Failures to remove an egress address from the interface.",
		func(s *stats.Stats) float64 { return float64(s.Addresses.RemoveFailures) }),
	plainFamily("egress_address_lost_total", "counter",
		"Egress addresses that somebody else removed from the interface while egressd held them.",
		func(s *stats.Stats) float64 { return float64(s.Addresses.Lost) }),
	newFamily("egress_address_add_duration_seconds", "histogram",
		"Time to add an egress address to the interface.",
		nil, func(f *family, ch chan<- prometheus.Metric, s *stats.Stats) {
			f.histogram(ch, &s.Addresses.AddLatencyHistogram)
		}),

	subnetFamily("egress_subnet_connections_total", "counter",
		"Upstream connections made from the /64 of the egress prefixes, since egressd began to count it apart: at most 256 /64s, those with connections open and then those used last; the others are counted together as subnet=\"(other)\".",
		func(s *stats.Subnet) float64 { return float64(s.Conns) }),
	subnetFamily("egress_subnet_open_connections", "gauge",
		"Upstream connections open from the /64 of the egress prefixes (the same /64s as egress_subnet_connections_total).",
		func(s *stats.Subnet) float64 { return float64(s.Open) }),

	plainFamily("egress_client_connections", "gauge",
		"Client connections open, HTTP and SOCKS5.",
		func(s *stats.Stats) float64 { return float64(s.Clients.Connections) }),
	reasonFamily("egress_client_refused_total",
		"Clients refused or cut off by egressd, by reason: a connection or address cap, a timeout, a malformed request or body, a failed or throttled login.",
		stats.Refusals, func(s *stats.Stats) map[string]uint64 { return s.Clients.Refused }),
	plainFamily("egress_client_accept_errors_total", "counter",
		"Failed accepts of client connections, such as file descriptors running out.",
		func(s *stats.Stats) float64 { return float64(s.Clients.AcceptErrors) }),

	plainFamily("egress_session_open", "gauge",
		"Sessions open (-rotate session), each holding one egress address.",
		func(s *stats.Stats) float64 { return float64(s.Sessions.Open) }),
	reasonFamily("egress_session_rotations_total",
		"Sessions that gave up their egress address for a new one, by reason: the X-Egress-Rotate header, a user name session-KEY-rotate, the admin API, an upstream status of -rotate-on.",
		stats.RotateReasons, func(s *stats.Stats) map[string]uint64 { return s.Sessions.Rotations }),
	storeFamily("egress_limit_store_up", "gauge",
		"1 while the limit store (-limit-store) answers and -limit budgets are shared, 0 while each egressd enforces every rule alone.",
		func(l *stats.LimitStore) float64 { return boolValue(l.Shared) }),
	storeFamily("egress_limit_store_decisions_total", "counter",
		"Shaping decisions the limit store answered.",
		func(l *stats.LimitStore) float64 { return float64(l.Decisions) }),
	storeFamily("egress_limit_store_local_decisions_total", "counter",
		"Shaping decisions made in-process because the limit store did not answer.",
		func(l *stats.LimitStore) float64 { return float64(l.LocalDecisions) }),
	storeFamily("egress_limit_store_errors_total", "counter",
		"Calls to the limit store that failed or timed out.",
		func(l *stats.LimitStore) float64 { return float64(l.Errors) }),
	storeFamily("egress_limit_store_fallbacks_total", "counter",
		"Times the limit store stopped answering and decisions went in-process.",
		func(l *stats.LimitStore) float64 { return float64(l.Fallbacks) }),

	plainFamily("egress_uptime_seconds", "gauge",
		"Time since egressd started.",
		func(s *stats.Stats) float64 { return s.UptimeSeconds }),
	plainFamily("egress_start_time_seconds", "gauge",
		"Start time of egressd since the Unix epoch.",
		func(s *stats.Stats) float64 { return float64(s.Started.UnixNano()) / 1e9 }),
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
