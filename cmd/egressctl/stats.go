package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/egressd/egressd/proxy/stats"
)

const statsUsage = `Usage: egressctl [-admin ADDR] stats [-json] [-watch DURATION]

Shows egressd's counters: totals, the client connections open and the
clients refused by reason (a connection or address cap, a timeout, a
malformed request or body, a failed or throttled login), the sessions open
(-rotate session) and how many gave up their address for a new one, by
reason (header: X-Egress-Rotate; user_name: session-KEY-rotate; admin:
egressctl rotate; status: an upstream status of -rotate-on), a row per
upstream host, and the pool of egress addresses.

Columns: REQS requests and tunnels that reached the shaper; IPV4 of those, the
ones that left from egressd's own IPv4 address because the upstream has no
IPv6 address (-ipv4 direct); INFLIGHT admitted and not finished; WAITING in the shaper's line now; WAITED total time spent
in line; 429-OURS answered 429 by egressd; 429-UPSTREAM answered 429 (or 503
with Retry-After) by the upstream; ERRORS 502/503/504 from egressd and
aborted responses; UP client to upstream; DOWN upstream to client; P50, P99
request duration (for tunnels, the time to open them).

Address columns: LIVE on the interface; READY added and unused; IN-USE bound
by a connection; WARM used and released within the neighbour window, reused
past the budget; FRESH and REUSED how many were handed out never used before
and warm. The budget line gives the new addresses a second allowed now
(-new-addrs), the burst, the most distinct addresses used within the window
(-neigh-window), and the connections from a new address that got no answer
and were made again from a warm one: retries, and overflows when the retry
worked (the router's neighbour table is full; the rate is lowered for a
while). With -limit-store, a last line says whether the store answers and
the budgets are shared, or this egressd enforces every rule alone, and
counts the decisions made each way.

Subnet rows: the upstream connections per /64 of the egress prefixes, CONNS
made and OPEN now, those with the most open first, at most 16 (-json lists
every /64 egressd counts apart: up to 256, the rest as (other)); the line
above them gives the spread over all of them.

Flags:
  -json             print the JSON document egressd sends
  -watch DURATION   refresh every DURATION (e.g. 2s) until interrupted
`

// clearScreen moves the cursor home and clears the terminal.
const clearScreen = "\x1b[H\x1b[2J"

// statsCommand is egressctl stats.
type statsCommand struct {
	env                  // with terminal set, the screen is cleared between frames
	now func() time.Time // for the watch header; time.Now if nil
}

func (c *statsCommand) Run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("stats", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "")
	var watch watchFlag
	fs.Var(&watch, "watch", "")
	if ok, err := parseFlags(fs, args, statsUsage, c.stdout); !ok {
		return err
	}
	if watch == 0 {
		return c.frame(ctx, c.stdout, *asJSON)
	}
	return c.watch(ctx, time.Duration(watch), *asJSON)
}

