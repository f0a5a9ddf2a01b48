package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

// keptUpstream is an HTTP upstream that counts its connections and answers
// each request with the peer it came from (host:port: one per upstream
// connection).
type keptUpstream struct {
	addr           string
	opened, closed atomic.Int64

	mu      sync.Mutex
	methods []string // every request received, dropped ones included
}

type keptOpts struct {
	idleTimeout time.Duration // the upstream closes connections idle for this long
	dropSecond  bool          // the second request of each connection is read, then the connection closed unanswered
	// connection is the Connection header of the n-th response (from 1) on
	// a connection, "" for none.
	connection func(n int64) string
}

type connRequestsKey struct{}

func startKeptUpstream(t *testing.T, o keptOpts) *keptUpstream {
	t.Helper()
	u := &keptUpstream{}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	u.addr = ln.Addr().String()
	srv := &http.Server{
		IdleTimeout: o.idleTimeout,
		ConnContext: func(ctx context.Context, _ net.Conn) context.Context {
			return context.WithValue(ctx, connRequestsKey{}, new(atomic.Int64))
		},
		ConnState: func(_ net.Conn, st http.ConnState) {
			switch st {
			case http.StateNew:
				u.opened.Add(1)
			case http.StateClosed, http.StateHijacked:
				u.closed.Add(1)
			}
		},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			n := r.Context().Value(connRequestsKey{}).(*atomic.Int64).Add(1)
			u.mu.Lock()
			u.methods = append(u.methods, r.Method)
			u.mu.Unlock()
			if o.dropSecond && n == 2 {
				c, _, err := http.NewResponseController(w).Hijack()
				if err == nil {
					_ = c.Close()
				}
				return
			}
			if o.connection != nil {
				if v := o.connection(n); v != "" {
					w.Header().Set("Connection", v)
					w.Header().Set("X-Hop", "1")
				}
			}
			_, _ = io.WriteString(w, r.RemoteAddr)
		}),
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-done
	})
	return u
}

func (u *keptUpstream) open() int64 { return u.opened.Load() - u.closed.Load() }

func (u *keptUpstream) received(method string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for _, m := range u.methods {
		if m == method {
			n++
		}
	}
	return n
}

// do sends a request through c and returns its status, body and header.
func do(t *testing.T, c *http.Client, method, rawURL, body string) (int, string, http.Header) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, rawURL, rd)
	require.NoError(t, err)
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b), resp.Header
}

// connFDs counts this process's descriptors of TCP connections (not
// listeners) with an end on one of ports: the test's own, whatever else
// the process has open meanwhile.
func connFDs(t *testing.T, ports ...string) int {
	t.Helper()
	inodes := map[string]bool{} // socket inodes of connections on ports
	for _, table := range []string{"/proc/self/net/tcp", "/proc/self/net/tcp6"} {
		b, err := os.ReadFile(table)
		require.NoError(t, err)
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 10 || f[3] == "0A" { // 0A: LISTEN
				continue
			}
			for _, port := range ports {
				hex := fmt.Sprintf(":%04X", atoiPort(t, port))
				if strings.HasSuffix(f[1], hex) || strings.HasSuffix(f[2], hex) {
					inodes[f[9]] = true
				}
			}
		}
	}
	fds, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	n := 0
	for _, fd := range fds {
		link, err := os.Readlink("/proc/self/fd/" + fd.Name())
		if err == nil && strings.HasPrefix(link, "socket:[") && inodes[strings.Trim(link[len("socket:"):], "[]")] {
			n++
		}
	}
	return n
}

func atoiPort(t *testing.T, port string) int {
	t.Helper()
	n, err := strconv.Atoi(port)
	require.NoError(t, err)
	return n
}

