package stats

import (
	"bufio"
	"io"
	"strconv"
	"strings"
)

// ContentType is the Content-Type of what WritePrometheus writes.
const ContentType = "text/plain; version=0.0.4; charset=utf-8"

// Family describes one metric family of the exposition.
type Family struct {
	Name string
	Type string // counter, gauge or histogram
	Help string
}

// family is a Family and how to write its samples.
type family struct {
	Family
	write func(*promWriter, *Stats)
}

// upstreamFamily writes one sample per upstream.
func upstreamFamily(name, typ, help string, value func(*UpstreamStats) string) family {
	return family{Family{name, typ, help}, func(p *promWriter, s *Stats) {
		for i := range s.Upstreams {
			u := &s.Upstreams[i]
			p.sample(name, upstreamLabel(u.Upstream), value(u))
		}
	}}
}

// plainFamily writes one sample without labels.
func plainFamily(name, typ, help string, value func(*Stats) string) family {
	return family{Family{name, typ, help}, func(p *promWriter, s *Stats) {
		p.sample(name, "", value(s))
	}}
}

// budgetFamily writes one sample without labels, or none without a budget
// (routed mode).
func budgetFamily(name, help string, value func(*Budget) string) family {
	return family{Family{name, "gauge", help}, func(p *promWriter, s *Stats) {
		if b := s.Addresses.Budget; b != nil {
			p.sample(name, "", value(b))
		}
	}}
}

// storeFamily writes one sample without labels, or none without a limit
// store.
func storeFamily(name, typ, help string, value func(*LimitStore) string) family {
	return family{Family{name, typ, help}, func(p *promWriter, s *Stats) {
		if l := s.LimitStore; l != nil {
			p.sample(name, "", value(l))
		}
	}}
}

