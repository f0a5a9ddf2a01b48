// Package compare holds the comparison harness of issue 6: egressd against
// no proxy, tinyproxy and Squid, side by side in one run (TestCompare, which
// `make bench` runs with -full), and the results it writes for people: a
// markdown table (compare.md), the raw runs (compare.json) and a chart
// (compare.png). bench/README.md describes the scenarios and how to read the
// figures.
package compare

import (
	"slices"
	"time"
)

// Scenario is one of the side-by-side measurements (a) to (d). Scenario (e),
// sustained rotation, has figures of its own (Rotation).
type Scenario struct {
	ID    string `json:"id"`
	Title string `json:"title"`
	Unit  string `json:"unit"`
	// Lower is set when a lower figure is better (memory).
	Lower bool `json:"lower,omitempty"`
	// Latency is set when p50/p99 latencies belong to the figure.
	Latency bool `json:"latency,omitempty"`
	// PerRequest is set when CPU time per 1,000 requests means something.
	PerRequest bool `json:"per_request,omitempty"`
}

// The scenarios, in the order of issue 6.
var (
	Small    = Scenario{ID: "a", Title: "small GET, 64 keep-alive clients", Unit: "req/s", Latency: true, PerRequest: true}
	Tunnel   = Scenario{ID: "b", Title: "HTTPS through CONNECT, a new tunnel per request", Unit: "tunnels/s", Latency: true, PerRequest: true}
	Download = Scenario{ID: "c", Title: "one CONNECT tunnel downloading", Unit: "MB/s"}
	Idle     = Scenario{ID: "d", Title: "idle CONNECT tunnels: memory per tunnel", Unit: "KiB RSS", Lower: true}
)

// Scenarios lists the side-by-side scenarios in order.
var Scenarios = []Scenario{Small, Tunnel, Download, Idle}

// The systems measured. Direct, with no proxy, is the reference of ratios.
const (
	Direct         = "direct"
	EgressdOnLink  = "egressd-onlink"  // on-link, -rotate request
	EgressdRouted  = "egressd-routed"  // routed, -rotate request
	EgressdSession = "egressd-session" // on-link, -rotate session, a key per client
	// EgressdConnection: on-link, -rotate connection, an address per client
	// connection.
	EgressdConnection = "egressd-connection"
	Tinyproxy         = "tinyproxy"
	Squid             = "squid"
	SquidRandom10     = "squid-random10" // 10 static addresses picked by acl random
)

// egressdSystems are the egressd variants, for the goals.
var egressdSystems = []string{EgressdOnLink, EgressdRouted, EgressdSession, EgressdConnection}

// Sample is one system's figures in one scenario in one run.
type Sample struct {
	Scenario string `json:"scenario"`
	System   string `json:"system"`
	Run      int    `json:"run"`
	// Value is the figure in the scenario's unit.
	Value    float64 `json:"value"`
	P50ms    float64 `json:"p50_ms,omitempty"`
	P99ms    float64 `json:"p99_ms,omitempty"`
	Requests int64   `json:"requests"`
	Errors   int64   `json:"errors"`
	// ProxyCPUms is the proxy's user plus system CPU time over the run;
	// LoadCPUms the load generator's.
	ProxyCPUms float64 `json:"proxy_cpu_ms"`
	LoadCPUms  float64 `json:"load_cpu_ms"`
	// Idle tunnels (d): how many were open, and the proxy's proportional
	// set size and file descriptors per tunnel.
	Tunnels   int64   `json:"tunnels,omitempty"`
	PssKiB    float64 `json:"pss_kib_per_tunnel,omitempty"`
	FDsPerTun float64 `json:"fds_per_tunnel,omitempty"`
	// RouterNeigh is the peak of R's neighbour entries for an on-link
	// system's prefix, sampled every second over the run: what its
	// addresses cost the router.
	RouterNeigh int `json:"router_neigh_peak,omitempty"`
	// Note carries the first error texts of a run that had errors.
	Note string `json:"note,omitempty"`
}

// Rotation is scenario (e): sustained per-request rotation on-link, plain
// GETs at a fixed rate, each on a new connection, against egressd's admin
// API sampled once a second (Ticks) and its address-add histogram sampled
// every Window.
type Rotation struct {
	Rate     float64  `json:"rate"`
	Seconds  float64  `json:"seconds"`
	Requests int64    `json:"requests"`
	Errors   int64    `json:"errors"`
	P50ms    float64  `json:"p50_ms"`
	P99ms    float64  `json:"p99_ms"`
	MaxAddrs int      `json:"max_addrs"`
	Ticks    []Tick   `json:"ticks"`
	Windows  []Window `json:"windows"`
	// TableFulls is how often the kernel found its IPv6 neighbour table
	// full during the run (table_fulls of /proc/net/stat/ndisc_cache,
	// which counts every namespace of the machine).
	TableFulls uint64 `json:"neigh_table_fulls"`
	Note       string `json:"note,omitempty"`
}

