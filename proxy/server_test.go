package proxy

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNewValidates(t *testing.T) {
	d := (&fakeDialer{}).Dial
	tests := []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{name: "ok", cfg: Config{Dial: d}},
		{name: "no dial", cfg: Config{}, wantErr: "Dial is required"},
		{name: "negative", cfg: Config{Dial: d, TunnelIdleTimeout: -time.Second}, wantErr: "TunnelIdleTimeout is negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := New(tt.cfg)
			if tt.wantErr == "" {
				require.NoError(t, err)
				assert.Equal(t, DefaultDialTimeout, s.cfg.DialTimeout)
				assert.Equal(t, DefaultResponseHeaderTimeout, s.cfg.ResponseHeaderTimeout)
				assert.Equal(t, DefaultTunnelIdleTimeout, s.cfg.TunnelIdleTimeout)
				assert.NotNil(t, s.cfg.Logger)
				return
			}
			assert.ErrorContains(t, err, tt.wantErr)
			assert.Nil(t, s)
		})
	}
}

// The transport must never skip verification, use a proxy from the
// environment, or keep upstream connections.
func TestTransportIsSafe(t *testing.T) {
	s, err := New(Config{Dial: (&fakeDialer{}).Dial})
	require.NoError(t, err)
	assert.Same(t, s.tr, s.gp.Tr)
	assert.Nil(t, s.tr.Proxy)
	assert.Nil(t, s.tr.TLSClientConfig)
	assert.True(t, s.tr.DisableKeepAlives)
	assert.True(t, s.tr.DisableCompression)
	assert.False(t, s.tr.ForceAttemptHTTP2)
	assert.True(t, s.gp.KeepAcceptEncoding)
	assert.False(t, s.gp.Verbose)
	_, err = s.gp.ConnectDial("tcp", "example.test:443")
	assert.Error(t, err)
	_, err = s.gp.ConnectDialWithReq(nil, "tcp", "example.test:443")
	assert.Error(t, err)
}

func TestShutdownWaitsForTunnel(t *testing.T) {
	u := startTCPUpstream(t)
	p := startProxy(t, nil)
	c, br, resp := p.connect(t, u.addr, nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	s := u.accept(t)
	require.Equal(t, 1, p.Active())

	done := shutdownBlocked(t, p, "a tunnel open")
	<-p.served // listeners are closed at once
	assert.NoError(t, p.serveErr)
	_, err := net.Dial("tcp4", p.addr)
	assert.Error(t, err, "no new connections during shutdown")

	// The tunnel still works, then ends.
	_, err = io.WriteString(c, "still")
	require.NoError(t, err)
	assert.Equal(t, "still", string(readFull(t, s, 5)))
	_, err = io.WriteString(s, "here")
	require.NoError(t, err)
	assert.Equal(t, "here", string(readFull(t, br, 4)))
	require.NoError(t, c.Close())
	_, err = io.ReadAll(s)
	require.NoError(t, err)
	require.NoError(t, s.Close())

	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return after the tunnel ended")
	}
	assert.Equal(t, 0, p.Active())
}

func TestShutdownForceClosesTunnel(t *testing.T) {
	u := startTCPUpstream(t)
	p := startProxy(t, nil)
	_, br, resp := p.connect(t, u.addr, nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	s := u.accept(t)

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err := p.Shutdown(ctx)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Equal(t, 0, p.Active())

	_, err = br.ReadByte()
	assert.ErrorIs(t, err, io.EOF, "client side closed")
	_, err = s.Read(make([]byte, 1))
	assert.ErrorIs(t, err, io.EOF, "upstream side closed")
}

func TestShutdownWaitsForRequest(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(started)
		<-release
		_, _ = io.WriteString(w, "late")
	}))
	t.Cleanup(up.Close)
	p := startProxy(t, nil)

	type result struct {
		body string
		err  error
	}
	got := make(chan result, 1)
	go func() {
		resp, err := p.client(t).Get(up.URL)
		if err != nil {
			got <- result{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		got <- result{string(b), err}
	}()
	<-started

	done := shutdownBlocked(t, p, "a request in flight")
	close(release)
	r := <-got
	require.NoError(t, r.err)
	assert.Equal(t, "late", r.body)
	assert.NoError(t, <-done)
}

func TestAccessLog(t *testing.T) {
	var buf logBuffer
	logger := slog.New(slog.NewJSONHandler(&buf, nil))
	up := echoUpstream(t)
	tu := startTCPUpstream(t)
	p := startProxy(t, nil, withLogger(logger))

	// Plain HTTP: 5 bytes up, 5 back.
	resp, err := p.client(t).Post(up.URL+"/echo", "text/plain", strings.NewReader("hello"))
	require.NoError(t, err)
	_, _ = io.ReadAll(resp.Body)
	resp.Body.Close()

	// Tunnel: 3 bytes up (1 of them early), 4 down.
	c, br, resp := p.connect(t, tu.addr, []byte("a"))
	require.Equal(t, http.StatusOK, resp.StatusCode)
	s := tu.accept(t)
	_, err = io.WriteString(c, "bc")
	require.NoError(t, err)
	readFull(t, s, 3)
	_, err = io.WriteString(s, "wxyz")
	require.NoError(t, err)
	readFull(t, br, 4)
	require.NoError(t, c.CloseWrite())
	require.NoError(t, s.Close())
	_, _ = io.ReadAll(br)

	// A failed request: no egress address.
	p.dialer.fail = func(context.Context, string) error { return opError(errBoom) }
	resp, err = p.client(t).Get("http://example.test/")
	require.NoError(t, err)
	resp.Body.Close()

	// Lines by method: the tunnel's line is written when its handler
	// returns, which may come after the next request's.
	var lines map[string]map[string]any
	require.Eventually(t, func() bool {
		lines = map[string]map[string]any{}
		sc := bufio.NewScanner(strings.NewReader(buf.String()))
		for sc.Scan() {
			var m map[string]any
			require.NoError(t, json.Unmarshal(sc.Bytes(), &m))
			if m["msg"] == "request" {
				lines[m["method"].(string)] = m
			}
		}
		return len(lines) == 3
	}, 10*time.Second, 10*time.Millisecond)

	want := map[string]map[string]any{
		"POST":    {"host": strings.TrimPrefix(up.URL, "http://"), "status": 200.0, "bytes": 5.0, "bytes_up": 5.0, "egress": "127.0.0.1"},
		"CONNECT": {"host": tu.addr, "status": 200.0, "bytes": 4.0, "bytes_up": 3.0, "egress": "127.0.0.1"},
		"GET":     {"host": "example.test:80", "status": 502.0, "bytes": float64(len("upstream example.test failed\n")), "bytes_up": 0.0, "egress": ""},
	}
	for method, w := range want {
		l := lines[method]
		require.NotNil(t, l, method)
		assert.Equal(t, "INFO", l["level"])
		for k, v := range w {
			assert.Equal(t, v, l[k], "%s line, field %s", method, k)
		}
		assert.Contains(t, l, "duration")
		assert.True(t, strings.HasPrefix(l["client"].(string), "127.0.0.1:"), "client %v", l["client"])
	}
	// The operator's warning carries the full error; the client's text did not.
	assert.Contains(t, buf.String(), egressIP)
}

// shutdownBlocked starts p.Shutdown in the background, fails the test if it
// returns within 300ms although what is still open, and returns its result.
func shutdownBlocked(t *testing.T, p *testProxy, what string) <-chan error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		done <- p.Shutdown(ctx)
	}()
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v with %s", err, what)
	case <-time.After(300 * time.Millisecond):
	}
	return done
}
