package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/egressd/egressd/proxy/stats"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// cannedStats is what the fake egressd serves on GET /stats.
func cannedStats() stats.Stats {
	ups := []stats.UpstreamStats{
		{
			Upstream: "api.example.com", Rule: "*.example.com",
			Counters: stats.Counters{
				Requests: 120, InFlight: 3, Waiting: 2, WaitSeconds: 2.5,
				Rejected: 4, Throttled: 1, Errors: 2,
				BytesUp: 1 << 20, BytesDown: 3*(1<<20) + 300<<10,
			},
			Latency: stats.Quantiles{P50: 0.000155, P90: 0.000199, P99: 104.8576},
		},
		{
			Upstream: "tab\there.test", Counters: stats.Counters{Requests: 1, IPv4: 1, BytesDown: 10},
			Latency: stats.Quantiles{P50: 0.0024, P90: 0.00304, P99: 0.003184},
		},
		{Upstream: "idle.test"},
	}
	return stats.Stats{
		Started:       time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC),
		UptimeSeconds: 3661.5,
		Totals:        stats.SumTotals(ups),
		Upstreams:     ups,
		Addresses: stats.AddressStats{
			Live: 9, Ready: 4, InUse: 3, Warm: 2, Fresh: 600, Reused: 400, Retries: 3, Overflows: 1,
			Budget: &stats.Budget{Rate: 2.5, MaxRate: 5, Burst: 96, Cap: 246, WindowSeconds: 60},
			Added:  1000, Removed: 991, AddFailures: 1, RemoveFailures: 2,
			AddLatency: stats.Quantiles{P50: 0.0004, P90: 0.00072, P99: 0.000792},
		},
		Clients: stats.ClientStats{
			Connections: 7, AcceptErrors: 3,
			Refused: map[string]uint64{"header_timeout": 1000, "login_throttled": 190, "max_conns": 0},
		},
		Sessions: stats.SessionStats{
			Open:      2,
			Rotations: map[string]uint64{"header": 1, "user_name": 0, "admin": 0, "status": 3},
		},
	}
}

// cannedAddrs is what the fake egressd serves on GET /addrs, not sorted.
func cannedAddrs() []stats.Addr {
	t0 := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	return []stats.Addr{
		{Addr: "2001:db8::10", State: "ready", Since: t0.Add(-2 * time.Second), AgeSeconds: 2},
		{Addr: "2001:db8::2", State: "in-use", Since: t0.Add(-90 * time.Second), AgeSeconds: 90},
		{Addr: "2001:db8::3", State: "warm", Since: t0.Add(-2 * time.Hour), AgeSeconds: 7200},
		{Addr: "2001:db8::1", State: "ready", Since: t0.Add(-2 * time.Second), AgeSeconds: 2},
	}
}

// fakeEgressd serves the admin API with canned answers.
type fakeEgressd struct {
	statsRequests atomic.Int64
	failFrom      atomic.Int64 // answer 503 to the nth request to /stats and later ones; never if 0
}

func (f *fakeEgressd) handler(t *testing.T) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		n := f.statsRequests.Add(1)
		if ff := f.failFrom.Load(); ff > 0 && n >= ff {
			http.Error(w, "shutting down\nsecond line", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		assert.NoError(t, json.NewEncoder(w).Encode(cannedStats()))
	})
	mux.HandleFunc("GET /addrs", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		assert.NoError(t, json.NewEncoder(w).Encode(cannedAddrs()))
	})
	return mux
}

