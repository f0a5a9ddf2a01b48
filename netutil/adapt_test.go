package netutil_test

import (
	"context"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/egressd/egressd/internal/nettest"
	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/netutil/kernel"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// upstreamAddr sits on the router namespace's lo, reached through its link.
var upstreamAddr = netip.MustParseAddr("2001:db8:ffff::1")

// routerPair is a host namespace (newTestNetns: eg0, the host address, a
// default route via gateway) whose veth peer eg1 is moved into a router
// namespace that holds gateway on eg1 and an echo server on upstreamAddr.
type routerPair struct {
	host, router netns.NsHandle
	h            *netlink.Handle // in host
	mgr          *kernel.Netlink
	upstream     string // host:port of the echo server
}

func newRouterPair(t *testing.T) *routerPair {
	t.Helper()
	host, h, mgr := newTestNetns(t)
	router := nettest.Unnamed(t)
	rh, err := netlink.NewHandleAt(router)
	require.NoError(t, err)
	t.Cleanup(rh.Close)
	peer, err := h.LinkByName("eg1")
	require.NoError(t, err)
	require.NoError(t, h.LinkSetNsFd(peer, int(router)))
	peer, err = rh.LinkByName("eg1")
	require.NoError(t, err)
	lo, err := rh.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, rh.LinkSetUp(lo))
	require.NoError(t, rh.AddrAdd(peer, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(gateway, 64)), Flags: unix.IFA_F_NODAD}))
	require.NoError(t, rh.AddrAdd(lo, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(upstreamAddr, 128))}))
	require.NoError(t, rh.LinkSetUp(peer))
	nettest.WaitDAD(t, h)

	var ln net.Listener
	nettest.In(t, router, func() { ln, err = net.Listen("tcp6", net.JoinHostPort(upstreamAddr.String(), "0")) })
	require.NoError(t, err)
	nettest.ServeEcho(t, ln)
	return &routerPair{host: host, router: router, h: h, mgr: mgr, upstream: ln.Addr().String()}
}

// forgetNew makes the router stop resolving neighbours it does not know yet
// (mcast_solicit 0 on its link): to new egress addresses, what a full
// neighbour table does; the ones it knows go on working.
func (rp *routerPair) forgetNew(t *testing.T) {
	t.Helper()
	var err error
	nettest.In(t, rp.router, func() {
		err = os.WriteFile("/proc/sys/net/ipv6/neigh/eg1/mcast_solicit", []byte("0"), 0)
	})
	require.NoError(t, err)
}

// dial connects from the host namespace with d.
func (rp *routerPair) dial(t *testing.T, dial func(ctx context.Context, network, address string) (net.Conn, error)) (net.Conn, time.Duration, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), nstestGuard)
	defer cancel()
	var c net.Conn
	var err error
	start := time.Now()
	nettest.In(t, rp.host, func() { c, err = dial(ctx, "tcp", rp.upstream) })
	return c, time.Since(start), err
}

// routerPool is a pool with budget b in rp's host namespace, run until the
// test ends.
func routerPool(t *testing.T, rp *routerPair, b netutil.Budget) *netutil.Pool {
	t.Helper()
	p, err := netutil.NewPool(netutil.PoolConfig{
		Prefix:  prefix64,
		Exclude: []netip.Addr{hostAddr.Addr(), gateway},
		Manager: rp.mgr,
		Logger:  quiet,
		Ready:   -1,
		Budget:  b,
	})
	require.NoError(t, err)
	runPool(t, p)
	return p
}

