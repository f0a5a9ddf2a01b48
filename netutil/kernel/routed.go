package kernel

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RouteProtocol is the protocol number of the local route egressd installs
// in routed mode (`ip -6 route show table local proto 71`). It lets a later
// run recognise, and replace, a route that a killed run left behind.
const RouteProtocol = 71

// LocalRoute is the route `local PREFIX dev lo` of routed mode, in the local
// table: with it (and IPV6_FREEBIND) a socket can bind to any address of the
// prefix, and the kernel takes packets to any of them as its own.
type LocalRoute struct {
	h      *netlink.Handle
	prefix netip.Prefix
	want   netlink.Route // the route egressd installs

	mu    sync.Mutex
	route netlink.Route // the route in use
	ours  bool          // installed by egressd, so removed by it
}

func localRoute(lo netlink.Link, prefix netip.Prefix) netlink.Route {
	return netlink.Route{
		Dst:       &net.IPNet{IP: prefix.Addr().AsSlice(), Mask: net.CIDRMask(prefix.Bits(), 128)},
		Type:      unix.RTN_LOCAL,
		Table:     unix.RT_TABLE_LOCAL,
		LinkIndex: lo.Attrs().Index,
		Scope:     netlink.SCOPE_HOST,
		Protocol:  RouteProtocol,
	}
}

// InstallLocalRoute installs the local route for prefix. A local route for
// exactly that prefix that somebody else made is used as it is and left in
// place on Remove; one that a killed egressd left (RouteProtocol) is taken
// over.
func InstallLocalRoute(h *netlink.Handle, prefix netip.Prefix) (*LocalRoute, error) {
	lo, err := h.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("loopback interface: %w", err)
	}
	want := localRoute(lo, prefix)
	existing, err := h.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Table: unix.RT_TABLE_LOCAL}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("listing local routes: %w", err)
	}
	for _, r := range existing {
		if r.Type == unix.RTN_LOCAL && routePrefix(r) == prefix && r.Protocol != RouteProtocol {
			return &LocalRoute{h: h, prefix: prefix, want: want, route: r, ours: false}, nil
		}
	}
	if err := h.RouteReplace(&want); err != nil {
		return nil, fmt.Errorf("adding route local %s dev lo: %w", prefix, err)
	}
	return &LocalRoute{h: h, prefix: prefix, want: want, route: want, ours: true}, nil
}

// Ours reports whether egressd installed the route (and so removes it).
func (r *LocalRoute) Ours() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ours
}

// String names the route as ip(8) shows it.
func (r *LocalRoute) String() string {
	return fmt.Sprintf("local %s dev lo table local", r.prefix)
}

// present reports whether a local route for the prefix is in the local
// table.
func (r *LocalRoute) present() (bool, error) {
	routes, err := r.h.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Table: unix.RT_TABLE_LOCAL}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return false, fmt.Errorf("listing local routes: %w", err)
	}
	for _, x := range routes {
		if isLocalRouteOf(x, r.prefix) {
			return true, nil
		}
	}
	return false, nil
}

func isLocalRouteOf(x netlink.Route, prefix netip.Prefix) bool {
	return x.Type == unix.RTN_LOCAL && x.Table == unix.RT_TABLE_LOCAL && routePrefix(x) == prefix
}

// restore installs egressd's route again. It is egressd's from then on,
// removed by Remove, whoever had made the one that went away.
func (r *LocalRoute) restore() error {
	if err := r.h.RouteReplace(&r.want); err != nil {
		return fmt.Errorf("adding route %s: %w", r, err)
	}
	r.mu.Lock()
	r.route, r.ours = r.want, true
	r.mu.Unlock()
	return nil
}

// Remove deletes the route if egressd installed it. A route already gone is
// not an error.
func (r *LocalRoute) Remove() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.ours {
		return nil
	}
	if err := r.h.RouteDel(&r.route); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("removing route local %s dev lo: %w", r.route.Dst, err)
	}
	return nil
}

// faultRoute is the pool's fault while the local route is missing.
const faultRoute = "route"

// RouteRetry is how often Keep tries to restore a route it could not.
const RouteRetry = time.Second

