package proxy

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy/stats"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// startWithIPv4 runs the proxy on egressd's own dialer with the IPv4 policy
// given, and its own statistics. The pool is loopbackPool; a direct IPv4
// connection must not touch it.
func startWithIPv4(t *testing.T, policy netutil.IPv4Policy) (*testProxy, *stats.Registry, *fakeAddrs) {
	t.Helper()
	pool, m := loopbackPool(t)
	d := &netutil.Dialer{Pool: pool, Timeout: 5 * time.Second, IPv4: policy}
	reg := stats.NewRegistry(10)
	p := startProxy(t, nil, withDial(d.DialContext), func(c *Config) { c.Stats = reg })
	return p, reg, m
}

// peerUpstream4 answers every request with the peer address it saw, on
// 127.0.0.1, and counts the requests.
func peerUpstream4(t *testing.T) (addr string, hits *atomic.Int64) {
	t.Helper()
	hits = new(atomic.Int64)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		fmt.Fprintln(w, host)
	}))
	t.Cleanup(up.Close)
	return up.Listener.Addr().String(), hits
}

// TestIPv4Direct: a host with no IPv6 address is reached from the host's own
// IPv4 address, without an egress address, and counted apart.
func TestIPv4Direct(t *testing.T) {
	p, reg, m := startWithIPv4(t, netutil.IPv4Direct)
	up, hits := peerUpstream4(t)

	resp, err := p.client(t).Get("http://" + up + "/")
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "127.0.0.1\n", string(body))

	// A tunnel: it counts when it ends.
	tunnel, br, resp := p.connect(t, up, []byte("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
	require.Equal(t, http.StatusOK, resp.StatusCode)
	inner, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	body, err = io.ReadAll(inner.Body)
	require.NoError(t, err)
	assert.Equal(t, "127.0.0.1\n", string(body))
	tunnel.Close()

	require.Eventually(t, func() bool {
		return upstreamNamed(t, reg, "127.0.0.1").InFlight == 0
	}, 5*time.Second, time.Millisecond)
	u := upstreamNamed(t, reg, "127.0.0.1")
	assert.Equal(t, uint64(2), u.Requests)
	assert.Equal(t, uint64(2), u.IPv4, "both left over IPv4")
	assert.Zero(t, u.Errors)
	assert.Equal(t, uint64(2), stats.SumTotals(reg.Snapshot()).IPv4)
	assert.Equal(t, int64(2), hits.Load())
	adds, _, _ := m.counts()
	assert.Zero(t, adds, "no egress address for a direct IPv4 connection")
}

// TestIPv4Deny: with the policy deny, a host with no IPv6 address gets 502
// with a one-line reason, and the upstream sees nothing.
func TestIPv4Deny(t *testing.T) {
	p, reg, m := startWithIPv4(t, netutil.IPv4Deny)
	up, hits := peerUpstream4(t)
	const want = "127.0.0.1 has no IPv6 address\n"

	resp, err := p.client(t).Get("http://" + up + "/")
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	assert.Equal(t, http.StatusBadGateway, resp.StatusCode)
	assert.Equal(t, want, string(body))

	_, _, resp = p.connect(t, up, nil)
	body, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	assert.Equal(t, http.StatusBadGateway, resp.StatusCode)
	assert.Equal(t, want, string(body))

	// The accounting ends after the answer went out.
	require.Eventually(t, func() bool {
		return upstreamNamed(t, reg, "127.0.0.1").Errors == 2
	}, 5*time.Second, time.Millisecond)
	u := upstreamNamed(t, reg, "127.0.0.1")
	assert.Equal(t, uint64(2), u.Requests)
	assert.Zero(t, u.IPv4)
	assert.Zero(t, hits.Load(), "the upstream saw a request")
	adds, _, _ := m.counts()
	assert.Zero(t, adds)
}
