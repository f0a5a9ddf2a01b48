package netutil_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
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

// The tests of netutil that need the kernel: a namespace (nettest.New), its
// netlink manager and watcher (netutil/kernel). They are in netutil_test,
// as kernel imports netutil; export_test.go gives them what they check of
// the pool's inside.

var (
	hostAddr = nettest.HostAddr
	gateway  = nettest.Gateway
	prefix64 = nettest.Prefix64
	ipNet    = nettest.IPNet
	quiet    = slog.New(slog.DiscardHandler)
)

// nstestGuard bounds what a test waits for; a failure guard, not a timing
// assertion.
const nstestGuard = nettest.Guard

// newTestNetns is a namespace with eg0 (nettest.New), a netlink handle in
// it, and the manager of eg0.
func newTestNetns(t *testing.T) (netns.NsHandle, *netlink.Handle, *kernel.Netlink) {
	t.Helper()
	ns, h := nettest.New(t)
	mgr, err := kernel.NewNetlink(h, "eg0")
	require.NoError(t, err)
	return ns, h, mgr
}

// runPool runs p's background work until the test ends, then closes it.
func runPool(t *testing.T, p *netutil.Pool) {
	t.Helper()
	t.Cleanup(func() { _, _ = p.Close() }) // after Run has returned
	nettest.Run(t, p.Run)
}

// deleteAddr deletes a from eg0 behind the pool's back.
func deleteAddr(t *testing.T, h *netlink.Handle, mgr *kernel.Netlink, a netip.Addr) {
	t.Helper()
	require.NoError(t, h.AddrDel(mgr.Link(), &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(a, 128))}))
}

// testPool is a pool on eg0 of a test namespace, following a watcher.
func testPool(t *testing.T, ns netns.NsHandle, h *netlink.Handle, mgr *kernel.Netlink, mod func(*netutil.PoolConfig)) *netutil.Pool {
	t.Helper()
	cfg := netutil.PoolConfig{
		Prefix:  prefix64,
		Exclude: []netip.Addr{hostAddr.Addr(), gateway},
		Manager: mgr,
		Logger:  quiet,
		Ready:   2,
		Linger:  20 * time.Millisecond,
	}
	if mod != nil {
		mod(&cfg)
	}
	p, err := netutil.NewPool(cfg)
	require.NoError(t, err)
	w := kernel.NewWatcher(kernel.WatchConfig{Handle: h, Namespace: &ns, Logger: quiet})
	nettest.Run(t, w.Run)
	require.Eventually(t, func() bool { return w.Syncs() > 0 }, nstestGuard, 5*time.Millisecond, "the first listing")
	t.Cleanup(p.Follow(w, mgr))
	runPool(t, p)
	return p
}

func readyAddr(t *testing.T, p *netutil.Pool) netip.Addr {
	t.Helper()
	var a netip.Addr
	require.Eventually(t, func() (ok bool) { a, ok = p.NextReady(); return ok }, nstestGuard, 5*time.Millisecond)
	return a
}

// TestPoolFollow: the pool's own adds and removes are not losses; an
// address somebody else deletes is forgotten and replaced, and a lease on
// it lost; an address of the prefix that somebody else adds is never
// drawn; a late report of a removal the kernel contradicts changes nothing.
func TestPoolFollow(t *testing.T) {
	ns, h, mgr := newTestNetns(t)
	var logs nettest.LogBuffer
	p := testPool(t, ns, h, mgr, func(c *netutil.PoolConfig) { c.Logger = logs.Logger() })
	ctx := context.Background()

	t.Run("own adds and removes", func(t *testing.T) {
		for range 20 {
			l, err := p.Acquire(ctx)
			require.NoError(t, err)
			l.Release()
		}
		require.Eventually(t, func() bool { return p.Stats().Removed >= 20 }, nstestGuard, 5*time.Millisecond)
		assert.Zero(t, p.Stats().Lost)
	})

	t.Run("ready address deleted", func(t *testing.T) {
		a := readyAddr(t, p)
		deleteAddr(t, h, mgr, a)
		require.Eventually(t, func() bool { _, ok := netutil.AddrStates(p)[a]; return !ok }, nstestGuard, 5*time.Millisecond)
		assert.Equal(t, uint64(1), p.Stats().Lost)
		require.Eventually(t, func() bool { return p.Stats().Ready == 2 }, nstestGuard, 5*time.Millisecond, "replaced")
		assert.Equal(t, 1, logs.Count("removed by somebody else"))
	})

	t.Run("address in use deleted", func(t *testing.T) {
		l, err := p.Acquire(ctx)
		require.NoError(t, err)
		deleteAddr(t, h, mgr, l.Addr())
		require.Eventually(t, l.IsLost, nstestGuard, 5*time.Millisecond)
		assert.Equal(t, uint64(2), p.Stats().Lost)
		assert.NotContains(t, netutil.AddrStates(p), l.Addr())
		l.Release()
	})

	t.Run("late report of a removal", func(t *testing.T) {
		a := readyAddr(t, p)
		addr := p.FollowerAddr(mgr)
		addr(netutil.AddrUpdate{Prefix: netip.PrefixFrom(a, 128), LinkIndex: mgr.Link().Attrs().Index})
		assert.Equal(t, netutil.StateReady, netutil.AddrStates(p)[a], "still on the interface: kept")
		assert.Equal(t, uint64(2), p.Stats().Lost)
	})

	t.Run("somebody else's address in the prefix", func(t *testing.T) {
		theirs := netip.MustParsePrefix("2001:db8:1:2::99/64")
		require.NoError(t, h.AddrAdd(mgr.Link(), &netlink.Addr{IPNet: ipNet(theirs), Flags: unix.IFA_F_NODAD}))
		require.Eventually(t, func() bool {
			return p.Excluded(theirs.Addr())
		}, nstestGuard, 5*time.Millisecond, "never drawn")
	})
}

