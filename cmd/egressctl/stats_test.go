package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/egressd/egressd/proxy/stats"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// table splits the tabwriter table that starts at the line beginning with
// firstHeader into rows of cells, cut at the columns of the header line,
// which checks the alignment as well. It stops at the first blank line.
func table(t *testing.T, out, firstHeader string) [][]string {
	t.Helper()
	lines := strings.Split(out, "\n")
	start := -1
	for i, l := range lines {
		if strings.HasPrefix(l, firstHeader+" ") {
			start = i
			break
		}
	}
	require.NotEqual(t, -1, start, "no table starting with %s in:\n%s", firstHeader, out)

	header := []rune(lines[start]) // runes: tabwriter aligns µs by rune
	var cols []int                 // start of each header word; header words have no spaces
	for i := range header {
		if header[i] != ' ' && (i == 0 || header[i-1] == ' ') {
			cols = append(cols, i)
		}
	}
	var rows [][]string
	for _, line := range lines[start:] {
		if line == "" {
			break
		}
		l := []rune(line)
		var row []string
		for j, c := range cols {
			end := len(l)
			if j+1 < len(cols) {
				end = min(cols[j+1], len(l))
			}
			require.LessOrEqual(t, c, end, "line %q is shorter than the header", line)
			if c > 0 {
				require.Equal(t, ' ', l[c-1], "column %d of %q is not aligned", j, line)
			}
			row = append(row, strings.TrimSpace(string(l[c:end])))
		}
		rows = append(rows, row)
	}
	return rows
}

func TestStatsTable(t *testing.T) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			admin := new(fakeEgressd).serve(t, network)
			r := egressctl(t, "-admin", admin, "stats")
			require.Equal(t, 0, r.code, r.stderr)
			assert.Empty(t, r.stderr)

			lines := strings.SplitN(r.stdout, "\n", 3)
			assert.Equal(t, "egressd up 1h01m: 121 requests (1 over IPv4), 3 in flight, 2 waiting (waited 2.50s in all), "+
				"4 rejected (429 ours), 1 throttled (429 upstream), 2 errors, up 1.0 MiB, down 3.3 MiB", lines[0])
			assert.Equal(t, "clients: 7 connections open, 3 accept errors; refused: 1000 header_timeout, 190 login_throttled", lines[1])
			assert.True(t, strings.HasPrefix(lines[2], "sessions: 2 open; rotated: 1 header, 3 status\n"), lines[2])

			assert.Equal(t, [][]string{
				{"UPSTREAM", "RULE", "REQS", "IPV4", "INFLIGHT", "WAITING", "WAITED", "429-OURS", "429-UPSTREAM", "ERRORS", "UP", "DOWN", "P50", "P99"},
				{"api.example.com", "*.example.com", "120", "0", "3", "2", "2.50s", "4", "1", "2", "1.0 MiB", "3.3 MiB", "155µs", "1m45s"},
				{`tab\there.test`, "-", "1", "1", "0", "0", "0s", "0", "0", "0", "0 B", "10 B", "2.40ms", "3.18ms"},
				{"idle.test", "-", "0", "0", "0", "0", "0s", "0", "0", "0", "0 B", "0 B", "-", "-"},
			}, table(t, r.stdout, "UPSTREAM"))

			assert.Equal(t, [][]string{
				{"ADDRESSES", "LIVE", "READY", "IN-USE", "WARM", "FRESH", "REUSED", "ADDED", "REMOVED", "ADD-FAILURES", "REMOVE-FAILURES", "LOST", "ADD-P50", "ADD-P99"},
				{"pool", "9", "4", "3", "2", "600", "400", "1000", "991", "1", "2", "0", "400µs", "792µs"},
			}, table(t, r.stdout, "ADDRESSES"))
			assert.Contains(t, r.stdout, "\nbudget: 2.5 new addresses/s (lowered from 5 after the router overflowed), burst 96, "+
				"at most 246 distinct within 1m00s; 3 retries from a warm address, 1 overflows\n")
		})
	}
}