// watch prints a frame every d until ctx is done. Only a failure of the
// first frame ends it; later ones are shown in place of the frame, so that
// a restart of egressd does not stop the watch.
func (c *statsCommand) watch(ctx context.Context, d time.Duration, asJSON bool) error {
	now := c.now
	if now == nil {
		now = time.Now
	}
	tick := time.NewTicker(d)
	defer tick.Stop()
	var buf bytes.Buffer
	for first := true; ; first = false {
		buf.Reset()
		fmt.Fprintf(&buf, "Every %v: egressctl stats  %s\n\n", d, now().Format(time.TimeOnly))
		err := c.frame(ctx, &buf, asJSON)
		if ctx.Err() != nil {
			return nil // interrupted: not a failure
		}
		if err != nil {
			if first {
				return err
			}
			fmt.Fprintf(&buf, "egressctl: %v\n", err)
		}
		// Render first, then clear and write at once: no flicker.
		switch {
		case c.terminal:
			io.WriteString(c.stdout, clearScreen)
		case !first:
			io.WriteString(c.stdout, "\n")
		}
		if _, err := c.stdout.Write(buf.Bytes()); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// frame fetches /stats once and writes it to w.
func (c *statsCommand) frame(ctx context.Context, w io.Writer, asJSON bool) error {
	body, err := c.admin.Get(ctx, "/stats")
	if err != nil {
		return err
	}
	if asJSON {
		return writeIndented(w, body)
	}
	var s stats.Stats
	if err := json.Unmarshal(body, &s); err != nil {
		return fmt.Errorf("decoding /stats from egressd at %s: %w", c.admin.Addr(), err)
	}
	return writeStats(w, &s)
}

// writeStats writes the table for people.
func writeStats(w io.Writer, s *stats.Stats) error {
	t := s.Totals
	fmt.Fprintf(w, "egressd up %s: %d requests (%d over IPv4), %d in flight, %d waiting (waited %s in all), %d rejected (429 ours), %d throttled (429 upstream), %d errors, up %s, down %s\n",
		humanDuration(s.UptimeSeconds), t.Requests, t.IPv4, t.InFlight, t.Waiting, humanDuration(t.WaitSeconds),
		t.Rejected, t.Throttled, t.Errors, humanBytes(t.BytesUp), humanBytes(t.BytesDown))
	fmt.Fprintf(w, "clients: %s\n", clientsLine(&s.Clients))
	fmt.Fprintf(w, "sessions: %s\n\n", sessionsLine(&s.Sessions))

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if len(s.Upstreams) == 0 {
		fmt.Fprintln(tw, "No upstream has been used yet.")
	} else {
		fmt.Fprintln(tw, "UPSTREAM\tRULE\tREQS\tIPV4\tINFLIGHT\tWAITING\tWAITED\t429-OURS\t429-UPSTREAM\tERRORS\tUP\tDOWN\tP50\tP99")
		for _, u := range s.Upstreams {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%s\t%d\t%d\t%d\t%s\t%s\t%s\t%s\n",
				cell(u.Upstream), cell(u.Rule),
				u.Requests, u.IPv4, u.InFlight, u.Waiting, humanDuration(u.WaitSeconds),
				u.Rejected, u.Throttled, u.Errors, humanBytes(u.BytesUp), humanBytes(u.BytesDown),
				humanLatency(u.Latency.P50), humanLatency(u.Latency.P99))
		}
	}

	a := s.Addresses
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "ADDRESSES\tLIVE\tREADY\tIN-USE\tWARM\tFRESH\tREUSED\tADDED\tREMOVED\tADD-FAILURES\tREMOVE-FAILURES\tLOST\tADD-P50\tADD-P99")
	fmt.Fprintf(tw, "pool\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t%s\n",
		a.Live, a.Ready, a.InUse, a.Warm, a.Fresh, a.Reused, a.Added, a.Removed, a.AddFailures, a.RemoveFailures, a.Lost,
		humanLatency(a.AddLatency.P50), humanLatency(a.AddLatency.P99))
	if err := tw.Flush(); err != nil {
		return err
	}
	if _, err := fmt.Fprintf(w, "\nbudget: %s\n", budgetLine(&a)); err != nil {
		return err
	}
	if l := s.LimitStore; l != nil {
		if _, err := fmt.Fprintf(w, "limit store: %s\n", limitStoreLine(s, l)); err != nil {
			return err
		}
	}
	return writeSubnets(w, a.Subnets)
}

// maxSubnetRows bounds the rows of the subnet table for people.
const maxSubnetRows = 16