// Tick is one sample of egressd's /stats: seconds since the start, live
// addresses, the added and removed totals, and R's neighbour entries for
// the prefix.
type Tick struct {
	T           float64 `json:"t"`
	Live        int     `json:"live"`
	Added       uint64  `json:"added"`
	Removed     uint64  `json:"removed"`
	RouterNeigh int     `json:"router_neigh"`
}

// Window is the address adds of one interval and their cost, from the
// deltas of the histogram buckets.
type Window struct {
	T     float64 `json:"t"` // seconds since the start, at the window's end
	Adds  uint64  `json:"adds"`
	P50ms float64 `json:"p50_ms"`
	P99ms float64 `json:"p99_ms"`
}

// Machine describes where the figures were measured.
type Machine struct {
	CPU       string `json:"cpu"`
	Cores     int    `json:"cores"`
	Kernel    string `json:"kernel"`
	Go        string `json:"go"`
	Squid     string `json:"squid,omitempty"`
	Tinyproxy string `json:"tinyproxy,omitempty"`
}

// Results is everything one run of the harness measured.
type Results struct {
	Date    time.Time `json:"date"`
	Command string    `json:"command"`
	Machine Machine   `json:"machine"`
	Runs    int       `json:"runs"`
	// Systems in the order they were measured in each run.
	Systems []string `json:"systems"`
	// Notes are the constraints a reader needs (neighbour table, fd limit).
	Notes    []string  `json:"notes"`
	Samples  []Sample  `json:"samples"`
	Rotation *Rotation `json:"rotation,omitempty"`
}

// Summary is the median over the runs of one system in one scenario.
type Summary struct {
	System string
	Value  float64
	// Ratio is Value over direct's, 0 when direct has no figure.
	Ratio        float64
	P50ms, P99ms float64
	// CPUPer1k and LoadCPUPer1k are CPU milliseconds per 1,000 requests.
	CPUPer1k, LoadCPUPer1k float64
	PssKiB, FDsPerTun      float64
	Tunnels                int64
	Runs                   int
	Errors                 int64
	// RouterNeigh is the highest peak of R's neighbour entries over the
	// runs (on-link systems).
	RouterNeigh int
	Notes       []string
}

// Summarize returns the medians of sc per system, in r.Systems' order,
// leaving out systems with no sample in sc.
func (r *Results) Summarize(sc Scenario) []Summary {
	var out []Summary
	for _, sys := range r.Systems {
		var ss []Sample
		for _, s := range r.Samples {
			if s.Scenario == sc.ID && s.System == sys {
				ss = append(ss, s)
			}
		}
		if len(ss) == 0 {
			continue
		}
		sum := Summary{
			System:       sys,
			Value:        median(ss, func(s Sample) float64 { return s.Value }),
			P50ms:        median(ss, func(s Sample) float64 { return s.P50ms }),
			P99ms:        median(ss, func(s Sample) float64 { return s.P99ms }),
			CPUPer1k:     median(ss, func(s Sample) float64 { return per1k(s.ProxyCPUms, s.Requests) }),
			LoadCPUPer1k: median(ss, func(s Sample) float64 { return per1k(s.LoadCPUms, s.Requests) }),
			PssKiB:       median(ss, func(s Sample) float64 { return s.PssKiB }),
			FDsPerTun:    median(ss, func(s Sample) float64 { return s.FDsPerTun }),
			Tunnels:      int64(median(ss, func(s Sample) float64 { return float64(s.Tunnels) })),
			Runs:         len(ss),
		}
		for _, s := range ss {
			sum.Errors += s.Errors
			sum.RouterNeigh = max(sum.RouterNeigh, s.RouterNeigh)
			if s.Note != "" && !slices.Contains(sum.Notes, s.Note) {
				sum.Notes = append(sum.Notes, s.Note)
			}
		}
		if sc.ID == Idle.ID {
			// Every system runs for the whole harness in one process, and
			// memory a process took for its first N idle tunnels stays
			// with it (Go's heap and Squid's pools alike): later runs
			// reuse it and show a smaller growth. The first run is what
			// holding N tunnels costs.
			first := slices.MinFunc(ss, func(a, b Sample) int { return a.Run - b.Run })
			sum.Value, sum.PssKiB, sum.FDsPerTun = first.Value, first.PssKiB, first.FDsPerTun
		}
		out = append(out, sum)
	}
	for i := range out {
		if d := find(out, Direct); d != nil && d.Value > 0 {
			out[i].Ratio = out[i].Value / d.Value
		}
	}
	return out
}

// find returns the summary of system in ss, or nil.
func find(ss []Summary, system string) *Summary {
	for i := range ss {
		if ss[i].System == system {
			return &ss[i]
		}
	}
	return nil
}

func per1k(ms float64, requests int64) float64 {
	if requests == 0 {
		return 0
	}
	return ms / float64(requests) * 1000
}

// median of f over ss (the mean of the middle two for an even count).
func median[T any](ss []T, f func(T) float64) float64 {
	if len(ss) == 0 {
		return 0
	}
	v := make([]float64, len(ss))
	for i, s := range ss {
		v[i] = f(s)
	}
	slices.Sort(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}
