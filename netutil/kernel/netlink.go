// Package kernel is the netlink side of egressd's address work: the
// manager that adds and removes egress addresses on an interface (Netlink),
// routed mode's local route (LocalRoute), the watcher that follows the
// host's addresses, links and routes (Watcher), and Setup, which puts the
// pool, the dialer and the local route of either mode together for the
// daemon. It implements the interfaces netutil consumes (AddrManager,
// Events, Uplink); netutil itself never imports netlink.
package kernel

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// egressFlags are the flags of every address egressd adds.
const egressFlags = netutil.EgressFlags

// infiniteLifetime is how the kernel reports a lifetime that never ends.
const infiniteLifetime = 0xffffffff

// Netlink adds and removes egress addresses on one interface through a
// netlink handle. Every address is a /128 with IFA_F_NODAD and
// IFA_F_NOPREFIXROUTE, a preferred lifetime of 0 and a finite valid lifetime.
//
// The preferred lifetime of 0 is what keeps the host working: the kernel
// prefers any non-deprecated address as the default source of outbound
// connections (RFC 6724 rule 3), so the host's own address stays its default
// source however many egress addresses come and go, while an explicit bind()
// to an egress address still works.
type Netlink struct {
	h    *netlink.Handle
	link netlink.Link
}

var (
	_ netutil.AddrManager = (*Netlink)(nil)
	_ netutil.Uplink      = (*Netlink)(nil)
)

// NewNetlink returns a manager for the interface named ifname, using h for
// every request (netlink.NewHandleAt gives one inside a network namespace).
func NewNetlink(h *netlink.Handle, ifname string) (*Netlink, error) {
	link, err := h.LinkByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("interface %s: %w", ifname, err)
	}
	return &Netlink{h: h, link: link}, nil
}

// Link returns the interface.
func (n *Netlink) Link() netlink.Link { return n.link }

// Index implements netutil.Uplink.
func (n *Netlink) Index() int { return n.link.Attrs().Index }

// Name implements netutil.Uplink.
func (n *Netlink) Name() string { return n.link.Attrs().Name }

// Check implements netutil.Uplink: the IPv6 addresses on the interface, and
// whether it is up (an interface that is gone is not).
func (n *Netlink) Check() ([]netip.Addr, bool, error) {
	list, err := n.Addrs()
	if err != nil {
		return nil, false, err
	}
	addrs := make([]netip.Addr, len(list))
	for i, a := range list {
		addrs[i] = a.Addr()
	}
	l, err := n.h.LinkByIndex(n.Index())
	if err != nil {
		return addrs, false, nil
	}
	return addrs, linkUpdateOf(l, false).Up(), nil
}

func egressAddr(a netip.Addr, lifetime time.Duration) *netlink.Addr {
	return &netlink.Addr{
		IPNet:       &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(128, 128)},
		Flags:       egressFlags,
		PreferedLft: 0,
		ValidLft:    max(1, int(lifetime/time.Second)),
	}
}

// Add implements netutil.AddrManager.
func (n *Netlink) Add(a netip.Addr, lifetime time.Duration) error {
	if err := n.h.AddrAdd(n.link, egressAddr(a, lifetime)); err != nil {
		// unix.EEXIST matches fs.ErrExist, which the pool looks for.
		return fmt.Errorf("adding %s to %s: %w", a, n.link.Attrs().Name, err)
	}
	return nil
}

// Refresh implements netutil.AddrManager.
func (n *Netlink) Refresh(a netip.Addr, lifetime time.Duration) error {
	if err := n.h.AddrReplace(n.link, egressAddr(a, lifetime)); err != nil {
		return fmt.Errorf("refreshing %s on %s: %w", a, n.link.Attrs().Name, err)
	}
	return nil
}

// Remove implements netutil.AddrManager.
func (n *Netlink) Remove(a netip.Addr) error {
	err := n.h.AddrDel(n.link, egressAddr(a, time.Second))
	if err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("removing %s from %s: %w", a, n.link.Attrs().Name, err)
	}
	return nil
}

// IfAddr is an IPv6 address found on an interface.
type IfAddr struct {
	Prefix       netip.Prefix // the address with its prefix length
	Flags        int          // IFA_F_* flags
	PreferredLft uint32       // seconds left; 0xffffffff is forever
	ValidLft     uint32
}

// Addr returns the address itself.
func (a IfAddr) Addr() netip.Addr { return a.Prefix.Addr() }

// Addrs lists the IPv6 addresses on the interface.
func (n *Netlink) Addrs() ([]IfAddr, error) {
	list, err := n.h.AddrList(n.link, netlink.FAMILY_V6)
	if err != nil {
		return nil, fmt.Errorf("listing addresses of %s: %w", n.link.Attrs().Name, err)
	}
	out := make([]IfAddr, 0, len(list))
	for _, la := range list {
		ip, ok := netip.AddrFromSlice(la.IP)
		if !ok {
			continue
		}
		bits, _ := la.Mask.Size()
		out = append(out, IfAddr{
			Prefix:       netip.PrefixFrom(ip.Unmap(), bits),
			Flags:        la.Flags,
			PreferredLft: uint32(la.PreferedLft),
			ValidLft:     uint32(la.ValidLft),
		})
	}
	return out, nil
}

