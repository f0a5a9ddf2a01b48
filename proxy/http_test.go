package proxy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// echoUpstream answers GET /download/N with N pattern bytes, and any other
// request with its method in X-Method and its body echoed back.
func echoUpstream(t testing.TB) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n, ok := strings.CutPrefix(r.URL.Path, "/download/"); ok {
			size, err := strconv.Atoi(n)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			w.Header().Set("Content-Length", strconv.Itoa(size))
			_, _ = w.Write(pattern(size))
			return
		}
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("X-Method", r.Method)
		_, _ = w.Write(body)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestForwardMethods(t *testing.T) {
	up := echoUpstream(t)
	p := startProxy(t, nil)
	c := p.client(t)
	const big = 8 << 20

	tests := []struct {
		name   string
		method string
		path   string
		body   []byte // sent, and expected back unless want is set
		want   []byte
	}{
		{name: "GET download", method: http.MethodGet, path: "/download/" + strconv.Itoa(big), want: pattern(big)},
		{name: "POST upload", method: http.MethodPost, path: "/up", body: pattern(big)},
		{name: "PUT upload", method: http.MethodPut, path: "/up", body: pattern(big / 2)},
		{name: "DELETE empty", method: http.MethodDelete, path: "/x", body: nil, want: []byte{}},
		{name: "custom method", method: "FROBNICATE", path: "/x", body: []byte("frob")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var body io.Reader
			if tt.body != nil {
				body = bytes.NewReader(tt.body)
			}
			req, err := http.NewRequest(tt.method, up.URL+tt.path, body)
			require.NoError(t, err)
			resp, err := c.Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			got, err := io.ReadAll(resp.Body)
			require.NoError(t, err)

			assert.Equal(t, http.StatusOK, resp.StatusCode)
			want := tt.want
			if want == nil {
				want = tt.body
				assert.Equal(t, tt.method, resp.Header.Get("X-Method"))
			}
			assert.True(t, bytes.Equal(want, got), "body: got %d bytes, want %d", len(got), len(want))
		})
	}
}

// A chunked upload longer than maxBufferedBody reaches the upstream while
// the client is still sending it; a shorter one is read whole before the
// upstream is dialed (TestSmallBodyBuffered).
func TestUploadStreams(t *testing.T) {
	first := bytes.Repeat([]byte("f"), maxBufferedBody+1)
	firstChunk := make(chan []byte, 1)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b := make([]byte, len(first))
		if _, err := io.ReadFull(r.Body, b); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		firstChunk <- b
		rest, _ := io.ReadAll(r.Body)
		_, _ = fmt.Fprintf(w, "%d%s", len(b), rest)
	}))
	t.Cleanup(up.Close)
	p := startProxy(t, nil)

	pr, pw := io.Pipe()
	type result struct {
		body string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		resp, err := p.client(t).Post(up.URL, "text/plain", pr)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		done <- result{string(b), err}
	}()

	_, err := pw.Write(first)
	require.NoError(t, err)
	select {
	case got := <-firstChunk:
		assert.True(t, bytes.Equal(first, got))
	case <-time.After(10 * time.Second):
		t.Fatal("first chunk of the upload did not reach the upstream before the upload ended")
	}
	_, err = pw.Write([]byte(" and the rest"))
	require.NoError(t, err)
	require.NoError(t, pw.Close())
	r := <-done
	require.NoError(t, r.err)
	assert.Equal(t, fmt.Sprint(len(first))+" and the rest", r.body)
}

// A response of unknown length, or an event stream, reaches the client as it
// comes, not once the upstream is done.
func TestStreamingResponse(t *testing.T) {
	tests := []struct {
		name    string
		headers map[string]string
	}{
		{name: "chunked", headers: map[string]string{"Content-Type": "application/octet-stream"}},
		{name: "event stream with length", headers: map[string]string{
			"Content-Type": "text/event-stream; charset=utf-8", "Content-Length": strconv.Itoa(len("first\nsecond\n")),
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			release := make(chan struct{})
			up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				for k, v := range tt.headers {
					w.Header().Set(k, v)
				}
				_, _ = io.WriteString(w, "first\n")
				w.(http.Flusher).Flush()
				select {
				case <-release:
				case <-r.Context().Done():
					return
				}
				_, _ = io.WriteString(w, "second\n")
			}))
			t.Cleanup(up.Close)
			p := startProxy(t, nil)

			resp, err := p.client(t).Get(up.URL)
			require.NoError(t, err)
			defer resp.Body.Close()

			first := make(chan []byte, 1)
			go func() {
				b := make([]byte, len("first\n"))
				_, _ = io.ReadFull(resp.Body, b)
				first <- b
			}()
			select {
			case b := <-first:
				assert.Equal(t, "first\n", string(b))
			case <-time.After(10 * time.Second):
				close(release)
				t.Fatal("first chunk did not reach the client before the upstream finished")
			}
			close(release)
			rest, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			assert.Equal(t, "second\n", string(rest))
		})
	}
}