var families = []family{
	upstreamFamily("egress_upstream_requests_total", "counter",
		"Requests and CONNECT tunnels to the upstream host that reached the shaper.",
		func(u *UpstreamStats) string { return fmtUint(u.Requests) }),
	upstreamFamily("egress_upstream_ipv4_requests_total", "counter",
		"Requests and CONNECT tunnels to the upstream host that left from egressd's own IPv4 address, because the upstream has no IPv6 address (-ipv4 direct).",
		func(u *UpstreamStats) string { return fmtUint(u.IPv4) }),
	upstreamFamily("egress_upstream_requests_in_flight", "gauge",
		"Requests and tunnels to the upstream host admitted by the shaper and not finished.",
		func(u *UpstreamStats) string { return fmtInt(u.InFlight) }),
	upstreamFamily("egress_upstream_requests_waiting", "gauge",
		"Requests and tunnels to the upstream host waiting in the shaper's line.",
		func(u *UpstreamStats) string { return fmtInt(u.Waiting) }),
	upstreamFamily("egress_upstream_wait_seconds_total", "counter",
		"Time requests to the upstream host spent waiting in the shaper's line.",
		func(u *UpstreamStats) string { return fmtFloat(u.WaitSeconds) }),
	upstreamFamily("egress_upstream_rejected_total", "counter",
		"Requests to the upstream host that egressd answered with 429.",
		func(u *UpstreamStats) string { return fmtUint(u.Rejected) }),
	upstreamFamily("egress_upstream_throttled_total", "counter",
		"Responses of the upstream host with status 429, or 503 with Retry-After.",
		func(u *UpstreamStats) string { return fmtUint(u.Throttled) }),
	upstreamFamily("egress_upstream_errors_total", "counter",
		"Requests to the upstream host that egressd answered with 502, 503 or 504, and aborted responses.",
		func(u *UpstreamStats) string { return fmtUint(u.Errors) }),
	upstreamFamily("egress_upstream_sent_bytes_total", "counter",
		"Bytes sent from clients to the upstream host.",
		func(u *UpstreamStats) string { return fmtUint(u.BytesUp) }),
	upstreamFamily("egress_upstream_received_bytes_total", "counter",
		"Bytes received from the upstream host and passed to clients.",
		func(u *UpstreamStats) string { return fmtUint(u.BytesDown) }),
	{Family{"egress_upstream_request_duration_seconds", "histogram",
		"Time from admission by the shaper to the upstream host's response head, or to the CONNECT tunnel being open."},
		func(p *promWriter, s *Stats) {
			for i := range s.Upstreams {
				u := &s.Upstreams[i]
				p.histogram("egress_upstream_request_duration_seconds", upstreamLabel(u.Upstream), &u.LatencyHistogram)
			}
		}},

	plainFamily("egress_address_live", "gauge",
		"Egress addresses on the interface, in any state.",
		func(s *Stats) string { return fmtInt(int64(s.Addresses.Live)) }),
	plainFamily("egress_address_ready", "gauge",
		"Egress addresses added and not yet used.",
		func(s *Stats) string { return fmtInt(int64(s.Addresses.Ready)) }),
	plainFamily("egress_address_in_use", "gauge",
		"Egress addresses bound by an open connection.",
		func(s *Stats) string { return fmtInt(int64(s.Addresses.InUse)) }),
	plainFamily("egress_address_warm", "gauge",
		"Egress addresses used within the neighbour window and released: reused past the budget, removed once unused for the window.",
		func(s *Stats) string { return fmtInt(int64(s.Addresses.Warm)) }),
	plainFamily("egress_address_fresh_total", "counter",
		"Egress addresses handed out never used before.",
		func(s *Stats) string { return fmtUint(s.Addresses.Fresh) }),
	plainFamily("egress_address_reused_total", "counter",
		"Warm egress addresses handed out again, past the new-address budget.",
		func(s *Stats) string { return fmtUint(s.Addresses.Reused) }),
	plainFamily("egress_address_retries_total", "counter",
		"Connections from a never-used egress address that got no answer at first and were made again from a warm one.",
		func(s *Stats) string { return fmtUint(s.Addresses.Retries) }),
	plainFamily("egress_address_overflows_total", "counter",
		"Retries from a warm address that worked: the router's neighbour table taken as full, and the new-address rate lowered.",
		func(s *Stats) string { return fmtUint(s.Addresses.Overflows) }),
	budgetFamily("egress_address_budget_rate",
		"Never-used egress addresses a second the budget allows now (-new-addrs; lower for a while after an overflow).",
		func(b *Budget) string { return fmtFloat(b.Rate) }),
	budgetFamily("egress_address_budget_max_rate",
		"Never-used egress addresses a second set by -new-addrs.",
		func(b *Budget) string { return fmtFloat(b.MaxRate) }),
	budgetFamily("egress_address_budget_burst",
		"Never-used egress addresses the budget allows at once beyond its rate (-new-addrs burst).",
		func(b *Budget) string { return fmtInt(int64(b.Burst)) }),
	budgetFamily("egress_address_budget_cap",
		"Most distinct egress addresses used within the neighbour window that still let a never-used one be handed out.",
		func(b *Budget) string { return fmtInt(int64(b.Cap)) }),
	budgetFamily("egress_address_budget_window_seconds",
		"How long the router is taken to remember an egress address after its last use (-neigh-window).",
		func(b *Budget) string { return fmtFloat(b.WindowSeconds) }),
	plainFamily("egress_address_added_total", "counter",
		"Egress addresses added to the interface.",
		func(s *Stats) string { return fmtUint(s.Addresses.Added) }),
	plainFamily("egress_address_removed_total", "counter",
		"Egress addresses removed from the interface.",
		func(s *Stats) string { return fmtUint(s.Addresses.Removed) }),
	plainFamily("egress_address_add_failures_total", "counter",
		"Failures to add an egress address to the interface.",
		func(s *Stats) string { return fmtUint(s.Addresses.AddFailures) }),
	plainFamily("egress_address_remove_failures_total", "counter",
		"Failures to remove an egress address from the interface.",
		func(s *Stats) string { return fmtUint(s.Addresses.RemoveFailures) }),
	plainFamily("egress_address_lost_total", "counter",
		"Egress addresses that somebody else removed from the interface while egressd held them.",
		func(s *Stats) string { return fmtUint(s.Addresses.Lost) }),
	{Family{"egress_address_add_duration_seconds", "histogram",
		"Time to add an egress address to the interface."},
		func(p *promWriter, s *Stats) {
			p.histogram("egress_address_add_duration_seconds", "", &s.Addresses.AddLatencyHistogram)
		}},

	plainFamily("egress_client_connections", "gauge",
		"Client connections open, HTTP and SOCKS5.",
		func(s *Stats) string { return fmtInt(s.Clients.Connections) }),
	{Family{"egress_client_refused_total", "counter",
		"Clients refused or cut off by egressd, by reason: a connection or address cap, a timeout, a malformed request or body, a failed or throttled login."},
		func(p *promWriter, s *Stats) {
			for _, r := range Refusals {
				p.sample("egress_client_refused_total", `reason="`+r+`"`, fmtUint(s.Clients.Refused[r]))
			}
		}},
	plainFamily("egress_client_accept_errors_total", "counter",
		"Failed accepts of client connections, such as file descriptors running out.",
		func(s *Stats) string { return fmtUint(s.Clients.AcceptErrors) }),

	storeFamily("egress_limit_store_up", "gauge",
		"1 while the limit store (-limit-store) answers and -limit budgets are shared, 0 while each egressd enforces every rule alone.",
		func(l *LimitStore) string { return fmtBool(l.Shared) }),
	storeFamily("egress_limit_store_decisions_total", "counter",
		"Shaping decisions the limit store answered.",
		func(l *LimitStore) string { return fmtUint(l.Decisions) }),
	storeFamily("egress_limit_store_local_decisions_total", "counter",
		"Shaping decisions made in-process because the limit store did not answer.",
		func(l *LimitStore) string { return fmtUint(l.LocalDecisions) }),
	storeFamily("egress_limit_store_errors_total", "counter",
		"Calls to the limit store that failed or timed out.",
		func(l *LimitStore) string { return fmtUint(l.Errors) }),
	storeFamily("egress_limit_store_fallbacks_total", "counter",
		"Times the limit store stopped answering and decisions went in-process.",
		func(l *LimitStore) string { return fmtUint(l.Fallbacks) }),

	plainFamily("egress_uptime_seconds", "gauge",
		"Time since egressd started.",
		func(s *Stats) string { return fmtFloat(s.UptimeSeconds) }),
	plainFamily("egress_start_time_seconds", "gauge",
		"Start time of egressd since the Unix epoch.",
		func(s *Stats) string { return fmtFloat(float64(s.Started.UnixNano()) / 1e9) }),
}

