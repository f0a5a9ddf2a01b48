package proxy

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	xproxy "golang.org/x/net/proxy"

	"github.com/egressd/egressd/proxy/socks5"
)

// serveSOCKS serves SOCKS5 for p on a loopback listener of its own and
// returns its address. Its cleanup shuts p down (before startProxy's does,
// which then has nothing left to do) and checks ServeSOCKS5 returned nil.
func (p *testProxy) serveSOCKS(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- p.ServeSOCKS5(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
		select {
		case err := <-done:
			assert.NoError(t, err, "ServeSOCKS5 after Shutdown")
		case <-time.After(5 * time.Second):
			t.Error("ServeSOCKS5 did not return after Shutdown")
		}
	})
	return ln.Addr().String()
}

// socksClient opens a connection to a SOCKS5 server at addr.
func socksClient(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp4", addr)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	require.NoError(t, c.SetDeadline(time.Now().Add(20*time.Second)))
	return c.(*net.TCPConn)
}

// socksConnect runs a client handshake: user/password if user is not empty,
// else no authentication, then CONNECT to a domain (if host is not an IP
// address) or an address. It returns the reply's code and its bound address.
func socksConnect(t *testing.T, c net.Conn, user, target string) (byte, []byte) {
	t.Helper()
	host, portStr, err := net.SplitHostPort(target)
	require.NoError(t, err)
	port, err := strconv.Atoi(portStr)
	require.NoError(t, err)

	var msg []byte
	if user != "" {
		msg = append(msg, 5, 2, socks5.MethodNoAuth, socks5.MethodUserPass)
	} else {
		msg = append(msg, 5, 1, socks5.MethodNoAuth)
	}
	_, err = c.Write(msg)
	require.NoError(t, err)
	got := readFull(t, c, 2)
	if user != "" {
		require.Equal(t, []byte{5, socks5.MethodUserPass}, got, "user/password is chosen when offered")
		msg = append([]byte{1, byte(len(user))}, user...)
		msg = append(msg, 2, 'p', 'w')
		_, err = c.Write(msg)
		require.NoError(t, err)
		require.Equal(t, []byte{1, 0}, readFull(t, c, 2), "credentials accepted")
	} else {
		require.Equal(t, []byte{5, socks5.MethodNoAuth}, got)
	}

	msg = []byte{5, socks5.CmdConnect, 0}
	if ip := net.ParseIP(host); ip == nil {
		msg = append(msg, socks5.AtypDomain, byte(len(host)))
		msg = append(msg, host...)
	} else if ip4 := ip.To4(); ip4 != nil {
		msg = append(append(msg, socks5.AtypIPv4), ip4...)
	} else {
		msg = append(append(msg, socks5.AtypIPv6), ip...)
	}
	msg = append(msg, byte(port>>8), byte(port))
	_, err = c.Write(msg)
	require.NoError(t, err)
	reply := readFull(t, c, 10)
	require.Equal(t, []byte{5}, reply[:1])
	require.Equal(t, byte(socks5.AtypIPv4), reply[3])
	return reply[1], reply[4:]
}

func TestSOCKS5Echo(t *testing.T) {
	for _, user := range []string{"", "alice"} {
		for _, byName := range []bool{false, true} {
			name := "no auth"
			if user != "" {
				name = "user/password"
			}
			if byName {
				name += ", by name"
			}
			t.Run(name, func(t *testing.T) {
				u := startTCPUpstream(t)
				var logs logBuffer
				p := startProxy(t, nil, withLogger(slog.New(slog.NewTextHandler(&logs, nil))))
				addr := p.serveSOCKS(t)
				target := u.addr
				if byName {
					target = strings.Replace(u.addr, "127.0.0.1", "localhost", 1)
				}
				c := socksClient(t, addr)
				rep, bound := socksConnect(t, c, user, target)
				require.EqualValues(t, socks5.ReplySucceeded, rep)
				assert.Equal(t, []byte{0, 0, 0, 0, 0, 0}, bound, "the egress address is never told")
				assert.Equal(t, target, p.dialer.lastAddr(), "names are resolved by egressd's dial")
				s := u.accept(t)

				_, err := io.WriteString(c, "hello")
				require.NoError(t, err)
				assert.Equal(t, "hello", string(readFull(t, s, 5)))
				data := pattern(1 << 20)
				go func() {
					_, _ = io.Copy(s, s)
					_ = s.CloseWrite() // once the client closed
				}()
				go func() { _, _ = c.Write(data) }()
				assert.True(t, bytes.Equal(data, readFull(t, c, len(data))), "echoed bytes differ")

				require.NoError(t, c.Close())
				require.Eventually(t, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond)
				line := logs.String()
				assert.Contains(t, line, `msg=request`)
				assert.Contains(t, line, `method=SOCKS5 host=`+target+` status=200`)
				assert.Contains(t, line, `bytes=`+strconv.Itoa(len(data)))
				assert.Contains(t, line, `socks_reply=0`)
			})
		}
	}
}