// rawUpstream answers each request on a connection with raw response bytes,
// recording the request headers it received.
func rawUpstream(t testing.TB, response string) (addr string, headers <-chan http.Header) {
	u := startTCPUpstream(t)
	ch := make(chan http.Header, 16)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(func() { // runs before startTCPUpstream's cleanup
		close(stop)
		wg.Wait()
	})
	wg.Go(func() {
		for {
			var c *net.TCPConn
			select {
			case c = <-u.conns:
			case <-stop:
				return
			}
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			req, err := http.ReadRequest(bufio.NewReader(c))
			if err == nil {
				ch <- req.Header
				_, _ = io.WriteString(c, response)
			}
			_ = c.Close()
		}
	})
	return u.addr, ch
}

// An upstream body that breaks off must reach the client incomplete, never
// as a complete shorter body.
func TestTruncatedUpstreamBody(t *testing.T) {
	tests := []struct {
		name     string
		response string
	}{
		{"chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"},
		{"content length", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr, _ := rawUpstream(t, tt.response)
			p := startProxy(t, nil)
			resp, err := p.client(t).Get("http://" + addr + "/")
			require.NoError(t, err)
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			assert.Error(t, err, "client read %q as a whole body", body)
		})
	}
}

func TestHopByHopHeaders(t *testing.T) {
	const response = "HTTP/1.1 200 OK\r\n" +
		"Content-Length: 2\r\n" +
		"Connection: close, X-Resp-Hop\r\n" +
		"X-Resp-Hop: 1\r\n" +
		"Keep-Alive: timeout=5\r\n" +
		"Proxy-Authenticate: Basic realm=x\r\n" +
		"Proxy-Whatever: 1\r\n" +
		"Upgrade: h2c\r\n" +
		"X-End-To-End: kept\r\n" +
		"\r\n" +
		"ok"
	addr, headers := rawUpstream(t, response)
	p := startProxy(t, nil)
	c, br := p.raw(t)

	for i := range 2 { // the second request proves the client connection survived
		_, err := fmt.Fprintf(c, "GET http://%s/ HTTP/1.1\r\n"+
			"Host: %s\r\n"+
			"Connection: keep-alive, X-Req-Hop\r\n"+
			"X-Req-Hop: 1\r\n"+
			"Keep-Alive: 300\r\n"+
			"TE: trailers\r\n"+
			"Trailer: X-Nothing\r\n"+
			"Upgrade: foo/2\r\n"+
			"Proxy-Connection: keep-alive\r\n"+
			"Proxy-Authorization: Basic c2VjcmV0\r\n"+
			"Proxy-Something: 1\r\n"+
			"X-End-To-End: kept\r\n"+
			"\r\n", addr, addr)
		require.NoError(t, err)

		resp, err := http.ReadResponse(br, nil)
		require.NoError(t, err, "request %d", i)
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		resp.Body.Close()

		assert.Equal(t, "ok", string(body))
		assert.False(t, resp.Close, "client connection must stay open")
		for _, h := range []string{"Connection", "X-Resp-Hop", "Keep-Alive", "Proxy-Authenticate", "Proxy-Whatever", "Upgrade"} {
			assert.Empty(t, resp.Header.Values(h), "response header %s", h)
		}
		assert.Equal(t, "kept", resp.Header.Get("X-End-To-End"))

		got := <-headers
		// The transport asks the upstream to close: that is the new hop's own.
		assert.Equal(t, []string{"close"}, got.Values("Connection"))
		for _, h := range []string{"X-Req-Hop", "Keep-Alive", "Te", "Trailer", "Upgrade",
			"Proxy-Connection", "Proxy-Authorization", "Proxy-Something"} {
			assert.Empty(t, got.Values(h), "request header %s", h)
		}
		assert.Equal(t, "kept", got.Get("X-End-To-End"))
	}
}

