package proxy

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestConnectEcho(t *testing.T) {
	u := startTCPUpstream(t)
	p := startProxy(t, nil)
	c, br, resp := p.connect(t, u.addr, nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	s := u.accept(t)

	// Small exchange both ways.
	_, err := io.WriteString(c, "hello")
	require.NoError(t, err)
	assert.Equal(t, "hello", string(readFull(t, s, 5)))
	_, err = io.WriteString(s, "world")
	require.NoError(t, err)
	assert.Equal(t, "world", string(readFull(t, br, 5)))

	// 8 MiB each way at once, echoed by the upstream.
	data := pattern(8 << 20)
	go func() { _, _ = io.Copy(s, s) }()
	go func() { _, _ = c.Write(data) }()
	got := readFull(t, br, len(data))
	assert.True(t, bytes.Equal(data, got), "echoed bytes differ")
}

func TestConnectHalfClose(t *testing.T) {
	tests := []struct {
		name       string
		clientEnds bool // the client half-closes first; otherwise the upstream does
	}{
		{name: "client closes write", clientEnds: true},
		{name: "upstream closes write", clientEnds: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := startTCPUpstream(t)
			p := startProxy(t, nil)
			c, br, resp := p.connect(t, u.addr, nil)
			require.Equal(t, http.StatusOK, resp.StatusCode)
			s := u.accept(t)

			// first is the side that finishes sending first.
			var first, second *net.TCPConn = c, s
			var firstR, secondR io.Reader = br, s
			if !tt.clientEnds {
				first, second, firstR, secondR = s, c, s, br
			}

			_, err := io.WriteString(first, "request")
			require.NoError(t, err)
			require.NoError(t, first.CloseWrite())
			got, err := io.ReadAll(secondR) // ends with EOF: the half-close went through
			require.NoError(t, err)
			assert.Equal(t, "request", string(got))

			// The other direction still works.
			_, err = io.WriteString(second, "reply")
			require.NoError(t, err)
			require.NoError(t, second.CloseWrite())
			got, err = io.ReadAll(firstR)
			require.NoError(t, err)
			assert.Equal(t, "reply", string(got))

			require.Eventually(t, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond,
				"tunnel must end once both directions are done")
		})
	}
}

// Bytes sent in the same write as the CONNECT request reach the upstream first.
func TestConnectEarlyBytes(t *testing.T) {
	u := startTCPUpstream(t)
	p := startProxy(t, nil)
	early := []byte("\x16\x03\x01early client hello")
	c, br, resp := p.connect(t, u.addr, early)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	s := u.accept(t)
	assert.Equal(t, early, readFull(t, s, len(early)))

	_, err := io.WriteString(c, "later")
	require.NoError(t, err)
	assert.Equal(t, "later", string(readFull(t, s, 5)))
	_, err = io.WriteString(s, "back")
	require.NoError(t, err)
	assert.Equal(t, "back", string(readFull(t, br, 4)))
}

func TestConnectIdleTimeout(t *testing.T) {
	u := startTCPUpstream(t)
	p := startProxy(t, nil, withIdle(200*time.Millisecond))
	c, br, resp := p.connect(t, u.addr, nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	s := u.accept(t)

	// Nothing is sent: both ends see the tunnel close, well before the
	// 20s deadline the helpers set.
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	_, err := br.ReadByte()
	assert.ErrorIs(t, err, io.EOF)
	_, err = s.Read(make([]byte, 1))
	assert.ErrorIs(t, err, io.EOF)
	require.Eventually(t, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond)
}

// A tunnel carrying a byte every 50ms in one direction only stays open for
// one and a half times the idle timeout, and then still carries bytes both
// ways. The idle timeout is 40 times the gap between bytes: a writer whose
// 50ms sleep a busy machine stretches must not look idle (with 200ms, one
// stretched past it under -race).
func TestConnectSlowOneWay(t *testing.T) {
	const (
		idle  = 2 * time.Second
		every = 50 * time.Millisecond
		n     = int(idle * 3 / 2 / every)
	)
	want := make([]byte, n)
	for i := range want {
		want[i] = byte('a' + i%26)
	}
	for _, fromClient := range []bool{true, false} {
		name := "upstream to client"
		if fromClient {
			name = "client to upstream"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			u := startTCPUpstream(t)
			p := startProxy(t, nil, withIdle(idle))
			c, br, resp := p.connect(t, u.addr, nil)
			require.Equal(t, http.StatusOK, resp.StatusCode)
			s := u.accept(t)

			var w io.Writer = s
			var r io.Reader = br
			if fromClient {
				w, r = c, s
			}
			sent := make(chan error, 1)
			go func() {
				for i := range n {
					if _, err := w.Write(want[i : i+1]); err != nil {
						sent <- err
						return
					}
					time.Sleep(every)
				}
				sent <- nil
			}()
			got := readFull(t, r, n)
			require.NoError(t, <-sent)
			assert.Equal(t, string(want), string(got))

			// Still open, both ways.
			_, err := io.WriteString(c, "ping")
			require.NoError(t, err)
			assert.Equal(t, "ping", string(readFull(t, s, 4)))
			_, err = io.WriteString(s, "pong")
			require.NoError(t, err)
			assert.Equal(t, "pong", string(readFull(t, br, 4)))
		})
	}
}

