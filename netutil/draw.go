package netutil

import (
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
)

// RandomAddr returns an address drawn uniformly at random from the host bits
// of p, using the runtime's per-thread ChaCha8 generator: the sequence cannot
// be predicted by an upstream that sees some of the addresses. It never
// returns the prefix's all-zero address (the subnet-router anycast address of
// RFC 4291) nor, for prefixes of /64 or wider, one of the 128 subnet anycast
// addresses that RFC 2526 reserves at the top of every /64.
//
// p must be an IPv6 prefix with at least one host bit; RandomAddr does not
// allocate.
func RandomAddr(p netip.Prefix) netip.Addr {
	base := p.Masked().Addr().As16()
	hi := binary.BigEndian.Uint64(base[:8])
	lo := binary.BigEndian.Uint64(base[8:])
	maskHi, maskLo := hostMask(p.Bits())
	for {
		h := hi | rand.Uint64()&maskHi
		l := lo | rand.Uint64()&maskLo
		if h == hi && l == lo {
			continue // the subnet-router anycast address
		}
		if isSubnetAnycastID(l) {
			continue
		}
		var b [16]byte
		binary.BigEndian.PutUint64(b[:8], h)
		binary.BigEndian.PutUint64(b[8:], l)
		return netip.AddrFrom16(b)
	}
}

// hostMask returns the host part of a prefix of the given length as two
// 64-bit halves.
func hostMask(bits int) (hi, lo uint64) {
	switch {
	case bits <= 0:
		return ^uint64(0), ^uint64(0)
	case bits < 64:
		return ^uint64(0) >> bits, ^uint64(0)
	case bits < 128:
		return 0, ^uint64(0) >> (bits - 64)
	default:
		return 0, 0
	}
}

// isSubnetAnycastID reports whether the interface identifier id is one of the
// reserved subnet anycast identifiers of RFC 2526 (fdff:ffff:ffff:ff80 to
// fdff:ffff:ffff:ffff for EUI-64 style identifiers).
func isSubnetAnycastID(id uint64) bool {
	return id >= 0xfdffffffffffff80 && id <= 0xfdffffffffffffff
}

// HasDrawable reports whether RandomAddr can draw from p: p is an IPv6 prefix
// of at most /127 that is not wholly inside the reserved anycast range.
func HasDrawable(p netip.Prefix) bool {
	if !p.IsValid() || !p.Addr().Is6() || p.Addr().Is4In6() || p.Bits() > 127 {
		return false
	}
	if p.Bits() < 121 {
		return true
	}
	b := p.Masked().Addr().As16()
	return !isSubnetAnycastID(binary.BigEndian.Uint64(b[8:]))
}