// A keep-alive client sends several requests on one connection to the proxy;
// each opens its own upstream connection through the dial function.
func TestClientKeepAlive(t *testing.T) {
	var mu sync.Mutex
	remotes := map[string]bool{}
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		remotes[r.RemoteAddr] = true
		mu.Unlock()
		_, _ = io.WriteString(w, "hello")
	}))
	t.Cleanup(up.Close)
	var ln *countingListener
	p := startProxy(t, func(l net.Listener) net.Listener {
		ln = &countingListener{Listener: l}
		return ln
	})
	c := p.client(t)

	const n = 3
	for range n {
		resp, err := c.Get(up.URL)
		require.NoError(t, err)
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, "hello", string(b))
	}
	assert.EqualValues(t, 1, ln.n.Load(), "client connections accepted by the proxy")
	assert.Equal(t, n, p.dialer.calls(), "upstream dials")
	mu.Lock()
	assert.Len(t, remotes, n, "upstream connections")
	mu.Unlock()
}

func TestNotAbsoluteForm(t *testing.T) {
	p := startProxy(t, nil)
	resp, err := http.Get("http://" + p.addr + "/x")
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.Equal(t, errNotProxy.body(), string(body))
	assert.Equal(t, 0, p.dialer.calls())
}

// errorCases are dial failures and the answer a client must get, for plain
// HTTP and CONNECT alike. Requests go to example.test, port 80 or 443.
var errorCases = []struct {
	name   string
	fail   func(ctx context.Context, addr string) error
	status int
	text   string
}{
	{
		name:   "no address",
		fail:   func(context.Context, string) error { return opError(fmt.Errorf("binding: %w", netutil.ErrNoAddress)) },
		status: http.StatusServiceUnavailable,
		text:   "no fresh egress address available",
	},
	{
		name:   "dial timeout",
		fail:   func(context.Context, string) error { return opError(errTimeout{}) },
		status: http.StatusGatewayTimeout,
		text:   "upstream example.test timed out",
	},
	{
		name: "context deadline",
		fail: func(ctx context.Context, _ string) error {
			<-ctx.Done() // DialTimeout is short in these tests
			return ctx.Err()
		},
		status: http.StatusGatewayTimeout,
		text:   "upstream example.test timed out",
	},
	{
		name: "no such host",
		fail: func(context.Context, string) error {
			return opError(&net.DNSError{Err: "no such host", Name: "example.test", IsNotFound: true})
		},
		status: http.StatusBadGateway,
		text:   "cannot resolve example.test: no such host",
	},
	{
		name: "ipv4 denied",
		fail: func(context.Context, string) error {
			return fmt.Errorf("dialing example.test:80: %w", netutil.ErrNoIPv6)
		},
		status: http.StatusBadGateway,
		text:   "example.test has no IPv6 address",
	},
	{
		name: "no suitable address",
		fail: func(context.Context, string) error {
			return opError(&net.AddrError{Err: "no suitable address found", Addr: "192.0.2.1"})
		},
		status: http.StatusBadGateway,
		text:   "example.test has no IPv6 address",
	},
	{
		name: "dns failure",
		fail: func(context.Context, string) error {
			return opError(&net.DNSError{Err: "server misbehaving", Name: "example.test", Server: "[2001:db8::53]:53"})
		},
		status: http.StatusBadGateway,
		text:   "cannot resolve example.test",
	},
	{
		name:   "refused",
		fail:   func(context.Context, string) error { return opError(syscall.ECONNREFUSED) },
		status: http.StatusBadGateway,
		text:   "upstream example.test refused the connection",
	},
	{
		name:   "unreachable",
		fail:   func(context.Context, string) error { return opError(syscall.EHOSTUNREACH) },
		status: http.StatusBadGateway,
		text:   "upstream example.test is unreachable",
	},
	{
		name:   "other",
		fail:   func(context.Context, string) error { return opError(errBoom) },
		status: http.StatusBadGateway,
		text:   "upstream example.test failed",
	},
	{
		// What bounds routed mode's open connections.
		name:   "no file descriptors",
		fail:   func(context.Context, string) error { return opError(os.NewSyscallError("socket", syscall.EMFILE)) },
		status: http.StatusServiceUnavailable,
		text:   "egressd has run out of file descriptors: try again later",
	},
}

// errTimeout is a net.Error that timed out, like a dial deadline.
type errTimeout struct{}