func TestConnectErrors(t *testing.T) {
	for _, tt := range errorCases {
		t.Run(tt.name, func(t *testing.T) {
			p := startProxy(t, nil, withDialTimeout(100*time.Millisecond))
			p.dialer.fail = tt.fail
			_, _, resp := p.connect(t, "example.test:443", nil)
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)

			assert.Equal(t, tt.status, resp.StatusCode)
			assert.Equal(t, tt.text+"\n", string(body))
			assert.True(t, resp.Close, "the client connection must close after an error")
			assert.True(t, strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain"))
			assertCleanErrorBody(t, string(body))
			assert.Equal(t, "example.test:443", p.dialer.lastAddr())
		})
	}
}

// TestConnectNoDescriptors: a tunnel whose upstream socket finds no file
// descriptor left is egressd's own refusal: counted as fds_exhausted, not
// as the upstream's error.
func TestConnectNoDescriptors(t *testing.T) {
	p := startProxy(t, nil)
	p.dialer.fail = func(context.Context, string) error { return opError(os.NewSyscallError("socket", syscall.EMFILE)) }
	_, _, resp := p.connect(t, "example.test:443", nil)
	resp.Body.Close()
	require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.Equal(t, `egressd; error=connection_limit_reached; details="egressd has run out of file descriptors: try again later"`,
		resp.Header.Get("Proxy-Status"))
	require.Eventually(t, func() bool { return p.ClientStats().Refused["fds_exhausted"] == 1 }, 5*time.Second, time.Millisecond)
	for _, u := range p.Upstreams() {
		assert.Zero(t, u.Errors, "not the upstream's fault")
	}
}

func TestConnectTarget(t *testing.T) {
	tests := []struct {
		target   string
		status   int    // answer to CONNECT
		wantDial string // address dialed, if any
	}{
		{target: "example.test", status: http.StatusBadGateway, wantDial: "example.test:443"},
		{target: "[2001:db8::1]", status: http.StatusBadGateway, wantDial: "[2001:db8::1]:443"},
		{target: "[2001:db8::1]:8443", status: http.StatusBadGateway, wantDial: "[2001:db8::1]:8443"},
		{target: "example.test:8443", status: http.StatusBadGateway, wantDial: "example.test:8443"},
		{target: "192.0.2.1:443", status: http.StatusBadGateway, wantDial: "192.0.2.1:443"},
		{target: "[2001:db8::zz]:443", status: http.StatusBadRequest},
		{target: "example.test:0", status: http.StatusBadRequest},
		{target: "example.test:65536", status: http.StatusBadRequest},
		{target: "example.test:https", status: http.StatusBadRequest},
		{target: "exa%25mple.test:443", status: http.StatusBadRequest},
		{target: "user@example.test:443", status: http.StatusBadRequest},
		{target: "[fe80::1%25eth0]:443", status: http.StatusForbidden},
		{target: "[::1%25lo]:443", status: http.StatusForbidden},
		{target: "example.test:443/path", status: http.StatusBadRequest},
		{target: "/path", status: http.StatusBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.target, func(t *testing.T) {
			p := startProxy(t, nil)
			p.dialer.fail = func(_ context.Context, _ string) error { return opError(errBoom) }
			_, _, resp := p.connect(t, tt.target, nil)
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			resp.Body.Close()
			assert.Equal(t, tt.status, resp.StatusCode, "body %q", body)
			assert.Equal(t, tt.wantDial, p.dialer.lastAddr())
		})
	}
}
