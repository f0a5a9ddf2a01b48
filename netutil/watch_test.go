package netutil

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// runWatcher starts a watcher of ns and stops it in t.Cleanup.
func runWatcher(t *testing.T, ns netns.NsHandle, h *netlink.Handle, mod func(*WatchConfig), subs ...Subscriber) *Watcher {
	t.Helper()
	cfg := WatchConfig{Handle: h, Namespace: &ns, Logger: quiet}
	if mod != nil {
		mod(&cfg)
	}
	w := NewWatcher(cfg)
	for _, s := range subs {
		w.Subscribe(s)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	require.Eventually(t, func() bool { return w.Syncs() > 0 }, nstestGuard, 5*time.Millisecond, "the first listing")
	return w
}

// runPool runs p's background work until the test ends, then closes it.
func runPool(t *testing.T, p *Pool) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		_, _ = p.Close()
	})
}

// recorder is a subscriber that passes every event on a channel.
type recorder struct{ ch chan any }

func newRecorder() *recorder { return &recorder{ch: make(chan any, 4096)} }

func (r *recorder) subscriber() Subscriber {
	return Subscriber{
		Addr:   func(u AddrUpdate) { r.ch <- u },
		Link:   func(u LinkUpdate) { r.ch <- u },
		Synced: func() { r.ch <- "synced" },
	}
}

// waitFor reads events until one satisfies pred, failing after a guard.
func (r *recorder) waitFor(t *testing.T, what string, pred func(any) bool) any {
	t.Helper()
	deadline := time.After(nstestGuard)
	for {
		select {
		case ev := <-r.ch:
			if pred(ev) {
				return ev
			}
		case <-deadline:
			t.Fatalf("no event: %s", what)
		}
	}
}

// untilSynced returns the events before the next "synced".
func (r *recorder) untilSynced(t *testing.T) []any {
	t.Helper()
	var evs []any
	r.waitFor(t, "synced", func(ev any) bool {
		if ev == "synced" {
			return true
		}
		evs = append(evs, ev)
		return false
	})
	return evs
}

func addrEvent(added bool, p netip.Prefix) func(any) bool {
	return func(ev any) bool {
		u, ok := ev.(AddrUpdate)
		return ok && u.Added == added && u.Prefix == p
	}
}

func hasAddr(evs []any, p netip.Prefix) bool {
	for _, ev := range evs {
		if addrEvent(true, p)(ev) {
			return true
		}
	}
	return false
}

// TestWatcher: a subscriber hears first of what is there, then of every
// change: addresses of both families added and removed, and the uplink
// losing its carrier and getting it back. A later subscriber hears the
// state as it is then.
func TestWatcher(t *testing.T) {
	ns, h, mgr := newTestNetns(t)
	link := mgr.Link()
	idx := link.Attrs().Index
	rec := newRecorder()
	w := runWatcher(t, ns, h, nil, rec.subscriber())

	first := rec.untilSynced(t)
	assert.True(t, hasAddr(first, hostAddr), "the host address, listed: %v", first)
	assert.Contains(t, first, LinkUpdate{Index: idx, Name: "eg0", Flags: link.Attrs().RawFlags | unix.IFF_LOWER_UP | unix.IFF_RUNNING, OperState: netlink.OperUp})

	egress := netip.MustParseAddr("2001:db8:1:2::abcd")
	require.NoError(t, mgr.Add(egress, time.Minute))
	ev := rec.waitFor(t, "egress address added", addrEvent(true, netip.PrefixFrom(egress, 128))).(AddrUpdate)
	assert.Equal(t, idx, ev.LinkIndex)
	assert.True(t, looksLikeEgress(ev), "flags %#x", ev.Flags)
	require.NoError(t, mgr.Remove(egress))
	rec.waitFor(t, "egress address removed", addrEvent(false, netip.PrefixFrom(egress, 128)))

	v4 := netip.MustParsePrefix("198.51.100.7/24")
	require.NoError(t, h.AddrAdd(link, &netlink.Addr{IPNet: ipNet(v4)}))
	rec.waitFor(t, "IPv4 address added", addrEvent(true, v4))

	peer, err := h.LinkByName("eg1")
	require.NoError(t, err)
	require.NoError(t, h.LinkSetDown(peer))
	down := rec.waitFor(t, "carrier lost", func(ev any) bool {
		u, ok := ev.(LinkUpdate)
		return ok && u.Index == idx && !u.Up()
	}).(LinkUpdate)
	assert.NotZero(t, down.Flags&unix.IFF_UP, "still administratively up")
	assert.Contains(t, []string{"down", "lower-layer-down"}, down.State())
	require.NoError(t, h.LinkSetUp(peer))
	rec.waitFor(t, "carrier back", func(ev any) bool {
		u, ok := ev.(LinkUpdate)
		return ok && u.Index == idx && u.Up()
	})

	late := newRecorder()
	cancel := w.Subscribe(late.subscriber())
	now := late.untilSynced(t)
	assert.True(t, hasAddr(now, hostAddr))
	assert.True(t, hasAddr(now, v4))
	assert.False(t, hasAddr(now, netip.PrefixFrom(egress, 128)), "removed before")
	cancel()
	require.NoError(t, h.AddrDel(link, &netlink.Addr{IPNet: ipNet(v4)}))
	rec.waitFor(t, "IPv4 address removed", addrEvent(false, v4))
	assert.Empty(t, late.ch, "nothing after cancel")
}

