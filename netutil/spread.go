package netutil

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sort"
)

// Spread deals out the /64s of a set of egress prefixes so that fresh
// addresses spread evenly over them, and no two consecutive ones share a
// /64 where there are several. A prefix shorter than /64 (a /56, a /48) is
// its /64s; prefixes of /64 or narrower that lie in one /64 are that /64
// together. The /64s are numbered in the order the prefixes were given, and
// handed out in cycles: each cycle is a new random permutation of every
// number, so after k full cycles every /64 was handed out exactly k times,
// and within one no two are alike.
//
// The permutation is a keyed Feistel network over the smallest even number
// of bits that holds every number (numbers past the last are skipped,
// under 4 in 4 on average), with fresh random round keys each cycle: its state
// is a handful of words whatever the number of /64s (a /48 has 65,536, a
// /32 over four thousand million), and nothing is kept per /64. The
// permutation is not a cryptographic one: an upstream that sees many /64s
// in a row learns little about the next, but is not kept from it by
// anything stronger than the round keys being random.
//
// A Spread is not safe for concurrent use; the pool's lock guards it.
type Spread struct {
	slots   []slot // in the order of their numbers
	last    uint64 // the highest number: the count of /64s less one
	half    uint   // bits of each half of the Feistel network
	keys    [feistelRounds]uint64
	pos     uint64 // the next input of the permutation in this cycle
	ended   bool   // pos went past the last input: a new cycle is due
	prev    uint64 // the number handed out last, if any
	hasPrev bool
	pending uint64 // a number held back because it was the /64 to avoid,
	held    int    // this many times
}

// slot is a run of /64s with consecutive numbers: the /64s of one prefix of
// /64 or shorter, or one /64 holding narrower prefixes.
type slot struct {
	first uint64         // its first /64's number
	base  uint64         // the upper 64 bits of its first /64
	bits  uint           // 64 - prefix length for a /64 or shorter; 0 for narrower prefixes
	parts []netip.Prefix // narrower prefixes in one /64: drawn from at random
}

const feistelRounds = 4

// NewSpread returns a Spread over prefixes, which must be IPv6 prefixes
// with an address to draw (HasDrawable) and must not overlap.
func NewSpread(prefixes []netip.Prefix) (*Spread, error) {
	if len(prefixes) == 0 {
		return nil, fmt.Errorf("no prefix to draw from")
	}
	for i, p := range prefixes {
		if !HasDrawable(p) {
			return nil, fmt.Errorf("prefix %s has no address to draw", p)
		}
		for _, q := range prefixes[:i] {
			if p.Overlaps(q) {
				return nil, fmt.Errorf("prefix %s overlaps prefix %s", p, q)
			}
		}
	}
	s := &Spread{}
	var total uint64 // count of /64s less one, once the first is in
	for _, p := range prefixes {
		p = p.Masked()
		hi := upper64(p.Addr())
		var sl slot
		if p.Bits() < 64 {
			sl = slot{base: hi, bits: uint(64 - p.Bits())}
		} else {
			// Narrower prefixes in a /64 already taken share its number.
			if j := slices.IndexFunc(s.slots, func(x slot) bool { return x.parts != nil && x.base == hi }); j >= 0 {
				s.slots[j].parts = append(s.slots[j].parts, p)
				continue
			}
			sl = slot{base: hi, parts: []netip.Prefix{p}}
		}
		// The slot's size less one, 2^bits-1: Go's 1<<64 is 0, so this
		// holds for ::/0 too.
		sizeLess1 := uint64(1)<<sl.bits - 1
		if len(s.slots) == 0 {
			total = sizeLess1
		} else {
			sl.first = total + 1
			total += sizeLess1 + 1 // disjoint prefixes: no more than 2^64 /64s in all
		}
		s.slots = append(s.slots, sl)
	}
	s.last = total
	width := uint(bits.Len64(s.last))
	width += width % 2
	s.half = width / 2
	s.ended = true
	return s, nil
}