// serve starts f on network ("unix" or "tcp") and returns the -admin value
// that reaches it.
func (f *fakeEgressd) serve(t *testing.T, network string) string {
	t.Helper()
	var addr string
	switch network {
	case "unix":
		addr = filepath.Join(t.TempDir(), "admin.sock")
	case "tcp":
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen(network, addr)
	require.NoError(t, err)
	srv := &http.Server{Handler: f.handler(t), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// result is what one egressctl invocation printed and its exit code.
type result struct {
	code           int
	stdout, stderr string
}

// egressctl runs the command line args as main would, on a non-terminal.
func egressctl(t *testing.T, args ...string) result {
	t.Helper()
	return egressctlCtx(t, t.Context(), false, args...)
}

func egressctlCtx(t *testing.T, ctx context.Context, terminal bool, args ...string) result {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := report(&stderr, run(ctx, args, &stdout, terminal))
	return result{code, stdout.String(), stderr.String()}
}

// networks are the two kinds of admin address.
var networks = []string{"unix", "tcp"}

func TestUsage(t *testing.T) {
	admin := new(fakeEgressd).serve(t, "unix")
	tests := []struct {
		name       string
		args       []string
		code       int
		stdout     string // contained in stdout
		stderr     string // stderr, exactly
		stderrHint string // contained in stderr
	}{
		{name: "-h", args: []string{"-h"}, code: 0, stdout: "Usage: egressctl [-admin ADDR] COMMAND"},
		{name: "-h first line", args: []string{"-h"}, code: 0, stdout: "egressctl shows what a running egressd is doing"},
		{name: "-version", args: []string{"-version"}, code: 0, stdout: "egressctl "},
		{name: "-version before a command", args: []string{"-version", "stats"}, code: 0, stdout: "egressctl "},
		{name: "--help", args: []string{"--help"}, code: 0, stdout: "Commands:"},
		{name: "help", args: []string{"help"}, code: 0, stdout: "Commands:"},
		{name: "stats -h", args: []string{"stats", "-h"}, code: 0, stdout: "-watch DURATION"},
		{name: "addrs -h", args: []string{"addrs", "-h"}, code: 0, stdout: "Usage: egressctl [-admin ADDR] addrs"},
		{name: "no command", args: nil, code: 2,
			stderr: "egressctl: no command given (run 'egressctl -h' for usage)\n"},
		{name: "unknown command", args: []string{"-admin", admin, "frobnicate"}, code: 2,
			stderr: "egressctl: unknown command \"frobnicate\" (run 'egressctl -h' for usage)\n"},
		{name: "unknown global flag", args: []string{"-verbose", "stats"}, code: 2,
			stderr: "egressctl: flag provided but not defined: -verbose (run 'egressctl -h' for usage)\n"},
		{name: "unknown stats flag", args: []string{"-admin", admin, "stats", "-yaml"}, code: 2,
			stderr: "egressctl: stats: flag provided but not defined: -yaml (run 'egressctl stats -h' for usage)\n"},
		{name: "bad watch", args: []string{"-admin", admin, "stats", "-watch", "often"}, code: 2,
			stderr: "egressctl: stats: invalid value \"often\" for flag -watch: want a positive duration such as 2s or 500ms (run 'egressctl stats -h' for usage)\n"},
		{name: "zero watch", args: []string{"-admin", admin, "stats", "-watch", "0s"}, code: 2, stderrHint: "-watch"},
		{name: "negative watch", args: []string{"-admin", admin, "stats", "-watch=-1s"}, code: 2, stderrHint: "-watch"},
		{name: "stray argument", args: []string{"-admin", admin, "addrs", "extra"}, code: 2,
			stderr: "egressctl: addrs: unexpected argument \"extra\" (run 'egressctl addrs -h' for usage)\n"},
		{name: "empty admin", args: []string{"-admin", "", "stats"}, code: 2, stderrHint: "-admin is empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := egressctl(t, tt.args...)
			assert.Equal(t, tt.code, r.code)
			assert.Contains(t, r.stdout, tt.stdout)
			if tt.code == 0 {
				assert.Empty(t, r.stderr)
				return
			}
			assert.Empty(t, r.stdout)
			assert.Equal(t, 1, strings.Count(r.stderr, "\n"), "one line: %q", r.stderr)
			if tt.stderr != "" {
				assert.Equal(t, tt.stderr, r.stderr)
			}
			assert.Contains(t, r.stderr, tt.stderrHint)
		})
	}
}

func TestUnreachable(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "admin.sock")

	// A TCP port that nobody listens on.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closed := ln.Addr().String()
	require.NoError(t, ln.Close())

	tests := []struct {
		name, admin, want string
	}{
		{"missing socket", missing, "egressctl: cannot reach egressd at " + missing +
			" (is it running? point -admin at its admin socket or address): dial unix " + missing +
			": connect: no such file or directory\n"},
		{"closed port", closed, "egressctl: cannot reach egressd at " + closed +
			" (is it running? point -admin at its admin socket or address): dial tcp " + closed +
			": connect: connection refused\n"},
	}
	for _, tt := range tests {
		for _, cmd := range [][]string{{"stats"}, {"stats", "-json"}, {"stats", "-watch", "1s"}, {"addrs"}} {
			t.Run(tt.name+"/"+strings.Join(cmd, " "), func(t *testing.T) {
				r := egressctl(t, append([]string{"-admin", tt.admin}, cmd...)...)
				assert.Equal(t, 1, r.code)
				assert.Empty(t, r.stdout)
				assert.Equal(t, tt.want, r.stderr)
			})
		}
	}
}

func TestNotOK(t *testing.T) {
	f := new(fakeEgressd)
	f.failFrom.Store(1)
	admin := f.serve(t, "unix")

	r := egressctl(t, "-admin", admin, "stats")
	assert.Equal(t, 1, r.code)
	assert.Equal(t, "egressctl: egressd at "+admin+" answered GET /stats with 503 Service Unavailable: shutting down second line\n", r.stderr)

	r = egressctl(t, "-admin", admin, "nosuch")
	assert.Equal(t, 2, r.code)
}
