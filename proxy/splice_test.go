package proxy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// copyRecorder records the types every tunnel copy was made with.
type copyRecorder struct {
	mu     sync.Mutex
	copies []string // "dst <- src", by concrete type
	dsts   map[io.Writer]bool
}

// recordCopies installs testHookCopy for the test, which must start its
// proxy afterwards (so that the hook is removed after the proxy's shutdown).
func recordCopies(t *testing.T) *copyRecorder {
	rec := &copyRecorder{dsts: make(map[io.Writer]bool)}
	testHookCopy = func(dst io.Writer, src io.Reader) {
		desc := fmt.Sprintf("%T <- %T", dst, src)
		if lr, ok := src.(*io.LimitedReader); ok {
			desc = fmt.Sprintf("%T <- %T of %T", dst, src, lr.R)
		}
		rec.mu.Lock()
		defer rec.mu.Unlock()
		rec.copies = append(rec.copies, desc)
		rec.dsts[dst] = true
	}
	t.Cleanup(func() { testHookCopy = nil })
	return rec
}

// spliced is the only copy Go's net package splices between two TCP
// sockets with a byte limit: (*net.TCPConn).ReadFrom of an io.LimitedReader
// of a *net.TCPConn. A wrapper on either side would make it copy through a
// buffer in user space.
const spliced = "*net.TCPConn <- *io.LimitedReader of *net.TCPConn"

// Every tunnel copy must stay on the kernel's splice path, whatever the
// upstream connection is: egressd's dialer's own type, from a fresh address
// or from a held one, for CONNECT and for SOCKS5.
func TestTunnelSplices(t *testing.T) {
	tests := []struct {
		name   string
		rotate Rotate
		socks  bool
	}{
		{name: "CONNECT with a dial per tunnel", rotate: RotateRequest},
		{name: "CONNECT from a connection's held address", rotate: RotateConnection},
		{name: "CONNECT from a session's held address", rotate: RotateSession},
		{name: "SOCKS5", rotate: RotateRequest, socks: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := recordCopies(t)
			if ln, err := net.Listen("tcp6", "[::1]:0"); err != nil {
				t.Skipf("no IPv6 loopback here: %v", err)
			} else {
				ln.Close()
			}
			pool, _ := loopbackPool(t)
			d := &netutil.Dialer{Pool: pool, Timeout: 5 * time.Second}
			hold := func(ctx context.Context) (DialFunc, func(), error) { // as cmd/egressd holds
				return d.Hold(ctx)
			}
			p := startProxy(t, nil, withDial(d.DialContext), func(c *Config) {
				c.Rotate = tt.rotate
				if tt.rotate != RotateRequest {
					c.Hold = hold
				}
			})
			up := tcpEchoUpstream(t, "::1")

			var c *net.TCPConn
			var r io.Reader
			if tt.socks {
				c = socksClient(t, p.serveSOCKS(t))
				code, _ := socksConnect(t, c, "", up)
				require.Equal(t, byte(0), code)
				r = c
			} else {
				var br *bufio.Reader
				c, br = p.raw(t)
				_, err := fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %[1]s\r\n%s: k\r\n\r\n", up, SessionHeader)
				require.NoError(t, err)
				resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
				require.NoError(t, err)
				require.Equal(t, http.StatusOK, resp.StatusCode)
				r = br
			}

			data := pattern(1 << 20)
			go func() {
				_, _ = c.Write(data)
				_ = c.CloseWrite()
			}()
			got, err := io.ReadAll(r)
			require.NoError(t, err)
			require.True(t, bytes.Equal(data, got), "echoed bytes differ")

			rec.mu.Lock()
			defer rec.mu.Unlock()
			require.NotEmpty(t, rec.copies)
			for _, desc := range rec.copies {
				assert.Equal(t, spliced, desc)
			}
			assert.Len(t, rec.dsts, 2, "both directions copied")
		})
	}
}

// tcpEchoUpstream echoes every connection on the loopback address ip until
// its client half-closes, and returns its address.
func tcpEchoUpstream(t testing.TB, ip string) string {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	require.NoError(t, err)
	var wg sync.WaitGroup
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(20 * time.Second))
				_, _ = io.Copy(c, c)
				_ = c.(*net.TCPConn).CloseWrite()
				_, _ = io.Copy(io.Discard, c)
			})
		}
	})
	return ln.Addr().String()
}