// TestRotateConnectionKeepAlive: with -rotate connection, the requests of
// one client connection share one upstream connection from one address;
// two client connections never share theirs; closing a client connection
// closes its upstream connection and gives its address back, and leaves no
// goroutine or descriptor behind.
func TestRotateConnectionKeepAlive(t *testing.T) {
	h := &fakeHold{}
	logs := &logBuffer{}
	p := startProxy(t, nil, withRotate(RotateConnection, h), withJSONLog(logs))
	up := startKeptUpstream(t, keptOpts{})
	target := "http://" + up.addr + "/"
	base := goleak.IgnoreCurrent()
	_, upPort, _ := net.SplitHostPort(up.addr)
	_, proxyPort, _ := net.SplitHostPort(p.addr)

	const n = 20
	clients := []*http.Client{p.client(t), p.client(t)}
	bodies := make([]map[string]int, len(clients))
	for i := range bodies {
		bodies[i] = map[string]int{}
	}
	for range n { // interleaved: both client connections stay open throughout
		for i, c := range clients {
			status, body, _ := do(t, c, http.MethodGet, target, "")
			require.Equal(t, http.StatusOK, status, body)
			bodies[i][body]++
		}
	}
	var hosts []string
	for i := range clients {
		require.Len(t, bodies[i], 1, "client connection %d: one upstream connection for %d requests: %v", i, n, bodies[i])
		for peer, count := range bodies[i] {
			assert.Equal(t, n, count)
			host, _, err := net.SplitHostPort(peer)
			require.NoError(t, err)
			hosts = append(hosts, host)
		}
	}
	assert.NotEqual(t, hosts[0], hosts[1], "two client connections, two addresses")
	assert.EqualValues(t, 2, up.opened.Load(), "two client connections, two upstream connections")
	assert.EqualValues(t, 2, up.open())
	holds, released, dials := h.counts()
	assert.Equal(t, [3]int{2, 0, 2}, [3]int{holds, released, dials}, "holds, released, dials")
	assert.Zero(t, p.dialer.calls(), "nothing dialed from a fresh address")

	// Every request's access line names its address, reused connection or
	// not.
	lines := accessLines(t, logs, nil)
	require.Len(t, lines, 2*n)
	egress := map[string]int{}
	for _, l := range lines {
		egress[fmt.Sprint(l["egress"])]++
	}
	assert.Equal(t, map[string]int{hosts[0]: n, hosts[1]: n}, egress)

	// The first client connection closes: its upstream connection closes,
	// its address is given back; the other keeps both.
	clients[0].CloseIdleConnections()
	require.Eventually(t, func() bool {
		_, released, _ := h.counts()
		return up.open() == 1 && released == 1
	}, 5*time.Second, time.Millisecond, "upstream connections open %d", up.open())
	status, body, _ := do(t, clients[1], http.MethodGet, target, "")
	require.Equal(t, http.StatusOK, status)
	assert.Contains(t, bodies[1], body, "the open client connection still uses its upstream connection")

	clients[1].CloseIdleConnections()
	require.Eventually(t, func() bool {
		_, released, _ := h.counts()
		return up.open() == 0 && released == 2
	}, 5*time.Second, time.Millisecond, "upstream connections open %d", up.open())
	require.Eventually(t, func() bool { return goleak.Find(base) == nil }, 5*time.Second, 10*time.Millisecond,
		"goroutines left: %v", goleak.Find(base))
	require.Eventually(t, func() bool { return connFDs(t, upPort, proxyPort) == 0 }, 5*time.Second, 10*time.Millisecond,
		"descriptors of connections to the upstream or the proxy left: %d", connFDs(t, upPort, proxyPort))
}

// TestKeepAliveUpstreamConnections: a keep-alive client sends n requests
// over one connection; the upstream sees one connection with -rotate
// connection and session, and one per request with -rotate request, as
// before.
func TestKeepAliveUpstreamConnections(t *testing.T) {
	const n = 10
	tests := []struct {
		rotate Rotate
		conns  int
		key    string
	}{
		{RotateRequest, n, ""},
		{RotateConnection, 1, ""},
		{RotateSession, 1, "k"},
	}
	for _, tt := range tests {
		t.Run(string(tt.rotate), func(t *testing.T) {
			p := startProxy(t, nil, withRotate(tt.rotate, &fakeHold{}))
			up := startKeptUpstream(t, keptOpts{})
			c := p.client(t)
			peers := map[string]bool{}
			for range n {
				peers[get(t, c, "http://"+up.addr+"/", tt.key)] = true
			}
			assert.Len(t, peers, tt.conns, "upstream connections: %v", peers)
			assert.EqualValues(t, tt.conns, up.opened.Load())
		})
	}
}