// Keep restores the route whenever somebody removes it, as w's route events
// tell (w must follow routes: WatchConfig.Routes), and checks that it is
// there after each of w's resyncs, until cancel is called. Each restore is
// logged in one warning line naming the route. While the route is missing
// and cannot be restored, pool is suspended (new connections fail at once
// with an error wrapping netutil.ErrNoAddress that names the route, instead of each
// timing out: without the route the replies to every address of the prefix
// are dropped), an error is logged once, and restoring is retried every
// RouteRetry. Call cancel before Remove.
func (r *LocalRoute) Keep(w *Watcher, pool *netutil.Pool, log *slog.Logger) (cancel func()) {
	k := &routeKeeper{r: r, pool: pool, log: log, restore: r.restore}
	unsubscribe := w.subscribe(&subscription{
		s: netutil.Subscriber{Synced: k.check},
		route: func(u RouteUpdate) {
			if u.Removed && isLocalRouteOf(u.Route, r.prefix) {
				k.check()
			}
		},
	})
	return func() {
		unsubscribe()
		k.stop()
	}
}

// routeKeeper is Keep's state.
type routeKeeper struct {
	r       *LocalRoute
	pool    *netutil.Pool
	log     *slog.Logger
	restore func() error // r.restore; a test's failure otherwise

	mu      sync.Mutex
	stopped bool
	failing bool        // restoring failed; the pool is suspended
	retry   *time.Timer // armed while failing
}

// check restores the route if it is missing.
func (k *routeKeeper) check() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.stopped {
		return
	}
	ok, err := k.r.present()
	if !ok { // missing, or the listing failed: a replace does no harm
		missing := err == nil
		if err = k.restore(); err == nil {
			if missing {
				k.log.Warn("local route was removed by somebody else: restored it", "route", k.r.String())
			}
			ok = true
		}
	}
	if ok {
		if k.failing {
			k.failing = false
			k.pool.Resume(faultRoute)
			k.log.Info("local route is back: handing out egress addresses", "route", k.r.String())
		}
		return
	}
	k.pool.Suspend(faultRoute, fmt.Errorf("route %s is missing and cannot be restored", k.r))
	if !k.failing {
		k.failing = true
		k.log.Error("local route was removed by somebody else and cannot be restored: new connections fail closed until it is back; retrying",
			"route", k.r.String(), "err", err, "every", RouteRetry)
	}
	if k.retry == nil {
		k.retry = time.AfterFunc(RouteRetry, k.check)
	} else {
		k.retry.Reset(RouteRetry)
	}
}

// stop ends the checks; no restore runs after it returns.
func (k *routeKeeper) stop() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.stopped = true
	if k.retry != nil {
		k.retry.Stop()
	}
}

// routePrefix returns a route's destination; the zero Prefix for a default
// route.
func routePrefix(r netlink.Route) netip.Prefix {
	if r.Dst == nil {
		return netip.Prefix{}
	}
	ip, ok := netip.AddrFromSlice(r.Dst.IP)
	if !ok {
		return netip.Prefix{}
	}
	bits, _ := r.Dst.Mask.Size()
	return netip.PrefixFrom(ip.Unmap(), bits)
}

// CheckRoutedPrefix refuses a prefix that routed mode would take from
// somebody: one that overlaps a route to an interface other than ifindex (a
// container bridge holding part of the /64, say), or that holds the gateway
// of the IPv6 default route, which the local route would capture.
func CheckRoutedPrefix(h *netlink.Handle, prefix netip.Prefix, ifindex int) error {
	routes, err := h.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("listing IPv6 routes: %w", err)
	}
	for _, r := range routes {
		dst := routePrefix(r)
		isDefault := !dst.IsValid() || dst.Bits() == 0
		if gw, ok := netip.AddrFromSlice(r.Gw); ok && isDefault && prefix.Contains(gw.Unmap()) {
			return fmt.Errorf("prefix %s holds the default gateway %s: the local route of routed mode would capture it; give a narrower -prefix", prefix, gw)
		}
		if isDefault || !dst.Overlaps(prefix) || r.LinkIndex == ifindex || r.LinkIndex == 0 {
			continue
		}
		name := fmt.Sprintf("if%d", r.LinkIndex)
		if link, err := h.LinkByIndex(r.LinkIndex); err == nil {
			name = link.Attrs().Name
		}
		return fmt.Errorf("prefix %s overlaps the route %s dev %s: the local route of routed mode would capture it; give a -prefix that leaves it out", prefix, dst, name)
	}
	return nil
}

// HostAddrs lists the addresses on every interface of the host, IPv4 and
// IPv6: routed mode must never hand out one of them (any may lie in the
// prefix), and no client may reach one through the proxy (Guard).
func HostAddrs(h *netlink.Handle) ([]netip.Addr, error) {
	list, err := h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("listing addresses: %w", err)
	}
	out := make([]netip.Addr, 0, len(list))
	for _, a := range list {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			out = append(out, ip.Unmap())
		}
	}
	return out, nil
}