// IsLeftover reports whether a looks like an egress address that an earlier
// egressd added and did not remove (it was killed): a /128 inside prefix,
// with both IFA_F_NODAD and IFA_F_NOPREFIXROUTE, deprecated (preferred
// lifetime 0) and with a finite valid lifetime. Addresses a person or a
// network manager configures do not look like that: they have a prefix
// length below 128, or are preferred, or live forever, or go through
// duplicate address detection.
func IsLeftover(a IfAddr, prefix netip.Prefix) bool {
	return a.Prefix.Bits() == 128 &&
		prefix.Contains(a.Addr()) &&
		a.Flags&egressFlags == egressFlags &&
		a.PreferredLft == 0 &&
		a.ValidLft != infiniteLifetime
}

// RemoveLeftovers removes every address of the interface that IsLeftover
// recognises in prefix, except the pinned ones, and returns how many it
// removed.
func (n *Netlink) RemoveLeftovers(prefix netip.Prefix, pinned []netip.Addr) (int, error) {
	addrs, err := n.Addrs()
	if err != nil {
		return 0, err
	}
	removed := 0
	for _, a := range addrs {
		if !IsLeftover(a, prefix) || slices.Contains(pinned, a.Addr()) {
			continue
		}
		if err := n.Remove(a.Addr()); err != nil {
			return removed, err
		}
		removed++
	}
	return removed, nil
}

// DefaultInterface returns the name of the interface of the IPv6 default
// route.
func DefaultInterface(h *netlink.Handle) (string, error) {
	routes, err := h.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return "", fmt.Errorf("listing IPv6 routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue
			}
		}
		idx := r.LinkIndex
		if idx == 0 && len(r.MultiPath) > 0 {
			idx = r.MultiPath[0].LinkIndex
		}
		link, err := h.LinkByIndex(idx)
		if err != nil {
			return "", fmt.Errorf("interface of the IPv6 default route: %w", err)
		}
		return link.Attrs().Name, nil
	}
	return "", errors.New("no IPv6 default route: name the interface with -interface")
}

// DefaultPrefix returns the /64 of the first global address in addrs that is
// not a /128 egress address.
func DefaultPrefix(addrs []IfAddr) (netip.Prefix, error) {
	for _, a := range addrs {
		// IsGlobalUnicast is true of unique local addresses too, which is
		// what a test network or a NAT66 setup has.
		if !a.Addr().IsGlobalUnicast() || a.Flags&egressFlags == egressFlags {
			continue
		}
		return netip.PrefixFrom(a.Addr(), 64).Masked(), nil
	}
	return netip.Prefix{}, errors.New("no global IPv6 address on the interface: give the prefix with -prefix")
}

// OnInterface reports whether prefix is on-link at the interface: it lies
// within the link prefix (LinkPrefix) of some address there other than a
// leftover egress address. An address of a narrower part is not enough: a
// /48 whose one /64 is on the link would draw from /64s the router never
// delivers.
func OnInterface(prefix netip.Prefix, addrs []IfAddr) bool {
	return slices.ContainsFunc(addrs, func(a IfAddr) bool {
		return !IsLeftover(a, prefix) && Covers(LinkPrefix(a), prefix)
	})
}

// LinkPrefix is the prefix an address of the interface says is on its
// link: the address's own, or its /64 when that is narrower (an address
// added as a /128 stands for its /64, as DefaultPrefix takes it).
func LinkPrefix(a IfAddr) netip.Prefix {
	return netip.PrefixFrom(a.Addr(), min(a.Prefix.Bits(), 64)).Masked()
}

// Covers reports whether inner lies wholly within outer.
func Covers(outer, inner netip.Prefix) bool {
	return outer.Bits() <= inner.Bits() && outer.Contains(inner.Addr())
}

// OnLinkRoutes lists the destinations of the main table's IPv6 routes
// through the interface ifindex without a gateway: the prefixes the host
// takes as on-link there. Default routes are left out.
func OnLinkRoutes(h *netlink.Handle, ifindex int) ([]netip.Prefix, error) {
	routes, err := h.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Table: unix.RT_TABLE_MAIN, LinkIndex: ifindex},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_OIF)
	if err != nil {
		return nil, fmt.Errorf("listing IPv6 routes: %w", err)
	}
	var out []netip.Prefix
	for _, r := range routes {
		if dst := routePrefix(r); dst.IsValid() && dst.Bits() > 0 && r.Gw == nil && len(r.MultiPath) == 0 {
			out = append(out, dst)
		}
	}
	return out, nil
}
