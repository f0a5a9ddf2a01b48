package proxy

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeAddrs is the kernel seam of the address pool, faked: it records adds
// and removes instead of asking netlink.
type fakeAddrs struct {
	mu      sync.Mutex
	live    map[netip.Addr]bool
	adds    int
	removes int
	fail    error
}

var _ netutil.AddrManager = (*fakeAddrs)(nil)

func (m *fakeAddrs) Add(a netip.Addr, _ time.Duration) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail != nil {
		return m.fail
	}
	if m.live[a] {
		return fs.ErrExist
	}
	m.live[a] = true
	m.adds++
	return nil
}

func (m *fakeAddrs) Refresh(netip.Addr, time.Duration) error { return nil }

func (m *fakeAddrs) Remove(a netip.Addr) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.live, a)
	m.removes++
	return nil
}

func (m *fakeAddrs) counts() (adds, removes, live int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.adds, m.removes, len(m.live)
}

// loopbackPool is egressd's own pool with the fake address manager. It
// draws from ::/127, whose only drawable address is ::1: real sockets bound
// to a leased address, without root, and at most one upstream connection at
// a time.
func loopbackPool(t *testing.T) (*netutil.Pool, *fakeAddrs) {
	t.Helper()
	m := &fakeAddrs{live: make(map[netip.Addr]bool)}
	pool, err := netutil.NewPool(netutil.PoolConfig{
		Prefix:  netip.MustParsePrefix("::/127"),
		Max:     1,
		Ready:   -1,
		Linger:  -1,
		Manager: m,
	})
	require.NoError(t, err)
	return pool, m
}

// startWithPool runs the proxy on egressd's own dialer and loopbackPool.
func startWithPool(t *testing.T) (*testProxy, *fakeAddrs, *netutil.Pool) {
	t.Helper()
	if ln, err := net.Listen("tcp6", "[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	} else {
		ln.Close()
	}
	pool, m := loopbackPool(t)
	d := &netutil.Dialer{Pool: pool, Timeout: 5 * time.Second}
	return startProxy(t, nil, withDial(d.DialContext)), m, pool
}

// peerUpstream answers every request with the peer address it saw.
func peerUpstream(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp6", "[::1]:0")
	require.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		fmt.Fprintln(w, host)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func TestProxyWithPool(t *testing.T) {
	p, m, pool := startWithPool(t)
	up := peerUpstream(t)
	c := p.client(t)

	// A keep-alive client: every request gets its own address, added for it
	// and removed once its upstream connection closed.
	for i := 1; i <= 3; i++ {
		resp, err := c.Get("http://" + up + "/")
		require.NoError(t, err)
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.NoError(t, err)
		assert.Equal(t, http.StatusOK, resp.StatusCode)
		assert.Equal(t, "::1\n", string(body), "the upstream saw the leased address")
		require.Eventually(t, func() bool {
			adds, removes, live := m.counts()
			return adds == i && removes == i && live == 0
		}, 5*time.Second, time.Millisecond, "request %d", i)
	}

	// A tunnel holds the only address: the next request fails closed with
	// 503, and neither reaches the upstream nor leaves from elsewhere.
	tunnel, _, resp := p.connect(t, up, nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, 1, pool.Stats().InUse)
	resp, err := c.Get("http://" + up + "/")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.Equal(t, "no fresh egress address available: all 1 addresses are in use (-max-addrs)\n", string(body))

	_, _, resp = p.connect(t, up, nil)
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)

	tunnel.Close()
	require.Eventually(t, func() bool { return pool.Stats().Live == 0 }, 5*time.Second, time.Millisecond)
	resp, err = c.Get("http://" + up + "/")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode, "the address is back")
}

func TestProxyWithPoolAddFails(t *testing.T) {
	p, m, _ := startWithPool(t)
	m.mu.Lock()
	m.fail = errors.New("netlink: operation not permitted")
	m.mu.Unlock()
	up := peerUpstream(t)

	resp, err := p.client(t).Get("http://" + up + "/")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.NotContains(t, string(body), "::1")

	_, _, resp = p.connect(t, up, nil)
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
}