// TestWatcherResyncsAfterOverflow: when the kernel drops events (a tiny
// socket buffer, a subscriber stalled while hundreds of addresses come and
// go), the watcher subscribes again, lists, and tells the subscriber the
// differences: what it knows ends up equal to the kernel's state,
// removals included.
func TestWatcherResyncsAfterOverflow(t *testing.T) {
	ns, h, mgr := newTestNetns(t)
	var mu sync.Mutex
	view := map[netip.Prefix]bool{}
	var hold atomic.Bool
	release := make(chan struct{})
	sub := Subscriber{Addr: func(u AddrUpdate) {
		if hold.Load() {
			<-release
			hold.Store(false)
		}
		mu.Lock()
		defer mu.Unlock()
		if u.Added {
			view[u.Prefix] = true
		} else {
			delete(view, u.Prefix)
		}
	}}
	w := runWatcher(t, ns, h, func(c *WatchConfig) { c.ReceiveBufferSize = 4096 }, sub)

	var early []netip.Addr
	for range 50 {
		a := RandomAddr(prefix64)
		require.NoError(t, mgr.Add(a, time.Minute))
		early = append(early, a)
	}
	kernel := func() map[netip.Prefix]bool {
		list, err := h.AddrList(nil, netlink.FAMILY_ALL)
		require.NoError(t, err)
		out := map[netip.Prefix]bool{}
		for _, a := range list {
			ip, _ := netip.AddrFromSlice(a.IP)
			bits, _ := a.Mask.Size()
			out[netip.PrefixFrom(ip.Unmap(), bits)] = true
		}
		return out
	}
	same := func() bool {
		want := kernel()
		mu.Lock()
		defer mu.Unlock()
		return assert.ObjectsAreEqual(want, view)
	}
	require.Eventually(t, same, nstestGuard, 10*time.Millisecond)

	syncs := w.Syncs()
	hold.Store(true)
	for range 300 {
		require.NoError(t, mgr.Add(RandomAddr(prefix64), time.Minute))
	}
	for _, a := range early {
		require.NoError(t, mgr.Remove(a))
	}
	close(release)
	require.Eventually(t, func() bool { return w.Syncs() > syncs }, nstestGuard, 10*time.Millisecond, "a resync after the overflow")
	require.Eventually(t, same, nstestGuard, 10*time.Millisecond, "the subscriber's view is the kernel's")
}

