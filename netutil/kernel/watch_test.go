package kernel

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/egressd/egressd/internal/nettest"
	"github.com/egressd/egressd/netutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// runWatcher starts a watcher of ns and stops it in t.Cleanup.
func runWatcher(t *testing.T, ns netns.NsHandle, h *netlink.Handle, mod func(*WatchConfig), subs ...netutil.Subscriber) *Watcher {
	t.Helper()
	cfg := WatchConfig{Handle: h, Namespace: &ns, Logger: quiet}
	if mod != nil {
		mod(&cfg)
	}
	w := NewWatcher(cfg)
	for _, s := range subs {
		w.Subscribe(s)
	}
	nettest.Run(t, w.Run)
	require.Eventually(t, func() bool { return w.Syncs() > 0 }, nstestGuard, 5*time.Millisecond, "the first listing")
	return w
}

// recorder is a subscriber that passes every event on a channel.
type recorder struct{ ch chan any }

func newRecorder() *recorder { return &recorder{ch: make(chan any, 4096)} }

func (r *recorder) subscriber() netutil.Subscriber {
	return netutil.Subscriber{
		Addr:   func(u netutil.AddrUpdate) { r.ch <- u },
		Link:   func(u netutil.LinkUpdate) { r.ch <- u },
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
		u, ok := ev.(netutil.AddrUpdate)
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
	assert.Contains(t, first, netutil.LinkUpdate{Index: idx, Name: "eg0", Flags: link.Attrs().RawFlags | unix.IFF_LOWER_UP | unix.IFF_RUNNING, OperState: netutil.OperUp})

	egress := netip.MustParseAddr("2001:db8:1:2::abcd")
	require.NoError(t, mgr.Add(egress, time.Minute))
	ev := rec.waitFor(t, "egress address added", addrEvent(true, netip.PrefixFrom(egress, 128))).(netutil.AddrUpdate)
	assert.Equal(t, idx, ev.LinkIndex)
	assert.True(t, ev.LooksLikeEgress(), "flags %#x", ev.Flags)
	require.NoError(t, mgr.Remove(egress))
	rec.waitFor(t, "egress address removed", addrEvent(false, netip.PrefixFrom(egress, 128)))

	v4 := netip.MustParsePrefix("198.51.100.7/24")
	require.NoError(t, h.AddrAdd(link, &netlink.Addr{IPNet: ipNet(v4)}))
	rec.waitFor(t, "IPv4 address added", addrEvent(true, v4))

	peer, err := h.LinkByName("eg1")
	require.NoError(t, err)
	require.NoError(t, h.LinkSetDown(peer))
	down := rec.waitFor(t, "carrier lost", func(ev any) bool {
		u, ok := ev.(netutil.LinkUpdate)
		return ok && u.Index == idx && !u.Up()
	}).(netutil.LinkUpdate)
	assert.NotZero(t, down.Flags&unix.IFF_UP, "still administratively up")
	assert.Contains(t, []string{"down", "lower-layer-down"}, down.State())
	require.NoError(t, h.LinkSetUp(peer))
	rec.waitFor(t, "carrier back", func(ev any) bool {
		u, ok := ev.(netutil.LinkUpdate)
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
	sub := netutil.Subscriber{Addr: func(u netutil.AddrUpdate) {
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
		a := netutil.RandomAddr(prefix64)
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
		require.NoError(t, mgr.Add(netutil.RandomAddr(prefix64), time.Minute))
	}
	for _, a := range early {
		require.NoError(t, mgr.Remove(a))
	}
	close(release)
	require.Eventually(t, func() bool { return w.Syncs() > syncs }, nstestGuard, 10*time.Millisecond, "a resync after the overflow")
	require.Eventually(t, same, nstestGuard, 10*time.Millisecond, "the subscriber's view is the kernel's")
}

// routedSetup is routed mode in a test namespace: the local route
// installed, and a pool that adds no address.
func routedSetup(t *testing.T) (netns.NsHandle, *netlink.Handle, *LocalRoute, *netutil.Pool) {
	t.Helper()
	ns, h, _ := newTestNetns(t)
	r, err := InstallLocalRoute(h, routedPrefix)
	require.NoError(t, err)
	p, err := netutil.NewPool(netutil.PoolConfig{Prefix: routedPrefix, Manager: netutil.NoAddrs{}, Logger: quiet, Ready: -1})
	require.NoError(t, err)
	return ns, h, r, p
}

// TestLocalRouteKept: routed mode's local route, deleted by somebody else, is
// restored at once with one warning naming it; after cancel it is left
// alone.
func TestLocalRouteKept(t *testing.T) {
	ns, h, r, p := routedSetup(t)
	var logs nettest.LogBuffer
	w := runWatcher(t, ns, h, func(c *WatchConfig) { c.Routes = true })
	cancel := r.Keep(w, p, logs.Logger())

	for i := 1; i <= 2; i++ {
		require.NoError(t, h.RouteDel(&r.want))
		require.Eventually(t, func() bool { return logs.Count("restored it") == i }, nstestGuard, 5*time.Millisecond)
		assert.Len(t, localRoutes(t, h, routedPrefix), 1)
	}
	assert.Equal(t, 2, logs.Count(`route="local 2001:db8:5:5::/64 dev lo table local"`), logs.String())
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
	var logs nettest.LogBuffer
	var fail atomic.Bool
	var tries atomic.Int32
	fail.Store(true)
	k := &routeKeeper{r: r, pool: p, log: logs.Logger(), restore: func() error {
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
	require.ErrorIs(t, err, netutil.ErrNoAddress)
	assert.EqualError(t, err, "no fresh egress address: route local 2001:db8:5:5::/64 dev lo table local is missing and cannot be restored")
	require.Eventually(t, func() bool { return tries.Load() >= 3 }, nstestGuard, 10*time.Millisecond, "retried")
	assert.Equal(t, 1, logs.Count("cannot be restored"), "one error line:\n%s", logs.String())
	assert.Equal(t, 1, logs.Count("operation not permitted"))

	fail.Store(false)
	require.Eventually(t, func() bool { return p.Usable() == nil }, nstestGuard, 10*time.Millisecond)
	assert.Len(t, localRoutes(t, h, routedPrefix), 1)
	assert.Equal(t, 1, logs.Count("local route is back"))
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
	g := netutil.NewGuard(nil, nil)
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
			var de *netutil.DeniedError
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
			u, ok := ev.(netutil.AddrUpdate)
			return ok && u.Added && u.Prefix == p && u.LinkIndex == lo.Attrs().Index
		})
		require.NoError(t, h.AddrDel(link, &netlink.Addr{IPNet: ipNet(p)}))
		rec.waitFor(t, "the removal from eg0", func(ev any) bool {
			u, ok := ev.(netutil.AddrUpdate)
			return ok && !u.Added && u.Prefix == p && u.LinkIndex == link.Attrs().Index
		})
		assert.True(t, isHost(a)(), "%s is still on lo", a)
		require.NoError(t, h.AddrDel(lo, &netlink.Addr{IPNet: ipNet(p)}))
		require.Eventually(t, func() bool { return !isHost(a)() }, nstestGuard, 5*time.Millisecond, "%s removed from every interface", a)
	}
}