func TestStatsTableEmpty(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, writeStats(&out, &stats.Stats{}))
	assert.Contains(t, out.String(), "egressd up 0s: 0 requests")
	assert.Contains(t, out.String(), "\nclients: 0 connections open, 0 accept errors; refused: none\n")
	assert.Contains(t, out.String(), "\nsessions: 0 open; rotated: none\n")
	assert.Contains(t, out.String(), "No upstream has been used yet.")
	assert.Equal(t, []string{"pool", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "-", "-"}, table(t, out.String(), "ADDRESSES")[1])
	assert.Contains(t, out.String(), "\nbudget: none (routed mode): every connection leaves from a never-used address\n")
}

func TestLimitStoreLine(t *testing.T) {
	started := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	s := &stats.Stats{Started: started, UptimeSeconds: 3600, LimitStore: &stats.LimitStore{
		Store: "redis://:xxxxx@store.example:6379/0", Shared: true, Since: started.Add(30 * time.Minute),
		Decisions: 5000, LocalDecisions: 40, Errors: 3, Fallbacks: 1, LastError: "connection refused"}}
	var out bytes.Buffer
	require.NoError(t, writeStats(&out, s))
	assert.Contains(t, out.String(), "\nlimit store: redis://:xxxxx@store.example:6379/0 answers: -limit budgets shared for 30m00s; "+
		"5000 decisions by the store, 40 in-process, 1 fallbacks, 3 errors\n")
	s.LimitStore.Shared = false
	assert.Equal(t, "redis://:xxxxx@store.example:6379/0 fails: this egressd enforces every rule alone (connection refused) for 30m00s; "+
		"5000 decisions by the store, 40 in-process, 1 fallbacks, 3 errors", limitStoreLine(s, s.LimitStore))
	out.Reset()
	require.NoError(t, writeStats(&out, &stats.Stats{}))
	assert.NotContains(t, out.String(), "limit store")
}

func TestBudgetLine(t *testing.T) {
	a := stats.AddressStats{Budget: &stats.Budget{Rate: 5, MaxRate: 5, Burst: 96, Cap: 396, WindowSeconds: 60}}
	assert.Equal(t, "5 new addresses/s, burst 96, at most 396 distinct within 1m00s; 0 retries from a warm address, 0 overflows", budgetLine(&a))
	a.Budget.Rate = 5.0 / 32
	assert.Contains(t, budgetLine(&a), "0.156 new addresses/s (lowered from 5 ")
}

func TestStatsJSON(t *testing.T) {
	want, err := json.MarshalIndent(cannedStats(), "", "  ")
	require.NoError(t, err)
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			admin := new(fakeEgressd).serve(t, network)
			r := egressctl(t, "-admin", admin, "stats", "-json")
			require.Equal(t, 0, r.code, r.stderr)
			assert.Equal(t, string(want)+"\n", r.stdout, "as received, indented")

			var got stats.Stats
			require.NoError(t, json.Unmarshal([]byte(r.stdout), &got))
			assert.Equal(t, cannedStats(), got)
		})
	}
}

// frameWriter collects the output of a watch and cancels it after frames
// frames.
type frameWriter struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	frames int
	cancel context.CancelFunc
}

func (w *frameWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if strings.Count(w.buf.String(), "Every ") >= w.frames {
		w.cancel()
	}
	return len(p), nil
}