// Len64 is the number of /64s less one: 0 when there is only one /64.
func (s *Spread) Len64() uint64 { return s.last }

// Next returns the prefix to draw the next fresh address from: one /64 of a
// shorter prefix, or one of the narrower prefixes in a /64. Its /64 differs
// from that of avoid (the address handed out last), if avoid is valid and
// there are several /64s, and from the one Next returned last.
func (s *Spread) Next(avoid netip.Addr) netip.Prefix {
	if s.last == 0 {
		return s.prefix(0)
	}
	av, hasAvoid := s.number(avoid)
	if s.held > 0 && !(hasAvoid && s.pending == av) {
		s.held--
		return s.emit(s.pending)
	}
	for {
		n := s.step()
		if !hasAvoid || n != av {
			return s.emit(n)
		}
		// The /64 to avoid comes up: keep it for a later call rather
		// than lose its turn. Whatever is held is that same /64: a
		// different avoid gets the held one first.
		s.pending = n
		s.held++
	}
}

func (s *Spread) emit(n uint64) netip.Prefix {
	s.prev, s.hasPrev = n, true
	return s.prefix(n)
}

// step returns the next number of the cycle, starting a new cycle when one
// ends. A new cycle never starts with the number the last one ended with.
func (s *Spread) step() uint64 {
	for {
		if s.ended {
			s.rekey()
		}
		x := s.permute(s.pos)
		s.pos++
		if s.pos == 0 || s.pos>>(2*s.half) != 0 {
			s.ended = true
		}
		if x <= s.last {
			return x
		}
	}
}

// rekey starts a new cycle with new round keys.
func (s *Spread) rekey() {
	for range 16 {
		for i := range s.keys {
			s.keys[i] = rand.Uint64()
		}
		s.pos, s.ended = 0, false
		if !s.hasPrev || s.firstOfCycle() != s.prev {
			return
		}
	}
}

// firstOfCycle is the first number the cycle with the current keys hands
// out.
func (s *Spread) firstOfCycle() uint64 {
	for i := uint64(0); ; i++ {
		if x := s.permute(i); x <= s.last {
			return x
		}
	}
}

// permute is the keyed Feistel permutation of the 2*half-bit numbers.
func (s *Spread) permute(x uint64) uint64 {
	mask := uint64(1)<<s.half - 1
	l, r := x>>s.half&mask, x&mask
	for _, k := range s.keys {
		l, r = r, l^(mix64(r+k)&mask)
	}
	return l<<s.half | r
}

// mix64 is the finaliser of MurmurHash3: every bit of x moves about half of
// the result's.
func mix64(x uint64) uint64 {
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}

// slotOf returns the index of the slot that holds number n.
func (s *Spread) slotOf(n uint64) int {
	return sort.Search(len(s.slots), func(i int) bool { return s.slots[i].first > n }) - 1
}

// prefix is the prefix to draw from for number n.
func (s *Spread) prefix(n uint64) netip.Prefix {
	sl := &s.slots[s.slotOf(n)]
	if sl.parts != nil {
		if len(sl.parts) == 1 {
			return sl.parts[0]
		}
		return sl.parts[rand.IntN(len(sl.parts))]
	}
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], sl.base+(n-sl.first))
	return netip.PrefixFrom(netip.AddrFrom16(b), 64)
}

// number returns the number of a's /64, if a lies in one of the Spread's.
func (s *Spread) number(a netip.Addr) (uint64, bool) {
	if !a.IsValid() || !a.Is6() {
		return 0, false
	}
	hi := upper64(a)
	for _, sl := range s.slots {
		if sl.parts != nil {
			if sl.base == hi {
				return sl.first, true
			}
			continue
		}
		if hi>>sl.bits == sl.base>>sl.bits { // Go's x>>64 is 0: ::/0 holds all
			return sl.first + (hi - sl.base), true
		}
	}
	return 0, false
}

// upper64 is the /64 part of an IPv6 address.
func upper64(a netip.Addr) uint64 {
	b := a.As16()
	return binary.BigEndian.Uint64(b[:8])
}
