package netutil

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"sync"
)

// DefaultMaxSubnets is how many /64s a pool counts connections of one by
// one: all of a /56's, and of a /48's (65,536) the 256 used last.
const DefaultMaxSubnets = 256

// SubnetStats counts the upstream connections from one /64 of the egress
// prefixes, or (Subnet the zero Prefix) from the /64s past the table's
// bound taken together.
type SubnetStats struct {
	Subnet netip.Prefix
	// Conns counts the connections made from the /64 since it entered the
	// table; Open those open now.
	Conns uint64
	Open  int
}

// subnetEntry is the count of one /64, or of the others.
type subnetEntry struct {
	hi    uint64 // the /64's upper 64 bits
	conns uint64
	open  int
	used  uint64 // the table's tick when a connection last opened
}

// subnetTable counts connections per /64 for at most max /64s: those with
// connections open, and then those used last. A /64 that comes when the
// table is full takes the place of the one unused the longest that has no
// connection open, whose count goes to the others; when every one has
// connections open, the new connection is counted among the others. So the
// sum of every count and the others' is every connection made, and the
// memory and the series of /metrics stay bounded however many /64s the
// prefixes hold.
type subnetTable struct {
	max int

	mu     sync.Mutex
	byHi   map[uint64]*subnetEntry
	others subnetEntry
	tick   uint64
}

func newSubnetTable(max int) *subnetTable {
	return &subnetTable{max: max, byHi: make(map[uint64]*subnetEntry)}
}

// opened counts a connection from a and returns the entry to give to
// closed when it closes.
func (t *subnetTable) opened(a netip.Addr) *subnetEntry {
	hi := upper64(a)
	t.mu.Lock()
	defer t.mu.Unlock()
	t.tick++
	e, ok := t.byHi[hi]
	if !ok {
		e = t.makeRoomLocked()
		if e == nil {
			e = &t.others
		} else {
			e.hi = hi
			t.byHi[hi] = e
		}
	}
	e.conns++
	e.open++
	e.used = t.tick
	return e
}

// makeRoomLocked returns a new entry, after evicting the entry unused the
// longest with no connection open if the table is full; nil if every entry
// has connections open.
func (t *subnetTable) makeRoomLocked() *subnetEntry {
	if len(t.byHi) < t.max {
		return &subnetEntry{}
	}
	var victim *subnetEntry
	for _, e := range t.byHi {
		if e.open == 0 && (victim == nil || e.used < victim.used) {
			victim = e
		}
	}
	if victim == nil {
		return nil
	}
	delete(t.byHi, victim.hi)
	t.others.conns += victim.conns
	*victim = subnetEntry{}
	return victim
}

// closed counts the close of a connection that opened returned e for.
func (t *subnetTable) closed(e *subnetEntry) {
	t.mu.Lock()
	e.open--
	t.mu.Unlock()
}

// snapshot lists the counted /64s in address order, and the others.
func (t *subnetTable) snapshot() (list []SubnetStats, others SubnetStats) {
	t.mu.Lock()
	defer t.mu.Unlock()
	list = make([]SubnetStats, 0, len(t.byHi))
	for _, e := range t.byHi {
		var b [16]byte
		binary.BigEndian.PutUint64(b[:8], e.hi)
		list = append(list, SubnetStats{Subnet: netip.PrefixFrom(netip.AddrFrom16(b), 64), Conns: e.conns, Open: e.open})
	}
	slices.SortFunc(list, func(a, b SubnetStats) int { return a.Subnet.Addr().Compare(b.Subnet.Addr()) })
	return list, SubnetStats{Conns: t.others.conns, Open: t.others.open}
}
