package kernel

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// DefaultWatchBuffer is the receive buffer of each of a Watcher's netlink
// sockets. The kernel charges about a kilobyte of it per event, so the
// default absorbs a burst of a few thousand (an interface going down drops
// every address on it at once); beyond that it drops events, and the
// Watcher lists the state again.
const DefaultWatchBuffer = 4 << 20

// WatchConfig configures a Watcher.
type WatchConfig struct {
	// Handle lists addresses and links when the watch starts and whenever
	// events were lost. Required.
	Handle *netlink.Handle
	// Namespace is the network namespace Handle works in (netlink.NewHandleAt
	// gives a handle in another one); nil means the process's own.
	Namespace *netns.NsHandle
	// Routes also follows routes (RouteUpdate). Off unless a subscriber
	// needs them: every egress address comes with a route of its own in
	// the local table, so route events double the watcher's work in
	// on-link mode.
	Routes bool
	// ReceiveBufferSize is the receive buffer of each netlink socket, set
	// with SO_RCVBUFFORCE; zero means DefaultWatchBuffer. Without
	// CAP_NET_ADMIN the kernel caps it at net.core.rmem_max.
	ReceiveBufferSize int
	// Logger gets warnings; slog.Default() when nil.
	Logger *slog.Logger
}

// RouteUpdate is a route of the namespace that was added, changed or
// removed (WatchConfig.Routes).
type RouteUpdate struct {
	Removed bool
	Route   netlink.Route
}

// Watcher follows the addresses and interfaces (and, when asked, the
// routes) of one network namespace through netlink events, for any number
// of subscribers. It keeps the current set of addresses and links: a
// subscriber first hears of everything there is as added, then of each
// change. When the kernel drops events (its socket buffer overflows with
// ENOBUFS under churn) or a socket fails, the watcher subscribes again,
// lists the state and tells subscribers the differences it finds, so that
// what they know stays true.
//
// egressd's own address adds and removes come through as events like any
// others; subscribers tell them apart by their state.
type Watcher struct {
	cfg WatchConfig
	log *slog.Logger

	mu     sync.Mutex // held while callbacks run: one event at a time, in order
	subs   []*subscription
	addrs  map[addrKey]netutil.AddrUpdate
	links  map[int]netutil.LinkUpdate
	synced bool // the state has been listed
	syncs  atomic.Int64
	// noForce: SO_RCVBUFFORCE was refused (no CAP_NET_ADMIN). The library
	// leaks the socket when setting the buffer fails, so it is not tried
	// twice.
	noForce atomic.Bool
}

// subscription is one subscriber: a netutil.Subscriber, and route, which
// hears of route changes when WatchConfig.Routes is set (LocalRoute.Keep).
// Routes are not listed (tables can be large): a subscriber that depends on
// a route checks it in Synced.
type subscription struct {
	s     netutil.Subscriber
	route func(RouteUpdate)
}

// addrKey identifies an address: IPv4 allows one address twice on an
// interface with different prefix lengths.
type addrKey struct {
	link   int
	prefix netip.Prefix
}

// NewWatcher returns a watcher; Run starts it.
func NewWatcher(cfg WatchConfig) *Watcher {
	if cfg.ReceiveBufferSize == 0 {
		cfg.ReceiveBufferSize = DefaultWatchBuffer
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Watcher{
		cfg:   cfg,
		log:   cfg.Logger,
		addrs: make(map[addrKey]netutil.AddrUpdate),
		links: make(map[int]netutil.LinkUpdate),
	}
}

// Subscribe implements netutil.Events: it adds s, which hears at once of every link and address known so
// far (and Synced, if the state has been listed), then of every change. The
// returned function ends the subscription: no callback of s runs after it
// returns.
func (w *Watcher) Subscribe(s netutil.Subscriber) (cancel func()) {
	return w.subscribe(&subscription{s: s})
}

var _ netutil.Events = (*Watcher)(nil)

// subscribe is Subscribe, with routes.
func (w *Watcher) subscribe(sub *subscription) (cancel func()) {
	s := sub.s
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, idx := range slices.Sorted(maps.Keys(w.links)) {
		if s.Link != nil {
			s.Link(w.links[idx])
		}
	}
	if s.Addr != nil {
		for _, k := range sortedKeys(w.addrs) {
			s.Addr(w.addrs[k])
		}
	}
	if w.synced && s.Synced != nil {
		s.Synced()
	}
	w.subs = append(w.subs, sub)
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.subs = slices.DeleteFunc(w.subs, func(x *subscription) bool { return x == sub })
	}
}

