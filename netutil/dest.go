package netutil

import (
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
)

// Guard is the destination policy of a Dialer: the addresses a proxy client
// must never reach through egressd, checked on the addresses a name
// resolved to, so that no name and no spelling of an address gets around it.
//
// Some destinations are always refused: every address of the proxy host
// itself (on any interface, IPv4 and IPv6, kept current with
// SetHostAddrs/AddHostAddr/RemoveHostAddr), loopback, the unspecified
// address, link-local networks (169.254.0.0/16 holds the clouds' metadata
// services), multicast, broadcast, and the egress prefixes (in routed mode
// every address of them is the host's own). Others are refused unless the
// allow list covers them: private and special-purpose ranges (RFC 1918,
// 100.64.0.0/10, fc00::/7 and the like; see specialRanges), which is where a
// host's neighbours and internal services live. An address that embeds an
// IPv4 address (NAT64's 64:ff9b::/96, 6to4's 2002::/16) is checked as that
// IPv4 address too. IPv4-mapped IPv6 addresses are checked as the IPv4
// address they map, and zoned addresses are refused outright: a zone names
// an interface of the proxy host.
//
// The documentation ranges (192.0.2.0/24, 2001:db8::/32, ...) are neither
// refused nor special: no network routes them.
//
// A Guard is safe for concurrent use. Check does not allocate for an
// address it admits.
type Guard struct {
	egress []netip.Prefix
	allow  atomic.Pointer[[]netip.Prefix]

	mu   sync.RWMutex
	host map[netip.Addr]struct{}
}

// DeniedError is the error of a destination a Guard refuses. It wraps
// ErrDenied.
type DeniedError struct {
	Addr netip.Addr // the address refused, as dialed
	// Reason says what the address is, e.g. "loopback" or "a private
	// network (RFC 1918)".
	Reason string
	// Special is set when the allow list (-allow-dest) could admit the
	// address: a private or special-purpose range rather than the host.
	Special bool
}

func (e *DeniedError) Error() string {
	if e.Special {
		return fmt.Sprintf("destination %s not allowed: %s; -allow-dest re-admits it", e.Addr, e.Reason)
	}
	return fmt.Sprintf("destination %s not allowed: %s", e.Addr, e.Reason)
}

func (e *DeniedError) Unwrap() error { return ErrDenied }

// rangeReason is an address range and what it is.
type rangeReason struct {
	p      netip.Prefix
	reason string
}

func ranges(list ...string) []rangeReason {
	out := make([]rangeReason, 0, len(list)/2)
	for i := 0; i+1 < len(list); i += 2 {
		out = append(out, rangeReason{netip.MustParsePrefix(list[i]), list[i+1]})
	}
	return out
}

// neverRanges are refused whatever the allow list says: they lead to the
// proxy host itself or to its link.
var neverRanges = ranges(
	"127.0.0.0/8", "loopback",
	"::1/128", "loopback",
	"0.0.0.0/8", "the unspecified address (this host)",
	"::/128", "the unspecified address (this host)",
	"169.254.0.0/16", "link-local (the clouds' metadata services live there)",
	"fe80::/10", "link-local",
	"224.0.0.0/4", "multicast",
	"ff00::/8", "multicast",
	"255.255.255.255/32", "broadcast",
)

// specialRanges are refused unless the allow list covers them: private and
// special-purpose ranges (the IANA special-purpose registries) where a
// host's neighbours, containers and internal services live.
var specialRanges = ranges(
	"10.0.0.0/8", "a private network (RFC 1918)",
	"172.16.0.0/12", "a private network (RFC 1918)",
	"192.168.0.0/16", "a private network (RFC 1918)",
	"100.64.0.0/10", "shared address space (RFC 6598)",
	"192.0.0.0/24", "IETF protocol assignments (RFC 6890)",
	"198.18.0.0/15", "a benchmarking network (RFC 2544)",
	"240.0.0.0/4", "reserved (RFC 1112)",
	"fc00::/7", "a unique local address (RFC 4193)",
	"fec0::/10", "site-local (RFC 3879)",
	"::/96", "IPv4-compatible (deprecated, RFC 4291)",
	"64:ff9b:1::/48", "local-use NAT64 (RFC 8215)",
	"100::/64", "discard-only (RFC 6666)",
	"2001::/32", "Teredo (RFC 4380)",
	"2001:2::/48", "a benchmarking network (RFC 5180)",
)

// Prefixes whose addresses embed an IPv4 address, which is checked too.
var (
	nat64Prefix = netip.MustParsePrefix("64:ff9b::/96") // RFC 6052: the last 32 bits
	sixToFour   = netip.MustParsePrefix("2002::/16")    // RFC 3056: bits 16 to 47
)

// NewGuard returns a Guard that refuses, besides the fixed ranges, the
// egress prefixes, and admits the special ranges that allow covers.
func NewGuard(egress, allow []netip.Prefix) *Guard {
	g := &Guard{egress: slices.Clone(egress), host: make(map[netip.Addr]struct{})}
	g.SetAllow(allow)
	return g
}

