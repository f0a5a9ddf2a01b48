package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

// Every test, tunnels included, must leave no goroutine behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// egressIP stands for an address of the host's /64 in fake dial errors: it
// must never reach a client.
const egressIP = "2001:db8::1234"

// fakeDialer dials loopback upstreams for real, or fails as told.
type fakeDialer struct {
	mu    sync.Mutex
	addrs []string // every addr asked for
	// fail, if set, is called first; a non-nil error is returned as the
	// dial error.
	fail func(ctx context.Context, addr string) error
}

// boundConn stands for the netutil dialer's connection type: a type that
// embeds *net.TCPConn, so ReadFrom, WriteTo and CloseWrite are promoted.
type boundConn struct{ *net.TCPConn }

// NetConn returns the TCP connection, as netutil.Conn.NetConn does.
func (c boundConn) NetConn() net.Conn { return c.TCPConn }

func (d *fakeDialer) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.addrs = append(d.addrs, addr)
	fail := d.fail
	d.mu.Unlock()
	if fail != nil {
		if err := fail(ctx, addr); err != nil {
			return nil, err
		}
	}
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "tcp4", addr)
	if err != nil {
		return nil, err
	}
	return boundConn{c.(*net.TCPConn)}, nil
}

func (d *fakeDialer) calls() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.addrs)
}

func (d *fakeDialer) lastAddr() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.addrs) == 0 {
		return ""
	}
	return d.addrs[len(d.addrs)-1]
}

// opError is a dial error as a bound dialer returns it: its text names the
// egress source address.
func opError(err error) error {
	return &net.OpError{
		Op:     "dial",
		Net:    "tcp6",
		Source: &net.TCPAddr{IP: net.ParseIP(egressIP), Port: 40123},
		Addr:   &net.TCPAddr{IP: net.ParseIP("2001:db8:ffff::1"), Port: 443},
		Err:    err,
	}
}

type testProxy struct {
	*Server
	addr     string // host:port of the proxy listener
	dialer   *fakeDialer
	served   chan struct{} // closed when Serve returned
	serveErr error         // Serve's result, once served is closed
}

type proxyOpt func(*Config)

// allPorts admits the ephemeral ports the tests' upstreams listen on.
var allPorts = MustParsePorts("1-65535")

// anyPort returns a with every port admitted where a leaves the ports unset.
func anyPort(a Access) Access {
	if a.ConnectPorts == nil {
		a.ConnectPorts = allPorts
	}
	if a.HTTPPorts == nil {
		a.HTTPPorts = allPorts
	}
	return a
}

func withIdle(d time.Duration) proxyOpt { return func(c *Config) { c.TunnelIdleTimeout = d } }

func withLogger(l *slog.Logger) proxyOpt { return func(c *Config) { c.Logger = l } }

// withDial replaces the fake dialer with d.
func withDial(d DialFunc) proxyOpt { return func(c *Config) { c.Dial = d } }

// startProxy serves a Server on a loopback listener (wrapped by wrap, if not
// nil) with a fakeDialer, and shuts it down when the test ends.
func startProxy(t testing.TB, wrap func(net.Listener) net.Listener, opts ...proxyOpt) *testProxy {
	t.Helper()
	d := &fakeDialer{}
	cfg := Config{Dial: d.Dial, Logger: slog.New(slog.DiscardHandler)}
	for _, o := range opts {
		o(&cfg)
	}
	cfg.Access = anyPort(cfg.Access)
	s, err := New(cfg)
	require.NoError(t, err)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	p := &testProxy{Server: s, addr: ln.Addr().String(), dialer: d, served: make(chan struct{})}
	if wrap != nil {
		ln = wrap(ln)
	}
	go func() {
		p.serveErr = s.Serve(ln)
		close(p.served)
	}()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
		<-p.served
	})
	return p
}

// client returns an HTTP client that sends everything through the proxy.
func (p *testProxy) client(t testing.TB) *http.Client {
	tr := &http.Transport{
		Proxy:              http.ProxyURL(mustURL(t, "http://"+p.addr)),
		DisableCompression: true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

func mustURL(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	require.NoError(t, err)
	return u
}

// raw opens a plain TCP connection to the proxy.
func (p *testProxy) raw(t testing.TB) (*net.TCPConn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp4", p.addr)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	require.NoError(t, c.SetDeadline(time.Now().Add(20*time.Second)))
	return c.(*net.TCPConn), bufio.NewReader(c)
}

// connect opens a CONNECT tunnel to target, sending early in the same write
// as the request, and returns the client side with the proxy's response.
func (p *testProxy) connect(t testing.TB, target string, early []byte) (*net.TCPConn, *bufio.Reader, *http.Response) {
	t.Helper()
	c, br := p.raw(t)
	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n\r\n"
	_, err := c.Write(append([]byte(req), early...))
	require.NoError(t, err)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	require.NoError(t, err)
	return c, br, resp
}

// tcpUpstream is a raw TCP server whose accepted connections the test drives.
type tcpUpstream struct {
	addr  string
	conns chan *net.TCPConn
}

func startTCPUpstream(t testing.TB) *tcpUpstream {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	u := &tcpUpstream{addr: ln.Addr().String(), conns: make(chan *net.TCPConn, 16)}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var accepted []net.Conn
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			accepted = append(accepted, c)
			mu.Unlock()
			u.conns <- c.(*net.TCPConn)
		}
	})
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range accepted {
			_ = c.Close()
		}
	})
	return u
}

// accept returns the next connection the upstream accepted.
func (u *tcpUpstream) accept(t testing.TB) *net.TCPConn {
	t.Helper()
	select {
	case c := <-u.conns:
		t.Cleanup(func() { _ = c.Close() }) // before the proxy's Shutdown, which waits for the tunnel
		require.NoError(t, c.SetDeadline(time.Now().Add(20*time.Second)))
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("upstream accepted no connection")
		return nil
	}
}

// logBuffer is a concurrency-safe buffer for a slog handler.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// countingListener counts accepted connections.
type countingListener struct {
	net.Listener
	n atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// noDeadline clears a deadline.
var noDeadline time.Time

// readFull reads exactly n bytes or fails the test.
func readFull(t testing.TB, r io.Reader, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	_, err := io.ReadFull(r, b)
	require.NoError(t, err)
	return b
}

// pattern returns n deterministic, non-repeating-looking bytes.
func pattern(n int) []byte {
	b := make([]byte, n)
	var x uint32 = 2463534242
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

// assertCleanErrorBody checks an error body: one line, no egress address.
func assertCleanErrorBody(t testing.TB, body string) {
	t.Helper()
	require.True(t, strings.HasSuffix(body, "\n"), "body %q must end in a newline", body)
	require.Equal(t, 1, strings.Count(body, "\n"), "body %q must be one line", body)
	require.NotContains(t, body, "2001:db8")
}

var errBoom = errors.New("boom")