func (errTimeout) Error() string   { return "i/o timeout" }
func (errTimeout) Timeout() bool   { return true }
func (errTimeout) Temporary() bool { return true }

func withDialTimeout(d time.Duration) proxyOpt { return func(c *Config) { c.DialTimeout = d } }

func TestPlainHTTPErrors(t *testing.T) {
	for _, tt := range errorCases {
		t.Run(tt.name, func(t *testing.T) {
			p := startProxy(t, nil, withDialTimeout(100*time.Millisecond))
			p.dialer.fail = tt.fail
			resp, err := p.client(t).Get("http://example.test/path")
			require.NoError(t, err)
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)

			assert.Equal(t, tt.status, resp.StatusCode)
			assert.Equal(t, tt.text+"\n", string(body))
			assert.True(t, strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain"))
			assertCleanErrorBody(t, string(body))
			assert.Equal(t, "example.test:80", p.dialer.lastAddr())
		})
	}
}

func TestResponseHeaderTimeout(t *testing.T) {
	u := startTCPUpstream(t) // accepts, never answers
	p := startProxy(t, nil, func(c *Config) { c.ResponseHeaderTimeout = 100 * time.Millisecond })
	resp, err := p.client(t).Get("http://" + u.addr + "/slow")
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	assert.Equal(t, http.StatusGatewayTimeout, resp.StatusCode)
	assert.Equal(t, "upstream 127.0.0.1 timed out\n", string(body))
}

// goproxy relays WebSocket upgrades; the upgrade headers must survive the
// hop-by-hop filter, and the relay must end cleanly.
func TestWebsocketUpgrade(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !isWebsocketUpgrade(r.Header) {
			http.Error(w, "not an upgrade", http.StatusBadRequest)
			return
		}
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
		_, _ = io.Copy(c, brw) // echo
	}))
	t.Cleanup(up.Close)
	p := startProxy(t, nil)
	c, br := p.raw(t)
	host := strings.TrimPrefix(up.URL, "http://")
	_, err := fmt.Fprintf(c, "GET http://%s/ws HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", host, host)
	require.NoError(t, err)
	resp, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	require.Equal(t, http.StatusSwitchingProtocols, resp.StatusCode)
	assert.Equal(t, "websocket", resp.Header.Get("Upgrade"))

	_, err = io.WriteString(c, "ping")
	require.NoError(t, err)
	assert.Equal(t, "ping", string(readFull(t, br, 4)))
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond)
}

func TestHeadSniffer(t *testing.T) {
	tests := []struct {
		name   string
		stream string
		want   []string
	}{
		{"one head", "HTTP/1.1 200 OK\r\nConnection: close, X-A\r\nContent-Length: 2\r\n\r\nok", []string{"close, X-A"}},
		{"interim first", "HTTP/1.1 100 Continue\r\nConnection: X-Interim\r\n\r\nHTTP/1.1 200 OK\r\nConnection: X-B\r\nConnection: close\r\n\r\n", []string{"X-B", "close"}},
		{"bare LF", "HTTP/1.1 204 No Content\nConnection: close, X-C\n\n", []string{"close, X-C"}},
		{"switching protocols is final", "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\nHTTP/1.1 200 OK\r\nConnection: X-No\r\n\r\n", []string{"Upgrade"}},
		{"close alone", "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", []string{"close"}},
		{"close, then another", "HTTP/1.1 200 OK\r\nConnection: close\r\nconnection: X-D\r\n\r\n", []string{"close", "X-D"}},
		{"continuation line", "HTTP/1.1 200 OK\r\nConnection: close,\r\n X-E\r\nX-E: 1\r\n\r\n", []string{"close, X-E"}},
		{"none", "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", nil},
		{"not HTTP", "\x16\x03\x03\x00\x10HTTP/1.1 200 OK\r\nConnection: X-No\r\n\r\n", nil},
	}
	for _, tt := range tests {
		for _, step := range []int{1, 7, len(tt.stream)} {
			t.Run(fmt.Sprintf("%s/%d", tt.name, step), func(t *testing.T) {
				st := &fwdState{}
				c := &headSniffer{st: st}
				for b := []byte(tt.stream); len(b) > 0; {
					n := min(step, len(b))
					c.sniff(b[:n])
					b = b[n:]
				}
				assert.Equal(t, tt.want, st.getConnection())
				assert.True(t, c.done)
				assert.Nil(t, c.buf)
			})
		}
	}
}