// TestDialerRetriesFromWarm: once the router stops answering new addresses,
// a connection from a never-used one gets netutil.FirstTry, then is made from a warm
// address and succeeds; the pool counts the retry and the overflow, lowers
// the rate, and removes the unanswered address instead of keeping it warm.
// A held address (a session's) is replaced by a warm one the same way.
func TestDialerRetriesFromWarm(t *testing.T) {
	rp := newRouterPair(t)
	p := routerPool(t, rp, netutil.Budget{Rate: 5, Burst: 20, Window: time.Minute})
	d := &netutil.Dialer{Pool: p, Timeout: nstestGuard}

	for range 3 { // warm addresses, which the router knows
		c, _, err := rp.dial(t, d.DialContext)
		require.NoError(t, err)
		nettest.Echo(t, c)
		require.NoError(t, c.Close())
	}
	require.Equal(t, 3, p.Stats().Warm)
	rp.forgetNew(t)

	c, took, err := rp.dial(t, d.DialContext)
	require.NoError(t, err, "the retry from a warm address is answered")
	nettest.Echo(t, c)
	from := c.(*netutil.Conn).Egress()
	s := p.Stats()
	assert.Equal(t, uint64(1), s.Retries)
	assert.Equal(t, uint64(1), s.Overflows)
	assert.Equal(t, 2.5, s.Budget.Rate, "halved")
	assert.GreaterOrEqual(t, took, netutil.FirstTry, "the new address had its first try")
	assert.Equal(t, uint64(4), s.Fresh, "three warm-ups and the one that got no answer")
	assert.Equal(t, 2, s.Warm, "the unanswered address is not kept warm")
	addrs, err := rp.mgr.Addrs()
	require.NoError(t, err)
	assert.Len(t, addrs, 1+1+3, "the host's address, its link-local one, the three warm-up addresses: the unanswered one is removed")
	require.NoError(t, c.Close())

	// With the tokens dropped, the next connection reuses a warm address
	// at once.
	c, took, err = rp.dial(t, d.DialContext)
	require.NoError(t, err)
	assert.Less(t, took, netutil.FirstTry)
	assert.NotEqual(t, from, c.(*netutil.Conn).Egress(), "another warm address: the least recently used")
	require.NoError(t, c.Close())

	// A session holding a never-used address: its first connection moves
	// it to a warm one.
	time.Sleep(time.Second) // a token at 2.5/s
	dial, release, err := d.Hold(context.Background())
	require.NoError(t, err)
	defer release()
	c, _, err = rp.dial(t, dial)
	require.NoError(t, err)
	nettest.Echo(t, c)
	c2, took, err := rp.dial(t, dial)
	require.NoError(t, err)
	assert.Less(t, took, netutil.FirstTry, "the held address is the warm one now")
	assert.Equal(t, c.(*netutil.Conn).Egress(), c2.(*netutil.Conn).Egress(), "one address for the session")
	s = p.Stats()
	assert.Equal(t, uint64(2), s.Retries)
	assert.Equal(t, uint64(2), s.Overflows)
	require.NoError(t, c.Close())
	require.NoError(t, c2.Close())
}

// TestDialerNoRetryWithoutWarm: a never-used address with no warm address
// to compare it with gets the whole timeout, and a failure is the
// upstream's, not an overflow.
func TestDialerNoRetryWithoutWarm(t *testing.T) {
	rp := newRouterPair(t)
	// The host learns the router first, from its own address: it would
	// otherwise ask for it from the egress address, and the router would
	// learn that one from the question.
	var nd net.Dialer
	c, _, err := rp.dial(t, nd.DialContext)
	require.NoError(t, err)
	c.Close()
	rp.forgetNew(t)
	p := routerPool(t, rp, netutil.DefaultBudget)
	d := &netutil.Dialer{Pool: p, Timeout: 3 * time.Second}
	_, took, err := rp.dial(t, d.DialContext)
	require.Error(t, err)
	assert.True(t, netutil.TimedOut(err), "%v", err)
	assert.NotErrorIs(t, err, netutil.ErrNoAnswer)
	assert.GreaterOrEqual(t, took, 3*time.Second, "the whole timeout, not netutil.FirstTry")
	s := p.Stats()
	assert.Zero(t, s.Retries)
	assert.Zero(t, s.Overflows)
	assert.Equal(t, 5.0, s.Budget.Rate)
}