// SetAllow replaces the allow list: special ranges (see Guard) it covers are
// admitted. It never admits what is always refused.
func (g *Guard) SetAllow(allow []netip.Prefix) {
	list := make([]netip.Prefix, 0, len(allow))
	for _, p := range allow {
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		list = append(list, p.Masked())
	}
	g.allow.Store(&list)
}

// SetHostAddrs replaces the proxy host's own addresses with addrs.
func (g *Guard) SetHostAddrs(addrs []netip.Addr) {
	host := make(map[netip.Addr]struct{}, len(addrs))
	for _, a := range addrs {
		host[a.Unmap().WithZone("")] = struct{}{}
	}
	g.mu.Lock()
	g.host = host
	g.mu.Unlock()
}

// AddHostAddr records a new address of the proxy host.
func (g *Guard) AddHostAddr(a netip.Addr) {
	g.mu.Lock()
	g.host[a.Unmap().WithZone("")] = struct{}{}
	g.mu.Unlock()
}

// RemoveHostAddr forgets an address the proxy host no longer has.
func (g *Guard) RemoveHostAddr(a netip.Addr) {
	g.mu.Lock()
	delete(g.host, a.Unmap().WithZone(""))
	g.mu.Unlock()
}

// Check returns nil if a client may reach ip, and a *DeniedError otherwise.
func (g *Guard) Check(ip netip.Addr) error {
	if !ip.IsValid() {
		return &DeniedError{Addr: ip, Reason: "not an address"}
	}
	if ip.Zone() != "" {
		return zoned(ip)
	}
	ip = ip.Unmap()
	if e := g.check(ip, ip); e != nil {
		return e
	}
	var v4 netip.Addr
	var form string
	switch b := ip.As16(); {
	case !ip.Is6():
	case nat64Prefix.Contains(ip):
		v4, form = netip.AddrFrom4([4]byte(b[12:16])), "NAT64 (RFC 6052)"
	case sixToFour.Contains(ip):
		v4, form = netip.AddrFrom4([4]byte(b[2:6])), "6to4 (RFC 3056)"
	}
	if v4.IsValid() {
		if e := g.check(v4, ip); e != nil {
			e.Addr, e.Reason = ip, fmt.Sprintf("the %s form of %s, %s", form, v4, e.Reason)
			return e
		}
	}
	return nil
}

// check checks ip, an address without zone or mapping; also is what the
// allow list may match besides ip (the NAT64 address of an embedded IPv4
// address).
func (g *Guard) check(ip, also netip.Addr) *DeniedError {
	for _, r := range neverRanges {
		if r.p.Contains(ip) {
			return &DeniedError{Addr: ip, Reason: r.reason}
		}
	}
	if g.isHost(ip) {
		return &DeniedError{Addr: ip, Reason: "an address of the proxy host"}
	}
	for _, p := range g.egress {
		if p.Contains(ip) {
			return &DeniedError{Addr: ip, Reason: "in egressd's own egress prefix " + p.String()}
		}
	}
	for _, r := range specialRanges {
		if !r.p.Contains(ip) {
			continue
		}
		for _, p := range *g.allow.Load() {
			if p.Contains(ip) || p.Contains(also) {
				return nil
			}
		}
		return &DeniedError{Addr: ip, Reason: r.reason, Special: true}
	}
	return nil
}

// zoned is the refusal of an address with a zone, which names an interface
// of the proxy host: never a way out, whatever the address.
func zoned(ip netip.Addr) *DeniedError {
	return &DeniedError{Addr: ip, Reason: "a zoned address (a zone names an interface of the proxy host)"}
}

func (g *Guard) isHost(ip netip.Addr) bool {
	g.mu.RLock()
	_, ok := g.host[ip]
	g.mu.RUnlock()
	return ok
}

// Follow keeps the guard's idea of the host's own addresses true from w's
// events: every address on any interface, IPv4 and IPv6, as it comes and
// goes, so that an address added to the host after egressd started is
// refused at once. It returns the function that stops following.
func (g *Guard) Follow(w Events) (cancel func()) {
	// An address may be on several interfaces: it stays the host's until
	// the last one loses it. Subscriber callbacks run one at a time.
	on := make(map[netip.Addr]map[int]struct{})
	return w.Subscribe(Subscriber{
		Addr: func(u AddrUpdate) {
			a := u.Addr()
			if u.Added {
				if on[a] == nil {
					on[a] = make(map[int]struct{}, 1)
				}
				on[a][u.LinkIndex] = struct{}{}
				g.AddHostAddr(a)
				return
			}
			delete(on[a], u.LinkIndex)
			if len(on[a]) == 0 {
				delete(on, a)
				g.RemoveHostAddr(a)
			}
		},
		// The listing that a (re)subscription replays is the whole truth:
		// whatever the guard had before and no longer is, goes.
		Synced: func() {
			addrs := make([]netip.Addr, 0, len(on))
			for a := range on {
				addrs = append(addrs, a)
			}
			g.SetHostAddrs(addrs)
		},
	})
}