// Syncs returns how many times the watcher has listed the state: once when
// it started, and once more after each loss of events.
func (w *Watcher) Syncs() int { return int(w.syncs.Load()) }

// Run delivers events until ctx is done. It subscribes again after a
// failure, waiting a little longer after each one that follows quickly on
// the last.
func (w *Watcher) Run(ctx context.Context) {
	const minWait, maxWait = 100 * time.Millisecond, 5 * time.Second
	wait := minWait
	var lastWarn time.Time
	lost := 0
	for {
		start := time.Now()
		err := w.session(ctx)
		if ctx.Err() != nil {
			return
		}
		lost++
		// Under constant churn the kernel may drop events again and
		// again: one warning a minute is enough.
		if time.Since(lastWarn) >= time.Minute {
			w.log.Warn("netlink events lost; listing addresses and links again", "err", err, "times", lost)
			lastWarn, lost = time.Now(), 0
		} else {
			w.log.Debug("netlink events lost; listing addresses and links again", "err", err)
		}
		if time.Since(start) > maxWait {
			wait = minWait
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, maxWait)
	}
}

// session subscribes, lists the state and delivers events until ctx is done
// (nil) or a subscription ends (the reason).
func (w *Watcher) session(ctx context.Context) error {
	done := make(chan struct{})
	var drains []func()
	defer func() {
		// Closing done closes the sockets; each subscription's goroutine
		// then fails to receive and closes its channel. Until it does it
		// may be blocked sending an event: drain.
		close(done)
		for _, drain := range drains {
			drain()
		}
	}()
	var errMu sync.Mutex
	var lastErr error
	onErr := func(err error) {
		errMu.Lock()
		lastErr = err
		errMu.Unlock()
	}
	ended := func(what string) error {
		errMu.Lock()
		defer errMu.Unlock()
		if lastErr == nil {
			return fmt.Errorf("%s events ended", what)
		}
		return fmt.Errorf("%s events: %w", what, lastErr)
	}
	ns, size, force := w.cfg.Namespace, w.cfg.ReceiveBufferSize, !w.noForce.Load()

	addrCh := make(chan netlink.AddrUpdate, 64)
	if err := netlink.AddrSubscribeWithOptions(addrCh, done, netlink.AddrSubscribeOptions{
		Namespace: ns, ErrorCallback: onErr, ReceiveBufferSize: size, ReceiveBufferForceSize: force,
	}); err != nil {
		if force && errors.Is(err, unix.EPERM) {
			w.noForce.Store(true)
		}
		return fmt.Errorf("subscribing to address events: %w", err)
	}
	drains = append(drains, func() { drain(addrCh) })
	linkCh := make(chan netlink.LinkUpdate, 16)
	if err := netlink.LinkSubscribeWithOptions(linkCh, done, netlink.LinkSubscribeOptions{
		Namespace: ns, ErrorCallback: onErr, ReceiveBufferSize: size, ReceiveBufferForceSize: force,
	}); err != nil {
		return fmt.Errorf("subscribing to link events: %w", err)
	}
	drains = append(drains, func() { drain(linkCh) })
	var routeCh chan netlink.RouteUpdate // nil, never ready, unless routes are followed
	if w.cfg.Routes {
		routeCh = make(chan netlink.RouteUpdate, 64)
		if err := netlink.RouteSubscribeWithOptions(routeCh, done, netlink.RouteSubscribeOptions{
			Namespace: ns, ErrorCallback: onErr, ReceiveBufferSize: size, ReceiveBufferForceSize: force,
		}); err != nil {
			return fmt.Errorf("subscribing to route events: %w", err)
		}
		drains = append(drains, func() { drain(routeCh) })
	}

	// Subscribed first, listed second: a change between the two shows in
	// the listing and comes again as an event, which is harmless; in the
	// other order it could be missed.
	if err := w.resync(); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case u, ok := <-addrCh:
			if !ok {
				return ended("address")
			}
			w.addr(addrUpdateOf(u))
		case u, ok := <-linkCh:
			if !ok {
				return ended("link")
			}
			if u.Family != unix.AF_UNSPEC {
				continue // a bridge port's state (AF_BRIDGE), not the link's
			}
			w.link(linkUpdateOf(u.Link, u.Header.Type == unix.RTM_DELLINK))
		case u, ok := <-routeCh:
			if !ok {
				return ended("route")
			}
			w.route(RouteUpdate{Removed: u.Type == unix.RTM_DELROUTE, Route: u.Route})
		}
	}
}