func (w *frameWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// watch runs egressctl stats -watch until it has printed frames frames.
func watch(t *testing.T, f *fakeEgressd, terminal bool, frames int, flags ...string) (string, int) {
	t.Helper()
	admin := f.serve(t, "unix")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	out := &frameWriter{frames: frames, cancel: cancel}
	var stderr bytes.Buffer
	args := append([]string{"-admin", admin, "stats", "-watch", "5ms"}, flags...)
	code := report(&stderr, run(ctx, args, out, terminal))
	require.Empty(t, stderr.String())
	require.NotErrorIs(t, ctx.Err(), context.DeadlineExceeded, "watch did not print %d frames", frames)
	return out.String(), code
}

func TestStatsWatch(t *testing.T) {
	t.Run("pipe", func(t *testing.T) {
		out, code := watch(t, new(fakeEgressd), false, 3)
		assert.Equal(t, 0, code, "interrupting a watch is not a failure")
		assert.NotContains(t, out, "\x1b")
		frames := strings.Split(out, "\n\nEvery ")
		assert.Len(t, frames, 3, "a blank line between frames")
		for _, f := range frames {
			assert.Contains(t, f, "api.example.com  *.example.com")
		}
		assert.True(t, strings.HasPrefix(out, "Every 5ms: egressctl stats  "))
	})
	t.Run("terminal", func(t *testing.T) {
		out, code := watch(t, new(fakeEgressd), true, 3)
		assert.Equal(t, 0, code)
		assert.Equal(t, 3, strings.Count(out, clearScreen+"Every 5ms"), "the screen is cleared before each frame")
	})
	t.Run("json", func(t *testing.T) {
		out, code := watch(t, new(fakeEgressd), false, 2, "-json")
		assert.Equal(t, 0, code)
		assert.Equal(t, 2, strings.Count(out, `"upstream": "api.example.com"`))
	})
	t.Run("egressd goes away", func(t *testing.T) {
		f := new(fakeEgressd)
		f.failFrom.Store(2)
		out, code := watch(t, f, false, 3)
		assert.Equal(t, 0, code, "later failures are shown, not fatal")
		frames := strings.Split(out, "\n\nEvery ")
		require.Len(t, frames, 3)
		assert.Contains(t, frames[0], "api.example.com")
		assert.Contains(t, frames[1], "egressctl: egressd at ")
		assert.Contains(t, frames[1], "answered GET /stats with 503 Service Unavailable")
		assert.NotContains(t, frames[2], "api.example.com")
	})
}

func TestWatchFlag(t *testing.T) {
	var f watchFlag
	require.NoError(t, f.Set("1m30s"))
	assert.Equal(t, 90*time.Second, time.Duration(f))
	assert.Equal(t, "1m30s", f.String())
	for _, bad := range []string{"", "2", "fast", "0", "-1s"} {
		assert.Error(t, f.Set(bad), "%q", bad)
	}
}

// TestStatsSubnets: the connections per /64, their spread in one line, and
// the rows with the most open first, at most maxSubnetRows.
func TestStatsSubnets(t *testing.T) {
	s := &stats.Stats{}
	for i := range 20 {
		s.Addresses.Subnets = append(s.Addresses.Subnets, stats.Subnet{Subnet: fmt.Sprintf("2001:db8:0:1%02x::/64", i), Conns: uint64(10 + i%3), Open: i / 19})
	}
	s.Addresses.Subnets = append(s.Addresses.Subnets, stats.Subnet{Subnet: stats.OtherSubnet, Conns: 7, Open: 1})
	var out bytes.Buffer
	require.NoError(t, writeStats(&out, s))
	assert.Contains(t, out.String(), "\nsubnets: 20 /64s, 10 to 12 connections each; 7 connections (1 open) from /64s not counted apart\n")
	rows := table(t, out.String(), "SUBNET")
	require.Len(t, rows, 1+maxSubnetRows+1)
	assert.Equal(t, []string{"SUBNET", "CONNS", "OPEN"}, rows[0])
	assert.Equal(t, []string{"2001:db8:0:113::/64", "11", "1"}, rows[1], "open first")
	assert.Equal(t, []string{"2001:db8:0:102::/64", "12", "0"}, rows[2], "then the most connections")
	assert.Equal(t, []string{"(4 more)", "", ""}, rows[len(rows)-1])

	out.Reset()
	require.NoError(t, writeStats(&out, &stats.Stats{}))
	assert.NotContains(t, out.String(), "subnets:", "nothing counted yet")
}