// TestPoolFollowUplink: while the uplink has no carrier, or is down, new
// connections fail at once saying so, wrapping netutil.ErrNoAddress; when it is up
// again the pool works by itself. Going down administratively flushes the
// IPv6 addresses (keep_addr_on_down is 0 by default): the pool forgets its
// own.
func TestPoolFollowUplink(t *testing.T) {
	ns, h, mgr := newTestNetns(t)
	var logs nettest.LogBuffer
	p := testPool(t, ns, h, mgr, func(c *netutil.PoolConfig) { c.Logger = logs.Logger() })
	ctx := context.Background()
	require.Eventually(t, func() bool { return p.Stats().Ready == 2 }, nstestGuard, 5*time.Millisecond)
	peer, err := h.LinkByName("eg1")
	require.NoError(t, err)
	downErr := func() bool {
		l, err := p.Acquire(ctx)
		if err == nil {
			l.Release()
			return false
		}
		return errors.Is(err, netutil.ErrNoAddress) && err.Error() == "no fresh egress address: uplink eg0 is down"
	}
	works := func() bool {
		l, err := p.Acquire(ctx)
		if err != nil {
			return false
		}
		l.Release()
		return true
	}

	// The router's end goes down: eg0 loses its carrier, keeps its addresses.
	require.NoError(t, h.LinkSetDown(peer))
	require.Eventually(t, downErr, nstestGuard, 5*time.Millisecond)
	assert.Equal(t, 1, logs.Count("uplink is down"), logs.String())
	assert.Zero(t, p.Stats().Lost, "carrier loss keeps the addresses")
	require.NoError(t, h.LinkSetUp(peer))
	require.Eventually(t, works, nstestGuard, 5*time.Millisecond)
	assert.Equal(t, 1, logs.Count("uplink is up again"))

	// eg0 itself goes down: the kernel flushes its IPv6 addresses. (Address
	// and link events come on sockets of their own, in no order between
	// them: the refiller may add an address or two before the pool hears
	// that the link is down.)
	ready := p.Stats().Ready
	require.NoError(t, h.LinkSetDown(mgr.Link()))
	require.Eventually(t, downErr, nstestGuard, 5*time.Millisecond)
	require.Eventually(t, func() bool { return p.Stats().Lost >= uint64(ready) }, nstestGuard, 5*time.Millisecond, "the flushed addresses are forgotten")
	require.NoError(t, h.LinkSetUp(mgr.Link()))
	require.Eventually(t, works, nstestGuard, 5*time.Millisecond)
	require.Eventually(t, func() bool { return p.Stats().Ready == 2 }, nstestGuard, 5*time.Millisecond, "the refiller goes on")
	require.Eventually(t, func() bool {
		return subset(poolAddrs(p), onInterface(t, mgr))
	}, nstestGuard, 5*time.Millisecond, "the pool's view is the interface's")
	assert.Zero(t, logs.Count("removed by somebody else"), "the flush is not blamed on somebody:\n%s", logs.String())
}

func onInterface(t *testing.T, mgr *kernel.Netlink) []netip.Addr {
	t.Helper()
	addrs, err := mgr.Addrs()
	require.NoError(t, err)
	var out []netip.Addr
	for _, a := range addrs {
		out = append(out, a.Addr())
	}
	return out
}

// poolAddrs lists the addresses the pool believes are on the interface.
func poolAddrs(p *netutil.Pool) []netip.Addr {
	var out []netip.Addr
	for _, a := range p.Settled() {
		out = append(out, a.Addr)
	}
	return out
}

func subset(sub, of []netip.Addr) bool {
	for _, a := range sub {
		if !slices.Contains(of, a) {
			return false
		}
	}
	return true
}

// TestDialerRetriesVanishedAddress: a ready address deleted before the pool
// heard of it (no watcher here) makes the bind fail with EADDRNOTAVAIL; the
// dialer tells the pool and connects from another fresh address, and the
// caller sees no error.
func TestDialerRetriesVanishedAddress(t *testing.T) {
	ns, h, mgr := newTestNetns(t)
	nettest.WaitDAD(t, h)
	p, err := netutil.NewPool(netutil.PoolConfig{
		Prefix:  prefix64,
		Exclude: []netip.Addr{hostAddr.Addr(), gateway},
		Manager: mgr,
		Logger:  quiet,
		Ready:   2,
		Linger:  -1,
	})
	require.NoError(t, err)
	t.Cleanup(func() { _, _ = p.Close() })
	ctx := context.Background()
	require.NoError(t, p.Fill(ctx))
	gone := readyAddr(t, p) // the next Acquire's
	deleteAddr(t, h, mgr, gone)

	var ln net.Listener
	nettest.In(t, ns, func() { ln, err = net.Listen("tcp6", net.JoinHostPort(hostAddr.Addr().String(), "0")) })
	require.NoError(t, err)
	nettest.ServeEcho(t, ln)

	d := &netutil.Dialer{Pool: p, Timeout: nstestGuard}
	var c net.Conn
	nettest.In(t, ns, func() { c, err = d.DialContext(ctx, "tcp", ln.Addr().String()) })
	require.NoError(t, err)
	defer c.Close()
	nettest.Echo(t, c)
	from := c.(*netutil.Conn).Egress()
	assert.NotEqual(t, gone, from)
	assert.True(t, prefix64.Contains(from))
	assert.Equal(t, from.String(), c.LocalAddr().(*net.TCPAddr).IP.String())
	assert.Equal(t, uint64(1), p.Stats().Lost)
	assert.NotContains(t, netutil.AddrStates(p), gone)
}
