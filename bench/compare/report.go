package compare

import (
	"fmt"
	"io"
	"slices"
	"strings"
)

// RotationSummary condenses scenario (e).
type RotationSummary struct {
	AddsPerSec, RemovesPerSec float64
	LiveMin, LiveMedian       int
	LiveMax                   int
	// First and Last are the first and the last window with adds.
	First, Last Window
	// RouterNeighMax is the most neighbour entries R had for the prefix.
	RouterNeighMax int
}

// Summary condenses the ticks and windows of r.
func (r *Rotation) Summary() RotationSummary {
	var s RotationSummary
	if len(r.Ticks) >= 2 {
		a, b := r.Ticks[0], r.Ticks[len(r.Ticks)-1]
		if span := b.T - a.T; span > 0 {
			s.AddsPerSec = float64(b.Added-a.Added) / span
			s.RemovesPerSec = float64(b.Removed-a.Removed) / span
		}
	}
	if len(r.Ticks) > 0 {
		live := make([]int, len(r.Ticks))
		for i, t := range r.Ticks {
			live[i] = t.Live
		}
		slices.Sort(live)
		s.LiveMin, s.LiveMedian, s.LiveMax = live[0], live[len(live)/2], live[len(live)-1]
		for _, t := range r.Ticks {
			s.RouterNeighMax = max(s.RouterNeighMax, t.RouterNeigh)
		}
	}
	var withAdds []Window
	for _, w := range r.Windows {
		if w.Adds > 0 {
			withAdds = append(withAdds, w)
		}
	}
	if len(withAdds) > 0 {
		s.First, s.Last = withAdds[0], withAdds[len(withAdds)-1]
	}
	return s
}

