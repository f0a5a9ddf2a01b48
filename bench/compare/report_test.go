package compare

import (
	"bytes"
	"image/png"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// sample is a small result: two runs of direct, egressd routed and Squid in
// (a), (b) and (d), and a short (e).
func sample() *Results {
	r := &Results{
		Date:    time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC),
		Command: "go test ./bench/compare -args -full",
		Machine: Machine{CPU: "Test CPU", Cores: 2, Kernel: "6.18", Go: "go1.26", Squid: "Squid 5.7"},
		Runs:    2,
		Systems: []string{Direct, EgressdOnLink, EgressdRouted, EgressdSession, Squid},
		Notes:   []string{"a note"},
	}
	add := func(sc Scenario, sys string, values ...float64) {
		for run, v := range values {
			r.Samples = append(r.Samples, Sample{
				Scenario: sc.ID, System: sys, Run: run + 1, Value: v,
				P50ms: 1, P99ms: 4, Requests: 1000, ProxyCPUms: 2 * v, LoadCPUms: 100,
			})
		}
	}
	add(Small, Direct, 10000, 12000)
	add(Small, EgressdSession, 7000, 8000)
	add(Small, Squid, 5000, 6000)
	add(Tunnel, Direct, 1000, 1000)
	add(Tunnel, EgressdOnLink, 800, 820)
	r.Samples[len(r.Samples)-1].RouterNeigh = 230
	r.Samples[len(r.Samples)-2].RouterNeigh = 210
	add(Tunnel, EgressdRouted, 850, 950)
	add(Tunnel, Squid, 900, 900)
	add(Idle, EgressdRouted, 12, 14)
	add(Idle, Squid, 20, 22)
	r.Samples[len(r.Samples)-1].Errors = 3
	r.Samples[len(r.Samples)-1].Note = "too many open files"
	r.Rotation = &Rotation{Rate: 100, Seconds: 60, Requests: 6000, MaxAddrs: 1024}
	for i := range 61 {
		r.Rotation.Ticks = append(r.Rotation.Ticks, Tick{T: float64(i), Live: 100 + i%7, Added: uint64(100 * i), Removed: uint64(98 * i), RouterNeigh: 300 + i})
	}
	r.Rotation.Windows = []Window{{T: 30, Adds: 3000, P50ms: 0.5, P99ms: 2}, {T: 60, Adds: 3000, P50ms: 0.6, P99ms: 2.5}}
	return r
}

func TestSummarize(t *testing.T) {
	r := sample()
	a := r.Summarize(Small)
	require.Len(t, a, 3, "systems with samples in (a)")
	assert.Equal(t, []string{Direct, EgressdSession, Squid}, []string{a[0].System, a[1].System, a[2].System})
	assert.InDelta(t, 11000, a[0].Value, 1e-9, "median of two is their mean")
	assert.InDelta(t, 7500.0/11000, a[1].Ratio, 1e-9)
	assert.InDelta(t, 15000, a[1].CPUPer1k, 1e-9, "2*value ms over 1,000 requests")
	d := r.Summarize(Idle)
	assert.Zero(t, d[0].Ratio, "no direct figure, no ratio")
	assert.Equal(t, int64(3), d[1].Errors)
}

func TestGoals(t *testing.T) {
	r := sample()
	r.Systems = append(r.Systems, EgressdConnection)
	for run, v := range []float64{5000, 5800} {
		r.Samples = append(r.Samples, Sample{Scenario: Small.ID, System: EgressdConnection, Run: run + 1, Value: v, Requests: 1000})
	}
	goals := map[string]Goal{}
	for _, g := range r.Goals() {
		goals[g.Goal] = g
	}
	for goal, met := range map[string]string{
		"(a) -rotate session requests/s":                          "yes", // 7500 ≥ 1.2×5500
		"(a) -rotate session p99":                                 "yes",
		"(a) -rotate connection requests/s":                       "no",  // 5400 < 5500
		"(b) routed tunnels/s against Squid":                      "yes", // 900 = 900
		"(b) routed tunnels/s against direct":                     "yes",
		"(b) on-link tunnels/s against routed":                    "yes", // 810 ≥ 0.8×900
		"(c) download, worst egressd variant":                     notMeasured,
		"(a) proxy CPU per 1,000 requests, worst egressd variant": "no", // 15,000 > 11,000
		"(d) memory per idle tunnel, worst egressd variant":       "yes",
		"(e) live addresses stay bounded":                         "yes",
		"(e) cost per added address stays flat":                   "yes",
		"(e) the router's neighbour entries stay below 512":       "yes",
	} {
		require.Contains(t, goals, goal)
		assert.Equal(t, met, goals[goal].Met, "%s: %+v", goal, goals[goal])
	}
}

func TestWriteMarkdown(t *testing.T) {
	var b bytes.Buffer
	require.NoError(t, sample().WriteMarkdown(&b))
	md := b.String()
	for _, want := range []string{
		"Measured 2026-11-25 12:00 UTC on Test CPU (2 cores), Linux 6.18, go1.26, Squid 5.7.",
		"Command: `go test ./bench/compare -args -full`",
		"## Goals",
		"| egressd-session | 7,500 | 0.68× | 1.00 | 4.00 | 15,000 | 100 | 0 |",
		"| direct | 11,000 | 1.00× | 1.00 | 4.00 | – | 100 | 0 |",
		"| squid | 20.0 | 0.00 | 0.00 | 0 | 3 |", // (d) is the first run's, not the median of 20 and 22
		"- squid: too many open files",
		"- addresses added 100.0/s, removed 98.0/s",
		"- the router's neighbour entries for the prefix (sampled every second): max 360",
		"- egressd-onlink: the router's neighbour entries for its prefix peaked at 230",
		"| 60 | 3000 | 0.60 | 2.50 |",
		"- a note",
	} {
		assert.Contains(t, md, want)
	}
	assert.Equal(t, 4, strings.Count(md, "## ("), "(a), (b), (d) and (e): no (c) without samples")
}

func TestWriteChart(t *testing.T) {
	r := sample()
	var b bytes.Buffer
	require.NoError(t, r.WriteChart(&b))
	img, err := png.Decode(&b)
	require.NoError(t, err)
	assert.Equal(t, chartWidth, img.Bounds().Dx())
	assert.Equal(t, r.chartHeight(), img.Bounds().Dy())
	// The longest bar of (a) is direct's, barMax pixels of its colour.
	y := margin + titleHeight + titleHeight + barHeight/2
	x := margin + labelWidth + barMax - 2
	assert.Equal(t, directC, img.At(x, y), "end of direct's bar")
	assert.Equal(t, white, img.At(x, y+rowHeight), "egressd's bar in (a) is shorter")
	assert.Equal(t, egressdC, img.At(margin+labelWidth+10, y+rowHeight))
}