// TestRotateConnectionUpstreamCloses: an upstream that closes a kept
// connection costs an idempotent request nothing (net/http's transport
// sends it again on a new connection, from the same address); a POST is
// not sent twice, and the client is told 502.
func TestRotateConnectionUpstreamCloses(t *testing.T) {
	t.Run("idle timeout", func(t *testing.T) {
		h := &fakeHold{}
		p := startProxy(t, nil, withRotate(RotateConnection, h))
		up := startKeptUpstream(t, keptOpts{idleTimeout: 50 * time.Millisecond})
		c := p.client(t)
		target := "http://" + up.addr + "/"
		first := get(t, c, target, "")
		require.Eventually(t, func() bool { return up.open() == 0 }, 5*time.Second, time.Millisecond, "the upstream closed its idle connection")
		second := get(t, c, target, "")
		assert.NotEqual(t, first, second, "a new upstream connection")
		assert.Equal(t, strings.Split(first, ":")[0], strings.Split(second, ":")[0], "from the same address")
		holds, _, _ := h.counts()
		assert.Equal(t, 1, holds)
	})

	t.Run("closed under a request", func(t *testing.T) {
		h := &fakeHold{}
		p := startProxy(t, nil, withRotate(RotateConnection, h))
		up := startKeptUpstream(t, keptOpts{dropSecond: true})
		c := p.client(t)
		target := "http://" + up.addr + "/"
		hosts := map[string]bool{}
		for i := range 5 {
			status, body, _ := do(t, c, http.MethodGet, target, "")
			require.Equal(t, http.StatusOK, status, "GET %d: %s", i, body)
			hosts[strings.Split(body, ":")[0]] = true
		}
		assert.Len(t, hosts, 1, "one address")
		assert.Equal(t, 9, up.received(http.MethodGet), "each GET after the first sent twice: once dropped, once answered")

		status, body, _ := do(t, c, http.MethodPost, target, "data")
		assert.Equal(t, http.StatusBadGateway, status, body)
		assertCleanErrorBody(t, body)
		assert.Equal(t, 1, up.received(http.MethodPost), "a POST is never sent twice")
	})
}

// TestKeepAliveHopByHop: on a kept upstream connection, the headers each
// response's Connection header names are removed, also from the response
// that closes the connection (Connection: close, X-Hop), whose Connection
// header Go's client drops before egressd sees it.
func TestKeepAliveHopByHop(t *testing.T) {
	for _, tt := range []struct {
		rotate Rotate
		key    string
	}{{RotateConnection, ""}, {RotateSession, "k"}} {
		t.Run(string(tt.rotate), func(t *testing.T) {
			p := startProxy(t, nil, withRotate(tt.rotate, &fakeHold{}))
			up := startKeptUpstream(t, keptOpts{connection: func(n int64) string {
				if n == 3 {
					return "close, X-Hop"
				}
				return "X-Hop"
			}})
			c := p.client(t)
			req, err := http.NewRequest(http.MethodGet, "http://"+up.addr+"/", nil)
			require.NoError(t, err)
			if tt.key != "" {
				req.Header.Set(SessionHeader, tt.key)
			}
			for i := range 4 {
				resp, err := c.Do(req)
				require.NoError(t, err)
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				assert.Equal(t, http.StatusOK, resp.StatusCode)
				assert.Empty(t, resp.Header.Values("X-Hop"), "response %d", i+1)
				assert.Empty(t, resp.Header.Values("Connection"), "response %d", i+1)
			}
			assert.EqualValues(t, 2, up.opened.Load(), "the third response closed the first upstream connection")
		})
	}
}