// Series lists every metric family WritePrometheus writes, in the order it
// writes them. It is what the README's list of series is made from.
var Series = func() []Family {
	fs := make([]Family, len(families))
	for i, f := range families {
		fs[i] = f.Family
	}
	return fs
}()

// WritePrometheus writes s in the Prometheus text exposition format, version
// 0.0.4 (see ContentType), with HELP and TYPE lines for every family in
// Series. Upstream series carry the label upstream; a histogram without
// buckets (as in a Stats decoded from JSON) is written with its +Inf bucket
// only.
func WritePrometheus(w io.Writer, s *Stats) error {
	p := &promWriter{w: bufio.NewWriter(w)}
	for _, f := range families {
		p.w.WriteString("# HELP ")
		p.w.WriteString(f.Name)
		p.w.WriteByte(' ')
		p.w.WriteString(helpEscaper.Replace(f.Help))
		p.w.WriteString("\n# TYPE ")
		p.w.WriteString(f.Name)
		p.w.WriteByte(' ')
		p.w.WriteString(f.Type)
		p.w.WriteByte('\n')
		f.write(p, s)
	}
	return p.w.Flush() // bufio.Writer keeps the first write error
}

type promWriter struct {
	w *bufio.Writer
}

// sample writes one line; labels are rendered pairs without braces.
func (p *promWriter) sample(name, labels, value string) {
	p.line(name, "", labels, "", value)
}

// line writes name+suffix, the labels and le (either may be empty), and
// the value, without building strings on the way.
func (p *promWriter) line(name, suffix, labels, le, value string) {
	p.w.WriteString(name)
	p.w.WriteString(suffix)
	if labels != "" || le != "" {
		p.w.WriteByte('{')
		p.w.WriteString(labels)
		if labels != "" && le != "" {
			p.w.WriteByte(',')
		}
		if le != "" {
			p.w.WriteString(`le="`)
			p.w.WriteString(le)
			p.w.WriteByte('"')
		}
		p.w.WriteByte('}')
	}
	p.w.WriteByte(' ')
	p.w.WriteString(value)
	p.w.WriteByte('\n')
}

// histogram writes the cumulative buckets, the sum and the count of h.
func (p *promWriter) histogram(name, labels string, h *HistogramSnapshot) {
	var cum uint64
	for i, b := range h.Bounds {
		if i < len(h.Counts) {
			cum += h.Counts[i]
		}
		le := ""
		if i < len(leValues) && b == bounds[i] {
			le = leValues[i]
		} else {
			le = fmtFloat(b)
		}
		p.line(name, "_bucket", labels, le, fmtUint(cum))
	}
	p.line(name, "_bucket", labels, "+Inf", fmtUint(h.Count))
	p.line(name, "_sum", labels, "", fmtFloat(h.Sum))
	p.line(name, "_count", labels, "", fmtUint(h.Count))
}

// leValues are the le labels of the standard bounds.
var leValues = func() (le [numBounds]string) {
	for i, b := range bounds {
		le[i] = fmtFloat(b)
	}
	return le
}()

// upstreamLabel renders the upstream label pair. Label values must be UTF-8,
// so invalid bytes (which Registry keeps out of names) become U+FFFD.
func upstreamLabel(host string) string {
	return `upstream="` + labelEscaper.Replace(strings.ToValidUTF8(host, "\uFFFD")) + `"`
}

var (
	labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)
	helpEscaper  = strings.NewReplacer(`\`, `\\`, "\n", `\n`)
)

func fmtUint(v uint64) string { return strconv.FormatUint(v, 10) }
func fmtInt(v int64) string   { return strconv.FormatInt(v, 10) }
func fmtBool(v bool) string {
	if v {
		return "1"
	}
	return "0"
}
func fmtFloat(v float64) string { return strconv.FormatFloat(v, 'g', -1, 64) } // +Inf, -Inf, NaN as Prometheus spells them
