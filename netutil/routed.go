package netutil

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RouteProtocol is the protocol number of the local route egressd installs
// in routed mode (`ip -6 route show table local proto 71`). It lets a later
// run recognise, and replace, a route that a killed run left behind.
const RouteProtocol = 71

// NoAddrs is the AddrManager of routed mode: the prefix is routed to the
// host and a local route makes every address of it the host's own, so there
// is nothing to add or remove. The pool still hands out each address to one
// connection at a time and bounds how many are in use.
type NoAddrs struct{}

var _ AddrManager = NoAddrs{}

// Add implements AddrManager; it does nothing.
func (NoAddrs) Add(netip.Addr, time.Duration) error { return nil }

// Refresh implements AddrManager; it does nothing.
func (NoAddrs) Refresh(netip.Addr, time.Duration) error { return nil }

// Remove implements AddrManager; it does nothing.
func (NoAddrs) Remove(netip.Addr) error { return nil }

// LocalRoute is the route `local PREFIX dev lo` of routed mode, in the local
// table: with it (and IPV6_FREEBIND) a socket can bind to any address of the
// prefix, and the kernel takes packets to any of them as its own.
type LocalRoute struct {
	h     *netlink.Handle
	route netlink.Route
	ours  bool // installed by egressd, so removed by it
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
			return &LocalRoute{h: h, route: r, ours: false}, nil
		}
	}
	if err := h.RouteReplace(&want); err != nil {
		return nil, fmt.Errorf("adding route local %s dev lo: %w", prefix, err)
	}
	return &LocalRoute{h: h, route: want, ours: true}, nil
}

// Ours reports whether egressd installed the route (and so removes it).
func (r *LocalRoute) Ours() bool { return r.ours }

// Remove deletes the route if egressd installed it. A route already gone is
// not an error.
func (r *LocalRoute) Remove() error {
	if !r.ours {
		return nil
	}
	if err := r.h.RouteDel(&r.route); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("removing route local %s dev lo: %w", r.route.Dst, err)
	}
	return nil
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