// golang.org/x/net/proxy, a real client, gets through with and without
// credentials.
func TestSOCKS5XNetClient(t *testing.T) {
	u := startTCPUpstream(t)
	p := startProxy(t, nil)
	addr := p.serveSOCKS(t)
	for _, auth := range []*xproxy.Auth{nil, {User: "session-x", Password: "y"}} {
		d, err := xproxy.SOCKS5("tcp", addr, auth, xproxy.Direct)
		require.NoError(t, err)
		c, err := d.(xproxy.ContextDialer).DialContext(t.Context(), "tcp", u.addr)
		require.NoError(t, err)
		s := u.accept(t)
		_, err = io.WriteString(c, "ping")
		require.NoError(t, err)
		assert.Equal(t, "ping", string(readFull(t, s, 4)))
		require.NoError(t, c.Close())
	}
}

func TestSOCKS5HalfClose(t *testing.T) {
	u := startTCPUpstream(t)
	p := startProxy(t, nil)
	c := socksClient(t, p.serveSOCKS(t))
	rep, _ := socksConnect(t, c, "", u.addr)
	require.EqualValues(t, socks5.ReplySucceeded, rep)
	s := u.accept(t)

	_, err := io.WriteString(c, "request")
	require.NoError(t, err)
	require.NoError(t, c.CloseWrite())
	got, err := io.ReadAll(s)
	require.NoError(t, err)
	assert.Equal(t, "request", string(got), "the half-close went through")

	_, err = io.WriteString(s, "reply")
	require.NoError(t, err)
	require.NoError(t, s.CloseWrite())
	got, err = io.ReadAll(c)
	require.NoError(t, err)
	assert.Equal(t, "reply", string(got))
	require.Eventually(t, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond)
}

func TestSOCKS5DialErrors(t *testing.T) {
	replies := map[string]byte{
		"no address":          socks5.ReplyGeneralFailure,
		"dial timeout":        socks5.ReplyTTLExpired,
		"context deadline":    socks5.ReplyTTLExpired,
		"no such host":        socks5.ReplyHostUnreachable,
		"ipv4 denied":         socks5.ReplyHostUnreachable,
		"no suitable address": socks5.ReplyHostUnreachable,
		"dns failure":         socks5.ReplyHostUnreachable,
		"refused":             socks5.ReplyConnectionRefused,
		"unreachable":         socks5.ReplyHostUnreachable,
		"other":               socks5.ReplyGeneralFailure,
		"no file descriptors": socks5.ReplyGeneralFailure,
	}
	cases := append(errorCases[:len(errorCases):len(errorCases)],
		struct {
			name   string
			fail   func(ctx context.Context, addr string) error
			status int
			text   string
		}{
			name:   "network unreachable",
			fail:   func(context.Context, string) error { return opError(syscall.ENETUNREACH) },
			status: 502,
		},
		struct {
			name   string
			fail   func(ctx context.Context, addr string) error
			status int
			text   string
		}{
			name:   "forbidden",
			fail:   func(context.Context, string) error { return &Error{Status: 403, Reason: "no", Err: errBoom} },
			status: 403,
		})
	replies["network unreachable"] = socks5.ReplyNetworkUnreachable
	replies["forbidden"] = socks5.ReplyNotAllowed

	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			want, ok := replies[tt.name]
			require.True(t, ok, "no SOCKS5 reply for error case %q", tt.name)
			var logs logBuffer
			p := startProxy(t, nil, withDialTimeout(100*time.Millisecond),
				withLogger(slog.New(slog.NewTextHandler(&logs, nil))))
			p.dialer.fail = tt.fail
			c := socksClient(t, p.serveSOCKS(t))
			rep, bound := socksConnect(t, c, "", "example.test:443")
			assert.Equal(t, want, rep)
			assert.Equal(t, []byte{0, 0, 0, 0, 0, 0}, bound)
			_, err := c.Read(make([]byte, 1))
			assert.ErrorIs(t, err, io.EOF, "the connection closes after a failure")
			assert.Equal(t, "example.test:443", p.dialer.lastAddr())
			require.Eventually(t, func() bool { return strings.Contains(logs.String(), "msg=request") },
				10*time.Second, 10*time.Millisecond)
			assert.Contains(t, logs.String(), "status="+strconv.Itoa(tt.status)+" ")
		})
	}
}

