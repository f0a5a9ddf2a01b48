package compare

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/test/nstest"
)

var (
	full       = flag.Bool("full", false, "the real measurement (make bench) instead of the short one that go test runs")
	outDir     = flag.String("out", "", "`DIR` to write compare.md, compare.json and compare.png to (short mode: a temporary directory)")
	runsFlag   = flag.Int("runs", 0, "`N` runs of every system and scenario (default: 5 with -full, 1 otherwise)")
	durFlag    = flag.Duration("d", 0, "`DURATION` of each timed run in (a) and (b) (default: 10s with -full, 1s otherwise)")
	rotateDur  = flag.Duration("rotate-d", 0, "`DURATION` of (e) (default: 10m with -full, 5s otherwise)")
	rotateHz   = flag.Float64("rotate-rate", 0, "`N` new connections per second in (e) (default 100)")
	renderFrom = flag.String("render", "", "`FILE`: write compare.md and compare.png again from this compare.json, measuring nothing (TestRender)")
	scenFlag   = flag.String("scenarios", "", "`IDS`: only these scenarios, comma-separated (a,b,c,d,e; default all)")
	sysFlag    = flag.String("systems", "", "`NAMES`: only these systems, comma-separated (direct, egressd-onlink, egressd-routed, egressd-session, egressd-connection, tinyproxy, squid, squid-random10; default all)")
)

// params are the sizes of one harness run.
type params struct {
	runs     int
	duration time.Duration // each timed run of (a) and (b)
	smallC   int           // keep-alive clients in (a)
	// tunnelC is (b)'s concurrency: 16 keeps both cores busy with TLS
	// handshakes while each client waits on its own, without a queue that
	// would turn p99 into a measure of the queue.
	tunnelC       int
	downloadBytes int64
	idleN         int
	rotateDur     time.Duration
	rotateRate    float64
	window        time.Duration // (e)'s histogram sampling interval
	// scenarios and systems are those -scenarios and -systems name; nil
	// for all.
	scenarios, systems map[string]bool
}

// measures reports whether scenario id is measured.
func (p params) measures(id string) bool { return p.scenarios == nil || p.scenarios[id] }

// wants reports whether system name is measured.
func (p params) wants(name string) bool { return p.systems == nil || p.systems[name] }

// set returns the comma-separated names of list as a set, nil for "".
func set(list string) map[string]bool {
	if list == "" {
		return nil
	}
	m := map[string]bool{}
	for name := range strings.SplitSeq(list, ",") {
		m[strings.TrimSpace(name)] = true
	}
	return m
}

func newParams(nofile int) (params, string) {
	p := params{runs: 1, duration: time.Second, smallC: 64, tunnelC: 16,
		downloadBytes: 64 << 20, idleN: 200, rotateDur: 5 * time.Second, rotateRate: 100, window: time.Second}
	reason := "short mode"
	if *full {
		p.runs, p.duration, p.downloadBytes = 5, 10*time.Second, 1<<30
		p.rotateDur, p.window = 10*time.Minute, 30*time.Second
		// Two descriptors per tunnel in a proxy (client and upstream
		// sockets), 1,000 spare for everything else.
		p.idleN = min(10000, (nofile-1000)/2)
		reason = fmt.Sprintf("min(10000, (hard RLIMIT_NOFILE %d - 1000)/2): a proxy holds two sockets per tunnel", nofile)
	}
	if *runsFlag > 0 {
		p.runs = *runsFlag
	}
	if *rotateHz > 0 {
		p.rotateRate = *rotateHz
	}
	if *durFlag > 0 {
		p.duration = *durFlag
	}
	if *rotateDur > 0 {
		p.rotateDur = *rotateDur
		p.window = min(p.window, *rotateDur/4)
	}
	p.scenarios, p.systems = set(*scenFlag), set(*sysFlag)
	return p, reason
}

// bench is one run of the harness.
type bench struct {
	t       *testing.T
	p       params
	tp      *nstest.Topo
	egressd string // binaries
	load    string
	caFile  string // the upstream's certificate
	nofile  int    // hard RLIMIT_NOFILE
	notes   []string
}

