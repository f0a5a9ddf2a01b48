package proxy

import (
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/proxy/shape"
)

// TestHalfClosedClient: a client that half-closes right after its request,
// as `nc -N` and socat do, gets the whole response, for plain HTTP/1.0 and
// HTTP/1.1 (then the connection closes) and for CONNECT, whose tunnel
// carries the half-close on; the upstream is dialed and answers although
// the client's EOF reached egressd first.
func TestHalfClosedClient(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(100 * time.Millisecond) // the client's EOF arrives first
		io.WriteString(w, "served\n")
	}))
	t.Cleanup(up.Close)
	p := startProxy(t, nil)
	for _, head := range []string{
		"GET " + up.URL + "/ HTTP/1.0\r\n\r\n",
		"GET " + up.URL + "/ HTTP/1.1\r\nHost: " + up.Listener.Addr().String() + "\r\n\r\n",
	} {
		c, _ := p.raw(t)
		_, err := io.WriteString(c, head)
		require.NoError(t, err)
		require.NoError(t, c.CloseWrite())
		out, err := io.ReadAll(c) // ends: egressd closes after the response
		require.NoError(t, err)
		assert.True(t, strings.HasPrefix(string(out), "HTTP/1.1 200 OK\r\n") || strings.HasPrefix(string(out), "HTTP/1.0 200 OK\r\n"), "%q: %s", head, out)
		assert.True(t, strings.HasSuffix(string(out), "\r\n\r\nserved\n"), "%q: %s", head, out)
	}

	// CONNECT, then a request inside the tunnel, then EOF.
	c, _ := p.raw(t)
	addr := up.Listener.Addr().String()
	_, err := io.WriteString(c, "CONNECT "+addr+" HTTP/1.1\r\nHost: "+addr+"\r\n\r\nGET / HTTP/1.0\r\n\r\n")
	require.NoError(t, err)
	require.NoError(t, c.CloseWrite())
	out, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.True(t, strings.HasPrefix(string(out), "HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.0 200 OK\r\n"), "%s", out)
	assert.True(t, strings.HasSuffix(string(out), "served\n"), "%s", out)
	require.Eventually(t, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond)
}

// TestResetClientCancels: a client that resets its connection (it is gone,
// not half-closed) while its request waits for the upstream cancels the
// upstream request.
func TestResetClientCancels(t *testing.T) {
	var canceled atomic.Bool
	arrived := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(arrived)
		select {
		case <-r.Context().Done():
			canceled.Store(true)
		case <-time.After(20 * time.Second):
		}
	}))
	t.Cleanup(up.Close)
	var logs logBuffer
	p := startProxy(t, nil, withLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	c, _ := p.raw(t)
	_, err := io.WriteString(c, "GET "+up.URL+"/ HTTP/1.1\r\nHost: x\r\n\r\n")
	require.NoError(t, err)
	<-arrived
	require.NoError(t, c.SetLinger(0))
	require.NoError(t, c.Close()) // a reset
	require.Eventually(t, canceled.Load, 10*time.Second, 10*time.Millisecond, "the upstream request was not canceled")
	require.Eventually(t, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond)
	// Logged as the client's going, not as the upstream's failure.
	assert.Contains(t, logs.String(), `status=499`)
	assert.Contains(t, logs.String(), `reason="the client went away"`)
	ups := p.Upstreams()
	require.Len(t, ups, 1)
	assert.Zero(t, ups[0].Errors, "counted as an upstream error")
}

// A client's half-close while its request waits in the shaper's line does
// not cancel it either: it is served when its turn comes.
func TestHalfClosedClientWaits(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "served\n") }))
	t.Cleanup(up.Close)
	rule, err := shape.ParseRule("127.0.0.1=2r/s,burst=1,wait=10s")
	require.NoError(t, err)
	sh, err := shape.New(shape.Config{Rules: []shape.Rule{rule}})
	require.NoError(t, err)
	p := startProxy(t, nil, func(c *Config) { c.Shaper = sh })
	for range 3 { // the first takes the burst; the others wait their turn
		c, _ := p.raw(t)
		_, err := io.WriteString(c, "GET "+up.URL+"/ HTTP/1.0\r\n\r\n")
		require.NoError(t, err)
		require.NoError(t, c.CloseWrite())
		out, err := io.ReadAll(c)
		require.NoError(t, err)
		assert.True(t, strings.HasSuffix(string(out), "\r\n\r\nserved\n"), "%s", out)
	}
}