// Malformed or unsupported handshakes get the protocol's error reply and a
// closed connection; nothing is dialed.
func TestSOCKS5BadHandshakes(t *testing.T) {
	tests := []struct {
		name   string
		send   []byte
		want   []byte // everything the server sends before closing
		status int    // in the access log; 0: no line
	}{
		{name: "socks4", send: []byte{4, 1, 0, 80, 127, 0, 0, 1, 0}, want: []byte{5, 0xff}, status: 400},
		{name: "http", send: []byte("GET / HTTP/1.1\r\n\r\n"), want: []byte{5, 0xff}, status: 400},
		{name: "zero methods", send: []byte{5, 0}, want: []byte{5, 0xff}, status: 400},
		{name: "truncated greeting", send: []byte{5, 3, 0}, want: []byte{5, 0xff}, status: 400},
		{name: "gssapi only", send: []byte{5, 1, 1}, want: []byte{5, 0xff}, status: 407},
		{name: "bad auth version", send: []byte{5, 1, 2, 5, 1, 'u', 0}, want: []byte{5, 2, 1, 1}, status: 400},
		{name: "empty user", send: []byte{5, 1, 2, 1, 0, 0}, want: []byte{5, 2, 1, 1}, status: 400},
		{name: "bind", send: []byte{5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80},
			want: []byte{5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0}, status: 501},
		{name: "udp associate", send: []byte{5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0},
			want: []byte{5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0}, status: 501},
		{name: "bad atyp", send: []byte{5, 1, 0, 5, 1, 0, 7, 127, 0, 0, 1, 0, 80},
			want: []byte{5, 0, 5, 8, 0, 1, 0, 0, 0, 0, 0, 0}, status: 501},
		{name: "request version", send: []byte{5, 1, 0, 4, 1, 0, 1, 127, 0, 0, 1, 0, 80},
			want: []byte{5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0}, status: 400},
		{name: "port zero", send: []byte{5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 0},
			want: []byte{5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0}, status: 400},
		{name: "bad name", send: append(append([]byte{5, 1, 0, 5, 1, 0, 3, 9}, "exa mple!"...), 0, 80),
			want: []byte{5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0}, status: 400},
		{name: "truncated request", send: []byte{5, 1, 0, 5, 1, 0, 4, 0x20, 1}, want: []byte{5, 0}, status: 400},
		{name: "nothing", send: nil, want: []byte{}, status: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var logs logBuffer
			p := startProxy(t, nil, withLogger(slog.New(slog.NewTextHandler(&logs, nil))))
			c := socksClient(t, p.serveSOCKS(t))
			_, err := c.Write(tt.send)
			require.NoError(t, err)
			require.NoError(t, c.CloseWrite()) // what a truncated message looks like
			got, err := io.ReadAll(c)
			require.NoError(t, err, "the server closes the connection")
			assert.Equal(t, tt.want, got)
			assert.Zero(t, p.dialer.calls())
			require.Eventually(t, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond)
			if tt.status == 0 {
				assert.NotContains(t, logs.String(), "msg=request")
				return
			}
			assert.Contains(t, logs.String(), "method=SOCKS5")
			assert.Contains(t, logs.String(), "status="+strconv.Itoa(tt.status)+" ")
		})
	}
}

