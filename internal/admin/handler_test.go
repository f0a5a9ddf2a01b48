package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/proxy/stats"
)

// serve serves h on a unix socket opened by Listen and returns a Client
// for it.
func serve(t *testing.T, h http.Handler) *Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := Listen(sock)
	require.NoError(t, err)
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return NewClient(sock)
}

// get is GET path of c's server: status, Content-Type and body.
func get(t *testing.T, c *Client, path string) (int, string, string) {
	t.Helper()
	resp, err := c.hc.Get(c.base + path)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, resp.Header.Get("Content-Type"), string(b)
}

func TestHandler(t *testing.T) {
	started := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	var reloadErr error
	c := serve(t, NewHandler(Config{
		Stats: func() *stats.Stats { return &stats.Stats{Started: started, UptimeSeconds: 1.5} },
		Addrs: func() []stats.Addr { return []stats.Addr{{Addr: "2001:db8::1", State: "ready", Since: started}} },
		Metrics: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			io.WriteString(w, "egress_uptime_seconds 1.5\n")
		}),
		Reload: func() (string, error) { return "reloaded: limit changed", reloadErr },
	}))

	code, ctype, body := get(t, c, "/")
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "text/plain; charset=utf-8", ctype)
	assert.Contains(t, body, "GET /stats          statistics, JSON\n")
	assert.Contains(t, body, "GET /debug/pprof/   profiles\n")

	code, ctype, body = get(t, c, "/stats")
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "application/json", ctype)
	var s stats.Stats
	require.NoError(t, json.Unmarshal([]byte(body), &s))
	assert.Equal(t, 1.5, s.UptimeSeconds)
	assert.True(t, strings.HasSuffix(body, "}\n"), "indented, one newline at the end")

	code, _, body = get(t, c, "/addrs")
	assert.Equal(t, http.StatusOK, code)
	assert.Contains(t, body, `"addr": "2001:db8::1"`)

	code, _, body = get(t, c, "/metrics")
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "egress_uptime_seconds 1.5\n", body)

	code, _, _ = get(t, c, "/nosuch")
	assert.Equal(t, http.StatusNotFound, code)

	msg, err := c.Reload(t.Context())
	require.NoError(t, err)
	assert.Equal(t, "reloaded: limit changed", msg)

	reloadErr = errors.New(`config /etc/egressd.yaml: line 3: unknown key "limits"`)
	code, body = post(t, c, "/reload")
	assert.Equal(t, http.StatusUnprocessableEntity, code)
	assert.JSONEq(t, `{"ok":false,"error":"config /etc/egressd.yaml: line 3: unknown key \"limits\""}`, body)
	_, err = c.Reload(t.Context())
	assert.EqualError(t, err, reloadErr.Error())

	code, _, _ = get(t, c, "/reload")
	assert.Equal(t, http.StatusMethodNotAllowed, code, "POST only")
	code, _ = post(t, c, "/stats")
	assert.Equal(t, http.StatusMethodNotAllowed, code, "GET only")
}

func post(t *testing.T, c *Client, path string) (int, string) {
	t.Helper()
	resp, err := c.hc.Post(c.base+path, "", nil)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

func TestHandlerWithoutReload(t *testing.T) {
	c := serve(t, NewHandler(Config{}))
	code, _ := post(t, c, "/reload")
	assert.Equal(t, http.StatusNotFound, code)
	_, err := c.Reload(t.Context())
	assert.ErrorContains(t, err, "answered POST /reload with 404 Not Found")
}

func TestPprof(t *testing.T) {
	c := serve(t, NewHandler(Config{}))
	tests := []struct {
		path  string
		code  int
		ctype string
		body  string // contained in the body
	}{
		{"/debug/pprof/", http.StatusOK, "text/html; charset=utf-8", "<a href='goroutine?debug=1'>goroutine</a>"},
		{"/debug/pprof/goroutine?debug=1", http.StatusOK, "text/plain; charset=utf-8", "goroutine profile: total "},
		{"/debug/pprof/heap?gc=1&debug=1", http.StatusOK, "text/plain; charset=utf-8", "heap profile: "},
		{"/debug/pprof/allocs", http.StatusOK, "application/octet-stream", ""},
		{"/debug/pprof/cmdline", http.StatusOK, "text/plain; charset=utf-8", "admin.test"},
		{"/debug/pprof/symbol", http.StatusOK, "text/plain; charset=utf-8", "num_symbols: 1\n"},
		{"/debug/pprof/trace?seconds=0.01", http.StatusOK, "application/octet-stream", "go 1."},
		{"/debug/pprof/profile?seconds=1", http.StatusOK, "application/octet-stream", ""},
		{"/debug/pprof/goroutine?seconds=1", http.StatusOK, "application/octet-stream", ""},
		{"/debug/pprof/nosuch", http.StatusNotFound, "text/plain; charset=utf-8", "Unknown profile\n"},
		{"/debug/pprof/goroutine?seconds=x", http.StatusBadRequest, "text/plain; charset=utf-8", `invalid value for "seconds"`},
		{"/debug/pprof/goroutine?seconds=1&debug=1", http.StatusBadRequest, "text/plain; charset=utf-8", "seconds and debug params are incompatible\n"},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			code, ctype, body := get(t, c, tt.path)
			assert.Equal(t, tt.code, code, body)
			assert.Equal(t, tt.ctype, ctype)
			assert.Contains(t, body, tt.body)
			if ctype == "application/octet-stream" {
				assert.NotEmpty(t, body)
			}
		})
	}
	// A symbol lookup names the function at a program counter.
	code, _, body := get(t, c, "/debug/pprof/symbol?"+pcOf(t))
	assert.Equal(t, http.StatusOK, code)
	assert.Contains(t, body, "internal/admin.NewHandler")
}