// TestCompare measures egressd against no proxy, tinyproxy and Squid side
// by side (issue 6). By default it runs every system through every
// scenario once with small counts, so that nothing rots; with -full
// (make bench) it is the real measurement and writes compare.md,
// compare.json and compare.png to -out.
func TestCompare(t *testing.T) {
	start := time.Now()
	tp := nstest.New(t)
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	b := &bench{t: t, tp: tp, nofile: int(rl.Max)}
	var reason string
	b.p, reason = newParams(b.nofile)
	t.Logf("(d) opens %d idle tunnels per system: %s", b.p.idleN, reason)

	bin := t.TempDir()
	var upstream string
	for pkg, dst := range map[string]*string{"./cmd/egressd": &b.egressd, "./bench/load": &b.load, "./bench/upstream": &upstream} {
		var err error
		if *dst, err = nstest.Build(bin, pkg); err != nil {
			t.Fatal(err)
		}
	}
	b.caFile = filepath.Join(bin, "upstream-ca.pem")
	tp.Router.Start(t, nil, upstream, "-ca-out", b.caFile).WaitListening(t, 3)

	t.Logf("%.1fs: topology up, binaries built", time.Since(start).Seconds())
	systems := b.startSystems()
	res := &Results{
		Date:    time.Now(),
		Command: command(),
		Machine: versions(),
		Runs:    b.p.runs,
	}
	for _, s := range systems {
		res.Systems = append(res.Systems, s.name)
	}
	for run := 1; run <= b.p.runs; run++ {
		for _, sc := range Scenarios {
			if !b.p.measures(sc.ID) {
				continue
			}
			for _, s := range systems {
				if sample, ok := b.measure(sc, s, run); ok {
					t.Logf("%5.1fs run %d (%s) %s: %.1f %s, p50 %.2f ms, p99 %.2f ms, %d errors %s", time.Since(res.Date).Seconds(),
						run, sc.ID, s.name, sample.Value, sc.Unit, sample.P50ms, sample.P99ms, sample.Errors, sample.Note)
					res.Samples = append(res.Samples, sample)
				}
			}
		}
	}
	t.Logf("%.1fs: (a) to (d) done", time.Since(start).Seconds())
	for _, s := range systems {
		if s.name == EgressdOnLink && b.p.measures("e") {
			res.Rotation = b.rotation(s)
		}
	}
	res.Notes = append(b.notes, b.constraintNotes()...)

	if !*full {
		b.checkShort(res, systems)
	}
	b.write(res)
}

// constraintNotes explain what the figures cannot show.
func (b *bench) constraintNotes() []string {
	return []string{
		fmt.Sprintf("(a) and (b) run for %v each; (c) downloads %d MiB.", b.p.duration, b.p.downloadBytes>>20),
		"tinyproxy 1.11 closes the client connection after every response without saying so: in (a) the load generator then reconnects and sends the request again, as net/http's client does, and the time counts.",
		fmt.Sprintf("(b) runs a new tunnel per request with %d concurrent clients: enough to keep both cores busy with TLS handshakes without a queue that would turn p99 into the queue's length.", b.p.tunnelC),
		"The router R keeps the kernel's default neighbour settings (its table, 1,024 entries, is shared by every namespace of the machine): every address an on-link egressd uses costs R an entry for about a minute after its last use. The on-link egressd variants run with their default neighbour budget (-new-addrs 5r/s,burst=96, -neigh-window 60s): past it they reuse warm addresses. R's entries for each on-link variant's prefix are sampled every second; their peak is given under the tables.",
		fmt.Sprintf("(d) holds %d idle tunnels per system; the per-process open-file hard limit is %d here and cannot be raised, and a proxy holds at least two descriptors per tunnel. A proxy that runs out stops the run after 64 errors; the table gives the tunnels that were open. egressd on-link -rotate request and -rotate connection are left out of (d): %d tunnels would need as many distinct addresses, more than its neighbour budget allows at once (396); egressd routed, whose addresses cost nothing, has no cap on them by default. Direct is left out too: it has no proxy to weigh.", b.p.idleN, b.nofile, b.p.idleN),
	}
}