// testPool is a pool on eg0 of a test namespace, following a watcher.
func testPool(t *testing.T, ns netns.NsHandle, h *netlink.Handle, mgr AddrManager, link netlink.Link, mod func(*PoolConfig)) (*Pool, *Watcher) {
	t.Helper()
	cfg := PoolConfig{
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
	p, err := NewPool(cfg)
	require.NoError(t, err)
	w := runWatcher(t, ns, h, nil)
	t.Cleanup(p.Follow(w, link))
	runPool(t, p)
	return p, w
}

func readyAddr(t *testing.T, p *Pool) netip.Addr {
	t.Helper()
	require.Eventually(t, func() bool { return p.Stats().Ready > 0 }, nstestGuard, 5*time.Millisecond)
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ready[0]
}

// TestPoolFollow: the pool's own adds and removes are not losses; an
// address somebody else deletes is forgotten and replaced, and a lease on
// it lost; an address of the prefix that somebody else adds is never
// drawn; a late report of a removal the kernel contradicts changes nothing.
func TestPoolFollow(t *testing.T) {
	ns, h, mgr := newTestNetns(t)
	var logs logBuffer
	p, _ := testPool(t, ns, h, mgr, mgr.Link(), func(c *PoolConfig) { c.Logger = logs.logger() })
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
		require.NoError(t, h.AddrDel(mgr.Link(), egressAddr(a, time.Second)))
		require.Eventually(t, func() bool { _, ok := addrStates(p)[a]; return !ok }, nstestGuard, 5*time.Millisecond)
		assert.Equal(t, uint64(1), p.Stats().Lost)
		require.Eventually(t, func() bool { return p.Stats().Ready == 2 }, nstestGuard, 5*time.Millisecond, "replaced")
		assert.Equal(t, 1, logs.count("removed by somebody else"))
	})

	t.Run("address in use deleted", func(t *testing.T) {
		l, err := p.Acquire(ctx)
		require.NoError(t, err)
		require.NoError(t, h.AddrDel(mgr.Link(), egressAddr(l.Addr(), time.Second)))
		require.Eventually(t, l.isLost, nstestGuard, 5*time.Millisecond)
		assert.Equal(t, uint64(2), p.Stats().Lost)
		assert.NotContains(t, addrStates(p), l.Addr())
		l.Release()
	})

	t.Run("late report of a removal", func(t *testing.T) {
		a := readyAddr(t, p)
		f := &follower{p: p, h: h, uplink: mgr.Link(), name: "eg0", addrs: true}
		f.addr(AddrUpdate{Prefix: netip.PrefixFrom(a, 128), LinkIndex: mgr.Link().Attrs().Index})
		assert.Equal(t, StateReady, addrStates(p)[a], "still on the interface: kept")
		assert.Equal(t, uint64(2), p.Stats().Lost)
	})

	t.Run("somebody else's address in the prefix", func(t *testing.T) {
		theirs := netip.MustParsePrefix("2001:db8:1:2::99/64")
		require.NoError(t, h.AddrAdd(mgr.Link(), &netlink.Addr{IPNet: ipNet(theirs), Flags: unix.IFA_F_NODAD}))
		require.Eventually(t, func() bool {
			p.mu.Lock()
			defer p.mu.Unlock()
			_, ok := p.exclude[theirs.Addr()]
			return ok
		}, nstestGuard, 5*time.Millisecond, "never drawn")
	})
}

// TestPoolFollowUplink: while the uplink has no carrier, or is down, new
// connections fail at once saying so, wrapping ErrNoAddress; when it is up
// again the pool works by itself. Going down administratively flushes the
// IPv6 addresses (keep_addr_on_down is 0 by default): the pool forgets its
// own.
func TestPoolFollowUplink(t *testing.T) {
	ns, h, mgr := newTestNetns(t)
	var logs logBuffer
	p, _ := testPool(t, ns, h, mgr, mgr.Link(), func(c *PoolConfig) { c.Logger = logs.logger() })
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
		return errors.Is(err, ErrNoAddress) && err.Error() == "no fresh egress address: uplink eg0 is down"
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
	assert.Equal(t, 1, logs.count("uplink is down"), logs.String())
	assert.Zero(t, p.Stats().Lost, "carrier loss keeps the addresses")
	require.NoError(t, h.LinkSetUp(peer))
	require.Eventually(t, works, nstestGuard, 5*time.Millisecond)
	assert.Equal(t, 1, logs.count("uplink is up again"))

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
	assert.Zero(t, logs.count("removed by somebody else"), "the flush is not blamed on somebody:\n%s", logs.String())
}