// WriteMarkdown writes the results as compare.md: the machine and the
// command, the goals of issue 6 against the figures, a table per scenario,
// scenario (e) and the notes.
func (r *Results) WriteMarkdown(w io.Writer) error {
	var b strings.Builder
	m := r.Machine
	fmt.Fprintf(&b, "# egressd against no proxy, tinyproxy and Squid\n\n")
	fmt.Fprintf(&b, "Measured %s on %s (%d cores), Linux %s, %s", r.Date.UTC().Format("2006-01-02 15:04 MST"), m.CPU, m.Cores, m.Kernel, m.Go)
	if m.Squid != "" {
		fmt.Fprintf(&b, ", %s", m.Squid)
	}
	if m.Tinyproxy != "" {
		fmt.Fprintf(&b, ", %s", m.Tinyproxy)
	}
	fmt.Fprintf(&b, ".\n\nCommand: `%s`\n\n", r.Command)
	fmt.Fprintf(&b, "Every figure is the median of %d runs (but (d)'s, which is the first run's: a process keeps the memory its first idle tunnels took, and later runs reuse it); each run measures every system in turn (%s). "+
		"Ratios are to direct (no proxy), the limit. CPU is the proxy's own user+system time per 1,000 requests "+
		"(utime+stime from /proc/PID/stat over the run), the load generator's beside it for context; "+
		"it holds better than wall-clock figures on a shared machine.\n\n", r.Runs, strings.Join(r.Systems, ", "))
	b.WriteString("![ratio to direct per scenario and system](compare.png)\n\n")

	b.WriteString("## Goals\n\n| goal | figure | target | met |\n|---|---|---|---|\n")
	for _, g := range r.Goals() {
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", g.Goal, g.Figure, g.Target, g.Met)
	}
	b.WriteString("\n")

	for _, sc := range Scenarios {
		sums := r.Summarize(sc)
		if len(sums) == 0 {
			continue
		}
		fmt.Fprintf(&b, "## (%s) %s\n\n", sc.ID, sc.Title)
		writeTable(&b, sc, sums)
	}
	if r.Rotation != nil {
		writeRotation(&b, r.Rotation)
	}
	if len(r.Notes) > 0 {
		b.WriteString("## Notes\n\n")
		for _, n := range r.Notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func writeTable(b *strings.Builder, sc Scenario, sums []Summary) {
	cols := []string{"system", sc.Unit}
	if sc == Idle {
		cols = append(cols, "KiB PSS/tunnel", "fds/tunnel", "tunnels")
	} else {
		cols = append(cols, "× direct")
	}
	if sc.Latency {
		cols = append(cols, "p50 ms", "p99 ms")
	}
	if sc.PerRequest {
		cols = append(cols, "proxy CPU ms/1k", "load CPU ms/1k")
	}
	cols = append(cols, "errors")
	fmt.Fprintf(b, "| %s |\n|%s\n", strings.Join(cols, " | "), strings.Repeat("---|", len(cols)))
	var notes []string
	for _, s := range sums {
		row := []string{s.System, num(s.Value)}
		if sc == Idle {
			row = append(row, num(s.PssKiB), fmt.Sprintf("%.2f", s.FDsPerTun), fmt.Sprint(s.Tunnels))
		} else {
			row = append(row, ratio(s.Ratio))
		}
		if sc.Latency {
			row = append(row, ms(s.P50ms), ms(s.P99ms))
		}
		if sc.PerRequest {
			proxyCPU := num(s.CPUPer1k)
			if s.System == Direct {
				proxyCPU = "–" // no proxy
			}
			row = append(row, proxyCPU, num(s.LoadCPUPer1k))
		}
		row = append(row, fmt.Sprint(s.Errors))
		fmt.Fprintf(b, "| %s |\n", strings.Join(row, " | "))
		if s.RouterNeigh > 0 {
			notes = append(notes, fmt.Sprintf("%s: the router's neighbour entries for its prefix peaked at %d", s.System, s.RouterNeigh))
		}
		for _, n := range s.Notes {
			notes = append(notes, s.System+": "+n)
		}
	}
	b.WriteString("\n")
	for _, n := range notes {
		fmt.Fprintf(b, "- %s\n", n)
	}
	if len(notes) > 0 {
		b.WriteString("\n")
	}
}

func writeRotation(b *strings.Builder, r *Rotation) {
	s := r.Summary()
	fmt.Fprintf(b, "## (e) sustained per-request rotation on-link\n\n")
	fmt.Fprintf(b, "%s at %.0f new connections/s, each with one plain GET, for %.0f s: %d requests, %d errors, p50 %s ms, p99 %s ms.\n\n",
		EgressdOnLink, r.Rate, r.Seconds, r.Requests, r.Errors, ms(r.P50ms), ms(r.P99ms))
	fmt.Fprintf(b, "- addresses added %.1f/s, removed %.1f/s\n", s.AddsPerSec, s.RemovesPerSec)
	fmt.Fprintf(b, "- live addresses (sampled every second): min %d, median %d, max %d (-max-addrs %d)\n", s.LiveMin, s.LiveMedian, s.LiveMax, r.MaxAddrs)
	fmt.Fprintf(b, "- the router's neighbour entries for the prefix (sampled every second): max %d\n", s.RouterNeighMax)
	fmt.Fprintf(b, "- cost per added address, first window p50 %s ms / p99 %s ms, last window p50 %s ms / p99 %s ms\n",
		ms(s.First.P50ms), ms(s.First.P99ms), ms(s.Last.P50ms), ms(s.Last.P99ms))
	fmt.Fprintf(b, "- the kernel found its IPv6 neighbour table full %d times during the run (table_fulls in /proc/net/stat/ndisc_cache; it counts every namespace of the machine)\n\n", r.TableFulls)
	if r.Note != "" {
		fmt.Fprintf(b, "- %s\n\n", r.Note)
	}
	b.WriteString("| window ends at s | adds | add p50 ms | add p99 ms |\n|---|---|---|---|\n")
	for _, w := range r.Windows {
		fmt.Fprintf(b, "| %.0f | %d | %s | %s |\n", w.T, w.Adds, ms(w.P50ms), ms(w.P99ms))
	}
	b.WriteString("\n")
}

// Goal is one goal of issue 6 with the figure measured against it.
type Goal struct {
	Goal, Figure, Target string
	// Met is "yes", "no" or "not measured".
	Met string
}

const notMeasured = "not measured"

// Goals computes where egressd stands on each goal of issue 6.
func (r *Results) Goals() []Goal {
	a, b, c, d := r.Summarize(Small), r.Summarize(Tunnel), r.Summarize(Download), r.Summarize(Idle)
	var gs []Goal
	add := func(goal, target string, ok bool, met bool, figure string, args ...any) {
		g := Goal{Goal: goal, Target: target, Met: notMeasured}
		if ok {
			g.Figure = fmt.Sprintf(figure, args...)
			g.Met = yesNo(met)
		}
		gs = append(gs, g)
	}
	if s, q := find(a, EgressdSession), find(a, Squid); s != nil && q != nil {
		add("(a) -rotate session requests/s", "≥ 1.2× Squid", true, s.Value >= 1.2*q.Value,
			"%s req/s = %s Squid (%s)", num(s.Value), ratio(s.Value/q.Value), num(q.Value))
		add("(a) -rotate session p99", "≤ Squid's", true, s.P99ms <= q.P99ms,
			"%s ms (Squid %s ms)", ms(s.P99ms), ms(q.P99ms))
	} else {
		add("(a) -rotate session requests/s", "≥ 1.2× Squid", false, false, "")
		add("(a) -rotate session p99", "≤ Squid's", false, false, "")
	}
	conn, squidA := find(a, EgressdConnection), find(a, Squid)
	add("(a) -rotate connection requests/s", "≥ Squid", conn != nil && squidA != nil,
		conn != nil && squidA != nil && conn.Value >= squidA.Value,
		"%s = %s Squid (%s)", val(conn), ratioOf(conn, squidA), val(squidA))
	routed, squid := find(b, EgressdRouted), find(b, Squid)
	add("(b) routed tunnels/s against Squid", "≥ Squid", routed != nil && squid != nil,
		routed != nil && squid != nil && routed.Value >= squid.Value,
		"%s = %s Squid (%s)", val(routed), ratioOf(routed, squid), val(squid))
	add("(b) routed tunnels/s against direct", "≥ 0.8× direct", routed != nil && routed.Ratio > 0,
		routed != nil && routed.Ratio >= 0.8, "%s direct", ratioOf(routed, find(b, Direct)))
	onlink := find(b, EgressdOnLink)
	add("(b) on-link tunnels/s against routed", "≥ 0.8× routed, no error", onlink != nil && routed != nil,
		onlink != nil && routed != nil && onlink.Value >= 0.8*routed.Value && onlink.Errors == 0,
		"%s = %s routed", val(onlink), ratioOf(onlink, routed))
	if w := worst(c, false); w != nil && w.Ratio > 0 {
		add("(c) download, worst egressd variant", "≥ 0.9× direct", true, w.Ratio >= 0.9,
			"%s: %s MB/s = %s direct", w.System, num(w.Value), ratio(w.Ratio))
	} else {
		add("(c) download, worst egressd variant", "≥ 0.9× direct", false, false, "")
	}
	for _, x := range []struct {
		id   string
		sums []Summary
	}{{"a", a}, {"b", b}} {
		goal := "(" + x.id + ") proxy CPU per 1,000 requests, worst egressd variant"
		w, q := worstBy(x.sums, func(s Summary) float64 { return -s.CPUPer1k }), find(x.sums, Squid)
		add(goal, "≤ Squid's", w != nil && q != nil, w != nil && q != nil && w.CPUPer1k <= q.CPUPer1k,
			"%s: %s ms (Squid %s ms)", sysOf(w), cpuOf(w), cpuOf(q))
	}
	if w := worst(d, true); w != nil {
		add("(d) memory per idle tunnel, worst egressd variant", "≤ 16 KiB", true, w.Value <= 16,
			"%s: %s KiB RSS (%s KiB PSS)", w.System, num(w.Value), num(w.PssKiB))
	} else {
		add("(d) memory per idle tunnel, worst egressd variant", "≤ 16 KiB", false, false, "")
	}
	if r.Rotation != nil && len(r.Rotation.Ticks) > 0 {
		s := r.Rotation.Summary()
		add("(e) live addresses stay bounded", "≤ -max-addrs, no growth", true, s.LiveMax <= r.Rotation.MaxAddrs && !r.Rotation.liveGrows(),
			"min %d, median %d, max %d over %.0f s", s.LiveMin, s.LiveMedian, s.LiveMax, r.Rotation.Seconds)
		add("(e) cost per added address stays flat", "last window p50 ≤ 1.5× first", s.First.Adds > 0,
			s.First.Adds > 0 && s.Last.P50ms <= 1.5*s.First.P50ms,
			"p50 %s → %s ms, p99 %s → %s ms", ms(s.First.P50ms), ms(s.Last.P50ms), ms(s.First.P99ms), ms(s.Last.P99ms))
		add("(e) the router's neighbour entries stay below 512", "≤ 512, no table full", true,
			s.RouterNeighMax <= 512 && r.Rotation.TableFulls == 0,
			"max %d, the table full %d times", s.RouterNeighMax, r.Rotation.TableFulls)
	} else {
		add("(e) live addresses stay bounded", "≤ -max-addrs, no growth", false, false, "")
		add("(e) cost per added address stays flat", "last window p50 ≤ 1.5× first", false, false, "")
		add("(e) the router's neighbour entries stay below 512", "≤ 512, no table full", false, false, "")
	}
	return gs
}

// liveGrows reports whether the median live count of the last quarter of
// the run exceeds that of the second quarter (after the start) by half.
func (r *Rotation) liveGrows() bool {
	n := len(r.Ticks)
	if n < 8 {
		return false
	}
	live := func(t Tick) float64 { return float64(t.Live) }
	early, late := median(r.Ticks[n/4:n/2], live), median(r.Ticks[3*n/4:], live)
	return late > 1.5*early+2
}

// worst returns the egressd variant with the worst figure in sums: the
// lowest, or the highest when lower is better.
func worst(sums []Summary, lower bool) *Summary {
	if lower {
		return worstBy(sums, func(s Summary) float64 { return -s.Value })
	}
	return worstBy(sums, func(s Summary) float64 { return s.Value })
}

// worstBy returns the egressd variant with the lowest score.
func worstBy(sums []Summary, score func(Summary) float64) *Summary {
	var w *Summary
	for i := range sums {
		if slices.Contains(egressdSystems, sums[i].System) && (w == nil || score(sums[i]) < score(*w)) {
			w = &sums[i]
		}
	}
	return w
}

func yesNo(ok bool) string {
	if ok {
		return "yes"
	}
	return "no"
}

func val(s *Summary) string {
	if s == nil {
		return "–"
	}
	return num(s.Value)
}

func sysOf(s *Summary) string {
	if s == nil {
		return "–"
	}
	return s.System
}

func cpuOf(s *Summary) string {
	if s == nil {
		return "–"
	}
	return num(s.CPUPer1k)
}

func ratioOf(s, ref *Summary) string {
	if s == nil || ref == nil || ref.Value == 0 {
		return "–"
	}
	return ratio(s.Value / ref.Value)
}

func ratio(x float64) string {
	if x == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f×", x)
}

func ms(x float64) string { return fmt.Sprintf("%.2f", x) }

// num formats a figure with three significant digits at most, and
// thousands separators above 1,000.
func num(x float64) string {
	switch {
	case x >= 1000:
		s := fmt.Sprintf("%.0f", x)
		var b strings.Builder
		for i, c := range s {
			if i > 0 && (len(s)-i)%3 == 0 {
				b.WriteByte(',')
			}
			b.WriteRune(c)
		}
		return b.String()
	case x >= 100:
		return fmt.Sprintf("%.0f", x)
	case x >= 10:
		return fmt.Sprintf("%.1f", x)
	default:
		return fmt.Sprintf("%.2f", x)
	}
}