// pcOf returns the program counter of NewHandler's entry, in hex.
func pcOf(t *testing.T) string {
	t.Helper()
	pc := reflect.ValueOf(NewHandler).Pointer()
	require.NotZero(t, pc)
	return fmt.Sprintf("%#x", pc)
}

// The admin API is served on its own mux only (net/http/pprof's own
// registration on the default mux is Go's, and nothing serves that mux).
func TestNothingOnDefaultServeMux(t *testing.T) {
	_ = NewHandler(Config{})
	for _, path := range []string{"/", "/stats", "/metrics", "/addrs", "/reload"} {
		_, pattern := http.DefaultServeMux.Handler(httptest.NewRequest(http.MethodGet, path, nil))
		assert.Empty(t, pattern, "%s is on http.DefaultServeMux", path)
	}
}

func TestClientContext(t *testing.T) {
	block := make(chan struct{})
	t.Cleanup(func() { close(block) })
	c := serve(t, NewHandler(Config{Stats: func() *stats.Stats { <-block; return &stats.Stats{} }}))
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	_, err := c.Get(ctx, "/stats")
	assert.ErrorIs(t, err, context.DeadlineExceeded)
}

// TestRotate: POST /sessions/KEY/rotate and Client.Rotate. A session that
// held an address says which; an unknown session is 404, egressd without
// sessions 409, each with one line that Client.Rotate returns as its error.
// Keys travel escaped.
func TestRotate(t *testing.T) {
	var got []string
	c := serve(t, NewHandler(Config{Rotate: func(_ context.Context, key string) (bool, netip.Addr, error) {
		got = append(got, key)
		switch key {
		case "a":
			return true, netip.MustParseAddr("2001:db8::5"), nil
		case "new":
			return false, netip.Addr{}, nil
		case "off":
			return false, netip.Addr{}, fmt.Errorf("%w: the proxy says so", ErrNoSessions)
		case "broken":
			return false, netip.Addr{}, errors.New("something else")
		}
		return false, netip.Addr{}, fmt.Errorf("%w: the proxy says so", ErrNoSession)
	}}))

	res, err := c.Rotate(t.Context(), "a")
	require.NoError(t, err)
	assert.Equal(t, RotateResult{OK: true, Session: "a", Rotated: true, Old: "2001:db8::5",
		Message: `session "a" gave up 2001:db8::5: its next connection leaves from a new address; connections open from the old one keep going`}, res)

	res, err = c.Rotate(t.Context(), "new")
	require.NoError(t, err)
	assert.False(t, res.Rotated)
	assert.Equal(t, `session "new" holds no address yet: its first connection leaves from a fresh one`, res.Message)

	code, body := post(t, c, "/sessions/gone/rotate")
	assert.Equal(t, http.StatusNotFound, code)
	assert.JSONEq(t, `{"ok":false,"session":"gone","rotated":false,"error":"no session \"gone\" is open: no request had that key, or it idled out (-session-idle)"}`, body)
	_, err = c.Rotate(t.Context(), "gone")
	assert.EqualError(t, err, `no session "gone" is open: no request had that key, or it idled out (-session-idle)`)

	_, err = c.Rotate(t.Context(), "off")
	assert.EqualError(t, err, "egressd does not run -rotate session: it has no sessions to rotate")
	code, _ = post(t, c, "/sessions/off/rotate")
	assert.Equal(t, http.StatusConflict, code)

	_, err = c.Rotate(t.Context(), "broken")
	assert.ErrorContains(t, err, "answered POST /sessions/broken/rotate with 500 Internal Server Error")
	assert.ErrorContains(t, err, "something else")

	// Keys with a slash, a space, a percent sign or non-ASCII arrive whole.
	got = nil
	// So do "." and "..", which a mux would clean out of a path.
	keys := []string{"a/b", "build 42", "100%", "ключ", ".", "..", "a.b"}
	for _, key := range keys {
		_, err = c.Rotate(t.Context(), key)
		assert.ErrorContains(t, err, "no session", "key %q", key)
	}
	assert.Equal(t, keys, got)

	_, err = c.Rotate(t.Context(), "")
	assert.EqualError(t, err, "empty session key")
	code, _ = post(t, c, "/sessions//rotate")
	assert.NotEqual(t, http.StatusOK, code)
	code, _, _ = get(t, c, "/sessions/a/rotate")
	assert.Equal(t, http.StatusMethodNotAllowed, code, "POST only")

	// An egressd without rotation (an older one) answers 404 with no JSON.
	old := serve(t, NewHandler(Config{}))
	_, err = old.Rotate(t.Context(), "a")
	assert.ErrorContains(t, err, "answered POST /sessions/a/rotate with 404 Not Found: 404 page not found")
}