func onInterface(t *testing.T, mgr *Netlink) []netip.Addr {
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
func poolAddrs(p *Pool) []netip.Addr {
	var out []netip.Addr
	for _, a := range p.settled() {
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
	waitDAD(t, h)
	p, err := NewPool(PoolConfig{
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
	require.NoError(t, p.fill(ctx))
	gone := readyAddr(t, p) // the next Acquire's
	require.NoError(t, h.AddrDel(mgr.Link(), egressAddr(gone, time.Second)))

	var ln net.Listener
	inNetns(t, ns, func() { ln, err = net.Listen("tcp6", net.JoinHostPort(hostAddr.Addr().String(), "0")) })
	require.NoError(t, err)
	serveEcho(t, ln)

	d := &Dialer{Pool: p, Timeout: nstestGuard}
	var c net.Conn
	inNetns(t, ns, func() { c, err = d.DialContext(ctx, "tcp", ln.Addr().String()) })
	require.NoError(t, err)
	defer c.Close()
	echo(t, c)
	from := c.(*Conn).Egress()
	assert.NotEqual(t, gone, from)
	assert.True(t, prefix64.Contains(from))
	assert.Equal(t, from.String(), c.LocalAddr().(*net.TCPAddr).IP.String())
	assert.Equal(t, uint64(1), p.Stats().Lost)
	assert.NotContains(t, addrStates(p), gone)
}

// routedSetup is routed mode in a test namespace: the local route
// installed, and a pool that adds no address.
func routedSetup(t *testing.T) (netns.NsHandle, *netlink.Handle, *LocalRoute, *Pool) {
	t.Helper()
	ns, h, _ := newTestNetns(t)
	r, err := InstallLocalRoute(h, routedPrefix)
	require.NoError(t, err)
	p := newTestPool(t, nil, func(c *PoolConfig) { c.Prefix = routedPrefix; c.Manager = NoAddrs{} })
	return ns, h, r, p
}

// TestLocalRouteKept: routed mode's local route, deleted by somebody else, is
// restored at once with one warning naming it; after cancel it is left
// alone.
func TestLocalRouteKept(t *testing.T) {
	ns, h, r, p := routedSetup(t)
	var logs logBuffer
	w := runWatcher(t, ns, h, func(c *WatchConfig) { c.Routes = true })
	cancel := r.Keep(w, p, logs.logger())

	for i := 1; i <= 2; i++ {
		require.NoError(t, h.RouteDel(&r.want))
		require.Eventually(t, func() bool { return logs.count("restored it") == i }, nstestGuard, 5*time.Millisecond)
		assert.Len(t, localRoutes(t, h, routedPrefix), 1)
	}
	assert.Equal(t, 2, logs.count(`route="local 2001:db8:5:5::/64 dev lo table local"`), logs.String())
	l, err := p.Acquire(context.Background())
	require.NoError(t, err)
	l.Release()

	cancel()
	require.NoError(t, r.Remove())
	assert.Empty(t, localRoutes(t, h, routedPrefix), "not restored after cancel")
}

// TestLocalRouteRestoreFails: while the route is missing and cannot be
// restored, new connections fail closed naming it, one error is logged, and
// restoring is retried until it works, when the pool works again.
func TestLocalRouteRestoreFails(t *testing.T) {
	_, h, r, p := routedSetup(t)
	var logs logBuffer
	var fail atomic.Bool
	var tries atomic.Int32
	fail.Store(true)
	k := &routeKeeper{r: r, pool: p, log: logs.logger(), restore: func() error {
		tries.Add(1)
		if fail.Load() {
			return fmt.Errorf("adding route %s: %w", r, unix.EPERM)
		}
		return r.restore()
	}}
	t.Cleanup(k.stop)

	require.NoError(t, h.RouteDel(&r.want))
	k.check()
	_, err := p.Acquire(context.Background())
	require.ErrorIs(t, err, ErrNoAddress)
	assert.EqualError(t, err, "no fresh egress address: route local 2001:db8:5:5::/64 dev lo table local is missing and cannot be restored")
	require.Eventually(t, func() bool { return tries.Load() >= 3 }, nstestGuard, 10*time.Millisecond, "retried")
	assert.Equal(t, 1, logs.count("cannot be restored"), "one error line:\n%s", logs.String())
	assert.Equal(t, 1, logs.count("operation not permitted"))

	fail.Store(false)
	require.Eventually(t, func() bool { return p.usable() == nil }, nstestGuard, 10*time.Millisecond)
	assert.Len(t, localRoutes(t, h, routedPrefix), 1)
	assert.Equal(t, 1, logs.count("local route is back"))
}

// TestGuardFollow: the guard refuses an address as the host's own as soon
// as it is on any interface, IPv4 or IPv6, keeps refusing it while any
// interface still has it, and admits it again once none has; what it was
// told before the watcher's first listing and is not there goes.
func TestGuardFollow(t *testing.T) {
	ns, h, mgr := newTestNetns(t)
	link := mgr.Link()
	lo, err := h.LinkByName("lo")
	require.NoError(t, err)
	g := NewGuard(nil, nil)
	stale := netip.MustParseAddr("2001:db8:99::1")
	g.SetHostAddrs([]netip.Addr{stale})
	w := runWatcher(t, ns, h, nil)
	cancel := g.Follow(w)
	t.Cleanup(cancel)
	// Subscribed after the guard: when it hears of a change, so has the
	// guard.
	rec := newRecorder()
	t.Cleanup(w.Subscribe(rec.subscriber()))

	isHost := func(a netip.Addr) func() bool {
		return func() bool {
			var de *DeniedError
			return errors.As(g.Check(a), &de) && de.Reason == "an address of the proxy host"
		}
	}
	require.Eventually(t, isHost(hostAddr.Addr()), nstestGuard, 5*time.Millisecond, "the host's address, from the listing")
	require.Eventually(t, func() bool { return !isHost(stale)() }, nstestGuard, 5*time.Millisecond, "not the host's: gone after the listing")

	for _, p := range []netip.Prefix{netip.MustParsePrefix("2001:db8:77::1/128"), netip.MustParsePrefix("198.51.100.9/32")} {
		a := p.Addr()
		require.False(t, isHost(a)())
		require.NoError(t, h.AddrAdd(link, &netlink.Addr{IPNet: ipNet(p), Flags: unix.IFA_F_NODAD}))
		require.Eventually(t, isHost(a), nstestGuard, 5*time.Millisecond, "%s added", a)
		require.NoError(t, h.AddrAdd(lo, &netlink.Addr{IPNet: ipNet(p), Flags: unix.IFA_F_NODAD}))
		// The kernel tells of a new IPv6 address from a work queue, so the
		// news may come after later changes: wait for it.
		rec.waitFor(t, "the address on lo", func(ev any) bool {
			u, ok := ev.(AddrUpdate)
			return ok && u.Added && u.Prefix == p && u.LinkIndex == lo.Attrs().Index
		})
		require.NoError(t, h.AddrDel(link, &netlink.Addr{IPNet: ipNet(p)}))
		rec.waitFor(t, "the removal from eg0", func(ev any) bool {
			u, ok := ev.(AddrUpdate)
			return ok && !u.Added && u.Prefix == p && u.LinkIndex == link.Attrs().Index
		})
		assert.True(t, isHost(a)(), "%s is still on lo", a)
		require.NoError(t, h.AddrDel(lo, &netlink.Addr{IPNet: ipNet(p)}))
		require.Eventually(t, func() bool { return !isHost(a)() }, nstestGuard, 5*time.Millisecond, "%s removed from every interface", a)
	}
}