func drain[T any](ch <-chan T) {
	for range ch {
	}
}

func addrUpdateOf(u netlink.AddrUpdate) netutil.AddrUpdate {
	ip, _ := netip.AddrFromSlice(u.LinkAddress.IP)
	bits, _ := u.LinkAddress.Mask.Size()
	return netutil.AddrUpdate{
		Added:     u.NewAddr,
		Prefix:    netip.PrefixFrom(ip.Unmap(), bits),
		LinkIndex: u.LinkIndex,
		Flags:     u.Flags,
		Scope:     u.Scope,
	}
}

func linkUpdateOf(l netlink.Link, removed bool) netutil.LinkUpdate {
	a := l.Attrs()
	return netutil.LinkUpdate{Index: a.Index, Name: a.Name, Removed: removed, Flags: a.RawFlags, OperState: netutil.OperState(a.OperState)}
}

func (w *Watcher) addr(u netutil.AddrUpdate) {
	w.mu.Lock()
	defer w.mu.Unlock()
	k := addrKey{u.LinkIndex, u.Prefix}
	if u.Added {
		w.addrs[k] = u
	} else {
		delete(w.addrs, k)
	}
	w.emitAddr(u)
}

func (w *Watcher) link(u netutil.LinkUpdate) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if u.Removed {
		delete(w.links, u.Index)
	} else {
		w.links[u.Index] = u
	}
	w.emitLink(u)
}

func (w *Watcher) route(u RouteUpdate) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, sub := range w.subs {
		if sub.route != nil {
			sub.route(u)
		}
	}
}

func (w *Watcher) emitAddr(u netutil.AddrUpdate) {
	for _, sub := range w.subs {
		if sub.s.Addr != nil {
			sub.s.Addr(u)
		}
	}
}

func (w *Watcher) emitLink(u netutil.LinkUpdate) {
	for _, sub := range w.subs {
		if sub.s.Link != nil {
			sub.s.Link(u)
		}
	}
}

// resync lists links and addresses, tells subscribers how they differ from
// what the watcher knew (every link, and the addresses that appeared,
// changed or went away), and then Synced.
func (w *Watcher) resync() error {
	links, err := w.cfg.Handle.LinkList()
	if err != nil {
		return fmt.Errorf("listing links: %w", err)
	}
	list, err := w.cfg.Handle.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("listing addresses: %w", err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()

	nowLinks := make(map[int]netutil.LinkUpdate, len(links))
	for _, l := range links {
		u := linkUpdateOf(l, false)
		nowLinks[u.Index] = u
	}
	for _, idx := range slices.Sorted(maps.Keys(nowLinks)) {
		w.emitLink(nowLinks[idx])
	}
	for _, idx := range slices.Sorted(maps.Keys(w.links)) {
		if _, ok := nowLinks[idx]; !ok {
			u := w.links[idx]
			u.Removed = true
			w.emitLink(u)
		}
	}
	w.links = nowLinks

	nowAddrs := make(map[addrKey]netutil.AddrUpdate, len(list))
	for _, a := range list {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		bits, _ := a.Mask.Size()
		u := netutil.AddrUpdate{Added: true, Prefix: netip.PrefixFrom(ip.Unmap(), bits), LinkIndex: a.LinkIndex, Flags: a.Flags, Scope: a.Scope}
		nowAddrs[addrKey{u.LinkIndex, u.Prefix}] = u
	}
	for _, k := range sortedKeys(w.addrs) {
		if _, ok := nowAddrs[k]; !ok {
			u := w.addrs[k]
			u.Added = false
			w.emitAddr(u)
		}
	}
	for _, k := range sortedKeys(nowAddrs) {
		if old, ok := w.addrs[k]; !ok || old != nowAddrs[k] {
			w.emitAddr(nowAddrs[k])
		}
	}
	w.addrs = nowAddrs

	w.synced = true
	w.syncs.Add(1)
	for _, sub := range w.subs {
		if sub.s.Synced != nil {
			sub.s.Synced()
		}
	}
	return nil
}

// sortedKeys orders addresses by interface and address, so that a resync
// tells its differences in a stable order.
func sortedKeys(m map[addrKey]netutil.AddrUpdate) []addrKey {
	return slices.SortedFunc(maps.Keys(m), func(a, b addrKey) int {
		return cmp.Or(cmp.Compare(a.link, b.link), a.prefix.Addr().Compare(b.prefix.Addr()), cmp.Compare(a.prefix.Bits(), b.prefix.Bits()))
	})
}