// checkShort fails the short run when the harness did not run or did not
// report, which is what it is for: a system that served nothing in a
// scenario (its load generator failed, every request failed, no idle tunnel
// opened), a scenario some system was left out of, a rotation run (e)
// without requests or samples. It judges no figure: on a shared 2-core
// machine load moves throughput, latency and CPU, the memory delta of (d)
// (negative when the runtime hands memory back during the run), and even
// error counts (other namespaces fill the kernel's neighbour table, which
// all of them share). Those are logged; make bench's full run is where the
// figures are read.
func (b *bench) checkShort(res *Results, systems []*system) {
	for _, s := range res.Samples {
		served := s.Requests
		if s.Scenario == Idle.ID {
			served = s.Tunnels
		}
		switch {
		case served == 0:
			b.t.Errorf("(%s) %s served nothing: %d errors: %s", s.Scenario, s.System, s.Errors, s.Note)
		case s.Errors > 0:
			b.t.Logf("(%s) %s: %d errors beside %d served (not judged in the short run): %s",
				s.Scenario, s.System, s.Errors, served, s.Note)
		}
	}
	if r := res.Rotation; r == nil {
		if b.p.measures("e") && b.p.wants(EgressdOnLink) {
			b.t.Errorf("(e) did not run")
		}
	} else {
		if r.Requests == 0 || len(r.Ticks) == 0 || len(r.Windows) == 0 {
			b.t.Errorf("(e): %d requests, %d ticks, %d windows: %s", r.Requests, len(r.Ticks), len(r.Windows), r.Note)
		}
		if r.Errors > 0 {
			b.t.Logf("(e): %d errors beside %d requests (not judged in the short run): %s", r.Errors, r.Requests, r.Note)
		}
	}
	for _, sc := range Scenarios {
		if !b.p.measures(sc.ID) {
			continue
		}
		want := 0
		for _, s := range systems {
			if b.takesPart(sc, s) {
				want++
			}
		}
		if got := len(res.Summarize(sc)); got != want {
			b.t.Errorf("(%s): %d systems measured, want %d", sc.ID, got, want)
		}
	}
}

// write saves compare.md, compare.json and compare.png in -out (short
// mode: a temporary directory, so that the writers run too).
func (b *bench) write(res *Results) {
	dir := *outDir
	if dir == "" {
		dir = b.t.TempDir()
	}
	writeResults(b.t, dir, res, true)
}

// writeResults writes res's report to dir: compare.md and compare.png, and
// with withJSON the raw runs, compare.json.
func writeResults(t *testing.T, dir string, res *Results, withJSON bool) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if withJSON {
		js, err := json.MarshalIndent(res, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		write(t, filepath.Join(dir, "compare.json"), string(js)+"\n")
	}
	var md strings.Builder
	if err := res.WriteMarkdown(&md); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(dir, "compare.md"), md.String())
	f, err := os.Create(filepath.Join(dir, "compare.png"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := res.WriteChart(f); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s/compare.{md,png}:\n%s", dir, md.String())
}

// TestRender writes compare.md and compare.png again from the compare.json
// that -render names, beside it, without measuring anything: for when the
// report's code changed after a long run. Without -render there is nothing
// to do.
func TestRender(t *testing.T) {
	if *renderFrom == "" {
		t.Skip("no -render FILE given: this only re-renders a report")
	}
	js, err := os.ReadFile(*renderFrom)
	if err != nil {
		t.Fatal(err)
	}
	var res Results
	if err := json.Unmarshal(js, &res); err != nil {
		t.Fatalf("%s: %v", *renderFrom, err)
	}
	writeResults(t, filepath.Dir(*renderFrom), &res, false)
}

// command is the go test command line that reproduces this run.
func command() string {
	var args []string
	for _, a := range os.Args[1:] {
		if !strings.HasPrefix(a, "-test.") {
			args = append(args, a)
		}
	}
	cmd := "go test -count=1 -timeout 90m -run TestCompare ./bench/compare"
	if len(args) > 0 {
		cmd += " -args " + strings.Join(args, " ")
	}
	return cmd
}
