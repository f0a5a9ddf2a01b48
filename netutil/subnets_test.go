package netutil

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// addrIn64 is an address of the i-th /64 of 2001:db8:7::/48.
func addrIn64(i int) netip.Addr {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], 0x20010db800070000|uint64(i))
	b[15] = 1
	return netip.AddrFrom16(b)
}

// TestSubnetTableBounded: a /48's worth of /64s is counted in a table of
// its bound; what falls out goes to the others, and the counts always add
// up to every connection made. /64s with connections open are never
// dropped.
func TestSubnetTableBounded(t *testing.T) {
	tab := newSubnetTable(8)
	held := tab.opened(addrIn64(0)) // stays open throughout
	for i := range 1000 {
		tab.closed(tab.opened(addrIn64(1 + i%300)))
	}
	list, others := tab.snapshot()
	require.Len(t, list, 8)
	var sum uint64
	for _, s := range list {
		sum += s.Conns
		assert.Equal(t, 64, s.Subnet.Bits())
	}
	assert.EqualValues(t, 1001, sum+others.Conns, "every connection is counted once")
	assert.Equal(t, netip.MustParsePrefix("2001:db8:7::/64"), list[0].Subnet, "the /64 with an open connection stays")
	assert.Equal(t, 1, list[0].Open)
	// The last seven used are the others kept.
	for i, s := range list[1:] {
		assert.Equal(t, netip.PrefixFrom(addrIn64(1+(993+i)%300), 64).Masked(), s.Subnet)
	}
	tab.closed(held)
	list, _ = tab.snapshot()
	assert.Zero(t, list[0].Open)
}

// TestSubnetTableAllOpen: when every /64 in the table has connections open,
// a new /64's connection is counted, open, among the others.
func TestSubnetTableAllOpen(t *testing.T) {
	tab := newSubnetTable(2)
	tab.opened(addrIn64(1))
	tab.opened(addrIn64(2))
	e := tab.opened(addrIn64(3))
	list, others := tab.snapshot()
	assert.Len(t, list, 2)
	assert.Equal(t, SubnetStats{Conns: 1, Open: 1}, others)
	tab.closed(e)
	_, others = tab.snapshot()
	assert.Equal(t, SubnetStats{Conns: 1, Open: 0}, others)
}
