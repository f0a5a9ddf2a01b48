package proxy

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/stats"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"120", 2 * time.Minute, true},
		{" 0 ", 0, true},
		{"Wed, 25 Nov 2026 12:00:30 GMT", 30 * time.Second, true},
		{"Wed, 25 Nov 2026 11:00:00 GMT", 0, true}, // in the past: no hold
		{"", 0, false},
		{"-5", 0, false},
		{"soon", 0, false},
	}
	for _, tt := range tests {
		got, ok := parseRetryAfter(tt.in, now)
		assert.Equal(t, tt.ok, ok, "%q", tt.in)
		assert.Equal(t, tt.want, got, "%q", tt.in)
	}
}

func TestRetryAfterSeconds(t *testing.T) {
	assert.Equal(t, 1, shape.RetryAfterSeconds(0))
	assert.Equal(t, 1, shape.RetryAfterSeconds(300*time.Millisecond))
	assert.Equal(t, 2, shape.RetryAfterSeconds(1001*time.Millisecond))
	assert.Equal(t, 60, shape.RetryAfterSeconds(time.Minute))
}

func TestNormHost(t *testing.T) {
	assert.Equal(t, "aur.archlinux.org", shape.NormHost("AUR.ArchLinux.org."))
	assert.Equal(t, "2001:db8::1", shape.NormHost("2001:db8::1"))
	assert.Zero(t, testing.AllocsPerRun(100, func() { _ = shape.NormHost("aur.archlinux.org") }))
}

// shapedProxy starts a proxy with one rule and its own statistics.
func shapedProxy(t *testing.T, rule string, opts ...proxyOpt) (*testProxy, *stats.Registry) {
	t.Helper()
	r, err := shape.ParseRule(rule)
	require.NoError(t, err)
	sh, err := shape.New(shape.Config{Rules: []shape.Rule{r}})
	require.NoError(t, err)
	reg := stats.NewRegistry(10)
	opts = append(opts, func(c *Config) { c.Shaper = sh; c.Stats = reg })
	return startProxy(t, nil, opts...), reg
}

func upstreamNamed(t *testing.T, reg *stats.Registry, name string) stats.UpstreamStats {
	t.Helper()
	for _, u := range reg.Snapshot() {
		if u.Upstream == name {
			return u
		}
	}
	t.Fatalf("no upstream %q", name)
	return stats.UpstreamStats{}
}

func TestShapingAndAccounting(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/busy" {
			w.Header().Set("Retry-After", "60")
			w.WriteHeader(http.StatusTooManyRequests)
			return
		}
		io.WriteString(w, "hello")
	}))
	t.Cleanup(up.Close)
	p, reg := shapedProxy(t, "127.0.0.1=1r/h,burst=2,wait=100ms")
	c := p.client(t)

	get := func(path string) (*http.Response, string) {
		t.Helper()
		resp, err := c.Get(up.URL + path)
		require.NoError(t, err)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, string(b)
	}
	resp, body := get("/")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "hello", body)

	// The upstream pushes back: its 429 reaches the client, and the next
	// request is held (and, past its wait, refused by egressd).
	resp, _ = get("/busy")
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	calls := p.dialer.calls()
	resp, body = get("/")
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.Equal(t, "60", resp.Header.Get("Retry-After"))
	assert.True(t, strings.HasSuffix(body, "\n") && strings.Count(body, "\n") == 1, "one line: %q", body)
	assert.Equal(t, calls, p.dialer.calls(), "a refused request is never dialed")

	u := upstreamNamed(t, reg, "127.0.0.1")
	assert.Equal(t, "127.0.0.1", u.Rule)
	assert.Equal(t, uint64(3), u.Requests)
	assert.Equal(t, uint64(1), u.Rejected)
	assert.Equal(t, uint64(1), u.Throttled)
	assert.Zero(t, u.Errors)
	assert.Zero(t, u.InFlight)
	assert.Zero(t, u.Waiting)
	assert.Equal(t, uint64(len("hello")), u.BytesDown)
	assert.Equal(t, uint64(2), u.LatencyHistogram.Count, "two requests got a response head")
}

// TestAdmittedLog: at debug level, a request that a rule lets through logs
// "admitted" when it may go upstream (the record's time) with how long it
// waited; a request no rule covers logs no such line, and neither does the
// info level.
func TestAdmittedLog(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "hello") }))
	t.Cleanup(up.Close)
	_, port, err := net.SplitHostPort(up.Listener.Addr().String())
	require.NoError(t, err)
	admitted := func(level slog.Level) []map[string]string {
		var logs logBuffer
		p, _ := shapedProxy(t, "127.0.0.1=100r/s,burst=10",
			withLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: level}))))
		c := p.client(t)
		for _, host := range []string{"127.0.0.1", "localhost"} {
			resp, err := c.Get("http://" + net.JoinHostPort(host, port) + "/")
			require.NoError(t, err)
			resp.Body.Close()
			require.Equal(t, http.StatusOK, resp.StatusCode)
		}
		var recs []map[string]string
		for line := range strings.Lines(logs.String()) {
			if rec := parseLogLine(line); rec["msg"] == "admitted" {
				recs = append(recs, rec)
			}
		}
		return recs
	}

	recs := admitted(slog.LevelDebug)
	require.Len(t, recs, 1, "one line, for the shaped request only")
	assert.Equal(t, "127.0.0.1", recs[0]["host"])
	assert.Equal(t, "127.0.0.1", recs[0]["rule"])
	assert.NotEmpty(t, recs[0]["waited"])
	assert.NotEmpty(t, recs[0]["time"])
	assert.Empty(t, admitted(slog.LevelInfo), "admissions are debug lines")
}

// parseLogLine splits a log/slog text line into its key=value pairs (values
// without spaces, as the admitted line's are).
func parseLogLine(line string) map[string]string {
	rec := map[string]string{}
	for _, f := range strings.Fields(line) {
		if k, v, ok := strings.Cut(f, "="); ok {
			rec[k] = v
		}
	}
	return rec
}

func TestAccountingCountsErrors(t *testing.T) {
	p, reg := shapedProxy(t, "*=100r/s,burst=10")
	p.dialer.fail = func(context.Context, string) error { return errors.Join(netutil.ErrNoAddress) }
	resp, err := p.client(t).Get("http://upstream.test/")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)

	_, _, resp = p.connect(t, "upstream.test:443", nil)
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)

	u := upstreamNamed(t, reg, "upstream.test")
	assert.Equal(t, "*", u.Rule)
	assert.Equal(t, uint64(2), u.Requests)
	assert.Equal(t, uint64(2), u.Errors)
	assert.Zero(t, u.InFlight, "failed requests leave the in-flight count")
}