// writeSubnets writes the connections per /64: a line on their spread, and
// the rows of the /64s with the most connections open, then made.
func writeSubnets(w io.Writer, subnets []stats.Subnet) error {
	var named []stats.Subnet
	var other *stats.Subnet
	for i := range subnets {
		if subnets[i].Subnet == stats.OtherSubnet {
			other = &subnets[i]
		} else {
			named = append(named, subnets[i])
		}
	}
	if len(named) == 0 {
		return nil
	}
	lo, hi := named[0].Conns, named[0].Conns
	for _, s := range named {
		lo, hi = min(lo, s.Conns), max(hi, s.Conns)
	}
	line := fmt.Sprintf("\nsubnets: %d /64s, %d to %d connections each", len(named), lo, hi)
	if other != nil {
		line += fmt.Sprintf("; %d connections (%d open) from /64s not counted apart", other.Conns, other.Open)
	}
	fmt.Fprintln(w, line)
	slices.SortStableFunc(named, func(a, b stats.Subnet) int {
		return cmp.Or(cmp.Compare(b.Open, a.Open), cmp.Compare(b.Conns, a.Conns))
	})
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SUBNET\tCONNS\tOPEN")
	for _, s := range named[:min(len(named), maxSubnetRows)] {
		fmt.Fprintf(tw, "%s\t%d\t%d\n", s.Subnet, s.Conns, s.Open)
	}
	if n := len(named) - maxSubnetRows; n > 0 {
		fmt.Fprintf(tw, "(%d more)\t\t\n", n)
	}
	return tw.Flush()
}

// limitStoreLine says whether the -limit budgets are shared through the
// store now, since when, and how its decisions went.
func limitStoreLine(s *stats.Stats, l *stats.LimitStore) string {
	state := "answers: -limit budgets shared"
	if !l.Shared {
		state = "fails: this egressd enforces every rule alone"
		if l.LastError != "" {
			state += " (" + l.LastError + ")"
		}
	}
	since := humanDuration(s.Started.Add(time.Duration(s.UptimeSeconds * float64(time.Second))).Sub(l.Since).Seconds())
	return fmt.Sprintf("%s %s for %s; %d decisions by the store, %d in-process, %d fallbacks, %d errors",
		l.Store, state, since, l.Decisions, l.LocalDecisions, l.Fallbacks, l.Errors)
}

// budgetLine says what the neighbour budget in force is, and how often a
// new address got no answer.
func budgetLine(a *stats.AddressStats) string {
	b := a.Budget
	if b == nil {
		return "none (routed mode): every connection leaves from a never-used address"
	}
	rate := fmt.Sprintf("%s new addresses/s", humanRate(b.Rate))
	if b.Rate < b.MaxRate {
		rate += fmt.Sprintf(" (lowered from %s after the router overflowed)", humanRate(b.MaxRate))
	}
	return fmt.Sprintf("%s, burst %d, at most %d distinct within %s; %d retries from a warm address, %d overflows",
		rate, b.Burst, b.Cap, humanDuration(b.WindowSeconds), a.Retries, a.Overflows)
}

// humanRate prints a rate to three significant digits: 5, 2.5, 0.156.
func humanRate(r float64) string {
	return strconv.FormatFloat(r, 'g', 3, 64)
}

// clientsLine says what the clients section holds: the connections open,
// the accept errors, and each refusal that happened, in the order egressd
// lists them.
func clientsLine(c *stats.ClientStats) string {
	return fmt.Sprintf("%d connections open, %d accept errors; refused: %s", c.Connections, c.AcceptErrors,
		countsLine(stats.Refusals, c.Refused))
}

// sessionsLine says what the sessions section holds: the sessions open (-rotate
// session), and the rotations so far by reason, in the order egressd lists
// them.
func sessionsLine(s *stats.SessionStats) string {
	return fmt.Sprintf("%d open; rotated: %s", s.Open, countsLine(stats.RotateReasons, s.Rotations))
}

// countsLine lists the counts that are not zero, "N name", in the order of
// names, or says none.
func countsLine(names []string, counts map[string]uint64) string {
	var nonzero []string
	for _, name := range names {
		if n := counts[name]; n > 0 {
			nonzero = append(nonzero, fmt.Sprintf("%d %s", n, name))
		}
	}
	if len(nonzero) == 0 {
		return "none"
	}
	return strings.Join(nonzero, ", ")
}

// watchFlag is the -watch interval: a positive duration.
type watchFlag time.Duration

func (f *watchFlag) String() string { return time.Duration(*f).String() }

func (f *watchFlag) Set(s string) error {
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		// The flag package prefixes: invalid value "x" for flag -watch.
		return errors.New("want a positive duration such as 2s or 500ms")
	}
	*f = watchFlag(d)
	return nil
}