// A user name session-KEY puts KEY into the dial's context.
func TestSOCKS5Session(t *testing.T) {
	u := startTCPUpstream(t)
	var mu sync.Mutex
	var keys []string
	var nd net.Dialer
	p := startProxy(t, nil, withDial(func(ctx context.Context, network, addr string) (net.Conn, error) {
		mu.Lock()
		keys = append(keys, sessionFrom(ctx))
		mu.Unlock()
		return nd.DialContext(ctx, network, addr)
	}))
	addr := p.serveSOCKS(t)
	for _, user := range []string{"session-build42", "bob", "", "session-"} {
		c := socksClient(t, addr)
		rep, _ := socksConnect(t, c, user, u.addr)
		require.EqualValues(t, socks5.ReplySucceeded, rep, "user %q", user)
		u.accept(t)
	}
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, []string{"build42", "", "", ""}, keys)
}

// The shaper's refusal is "not allowed by ruleset", logged as 429, and
// counted like HTTP's.
func TestSOCKS5Shaping(t *testing.T) {
	u := startTCPUpstream(t)
	var logs logBuffer
	p, reg := shapedProxy(t, "127.0.0.1=1r/h,burst=1,wait=50ms", withLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	addr := p.serveSOCKS(t)

	c := socksClient(t, addr)
	rep, _ := socksConnect(t, c, "", u.addr)
	require.EqualValues(t, socks5.ReplySucceeded, rep)
	s := u.accept(t)
	_, err := io.WriteString(c, "up")
	require.NoError(t, err)
	assert.Equal(t, "up", string(readFull(t, s, 2)))
	_, err = io.WriteString(s, "down!")
	require.NoError(t, err)
	assert.Equal(t, "down!", string(readFull(t, c, 5)))
	require.NoError(t, c.Close())
	require.NoError(t, s.Close())

	c2 := socksClient(t, addr)
	rep, _ = socksConnect(t, c2, "", u.addr)
	assert.EqualValues(t, socks5.ReplyNotAllowed, rep)
	assert.Equal(t, 1, p.dialer.calls(), "a refused request is never dialed")

	require.Eventually(t, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond)
	st := upstreamNamed(t, reg, "127.0.0.1")
	assert.Equal(t, uint64(2), st.Requests)
	assert.Equal(t, uint64(1), st.Rejected)
	assert.Equal(t, uint64(2), st.BytesUp)
	assert.Equal(t, uint64(5), st.BytesDown)
	assert.Zero(t, st.InFlight)
	assert.Equal(t, uint64(1), st.LatencyHistogram.Count)
	assert.Contains(t, logs.String(), "status=429 ")
	assert.Contains(t, logs.String(), "socks_reply=2")
}

// Shutdown stops accepting, waits for open SOCKS5 tunnels, and force-closes
// them when its context ends.
func TestSOCKS5Shutdown(t *testing.T) {
	u := startTCPUpstream(t)
	p := startProxy(t, nil)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- p.ServeSOCKS5(ln) }()

	c := socksClient(t, ln.Addr().String())
	rep, _ := socksConnect(t, c, "", u.addr)
	require.EqualValues(t, socks5.ReplySucceeded, rep)
	s := u.accept(t)
	assert.Equal(t, 1, p.Active())

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	deadline, _ := ctx.Deadline()
	assert.ErrorIs(t, p.Shutdown(ctx), context.DeadlineExceeded, "the tunnel outlived the grace")
	// Against the context's own deadline: a clock read after making it
	// would be late by however long the machine kept this goroutine waiting.
	assert.False(t, time.Now().Before(deadline), "Shutdown returned before its deadline: it did not wait for the tunnel")
	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("ServeSOCKS5 did not return")
	}
	assert.Zero(t, p.Active())
	_, err = s.Read(make([]byte, 1))
	assert.ErrorIs(t, err, io.EOF, "the upstream side was closed")
	_, err = net.Dial("tcp4", ln.Addr().String())
	assert.Error(t, err, "the listener is closed")

	// After Shutdown, ServeSOCKS5 returns at once.
	ln2, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	assert.NoError(t, p.ServeSOCKS5(ln2))
}
