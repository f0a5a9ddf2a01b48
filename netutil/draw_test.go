package netutil

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRandomAddr(t *testing.T) {
	tests := []struct {
		name   string
		prefix string
		draws  int
	}{
		{"slash64", "2001:db8:1:2::/64", 1000},
		{"slash80 of a /64", "2001:db8:1:2:3::/80", 1000},
		{"slash48", "2001:db8:1::/48", 1000},
		{"unmasked input", "2001:db8:1:2::99/64", 100},
		{"slash120", "fd00::/120", 1000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := netip.MustParsePrefix(tt.prefix)
			seen := make(map[netip.Addr]bool)
			for range tt.draws {
				a := RandomAddr(p)
				require.True(t, p.Contains(a), "%s outside %s", a, p)
				require.NotEqual(t, p.Masked().Addr(), a, "drew the subnet-router anycast address")
				seen[a] = true
			}
			// A /120 has 255 candidates; the wider ones should not repeat.
			if p.Bits() <= 64 {
				assert.Len(t, seen, tt.draws)
			}
		})
	}
}

func TestRandomAddrCoversSmallPrefix(t *testing.T) {
	// ::/126 has four addresses; the all-zero one must never come out and
	// the other three all must.
	p := netip.MustParsePrefix("2001:db8::/126")
	seen := make(map[netip.Addr]int)
	for range 3000 {
		seen[RandomAddr(p)]++
	}
	assert.Len(t, seen, 3)
	assert.Zero(t, seen[netip.MustParseAddr("2001:db8::")])
	for a, n := range seen {
		assert.Greater(t, n, 500, "%s drawn only %d times in 3000", a, n)
	}
}

func TestRandomAddrSkipsSubnetAnycast(t *testing.T) {
	// The RFC 2526 range is fdff:ffff:ffff:ff80/121 of every /64; draw from
	// the /120 made of it and its neighbour to see it never comes out.
	p := netip.MustParsePrefix("2001:db8:0:1:fdff:ffff:ffff:ff00/120")
	for range 2000 {
		a := RandomAddr(p)
		id := a.As16()
		assert.Less(t, id[15], byte(0x80), "%s is a reserved subnet anycast address", a)
	}
	assert.False(t, isSubnetAnycastID(0xfdffffffffffff7f))
	assert.True(t, isSubnetAnycastID(0xfdffffffffffff80))
	assert.True(t, isSubnetAnycastID(0xfdffffffffffffff))
}

func TestHasDrawable(t *testing.T) {
	tests := []struct {
		prefix string
		want   bool
	}{
		{"2001:db8::/64", true},
		{"2001:db8::/127", true},
		{"2001:db8::/128", false},
		{"192.0.2.0/24", false},
		{"::ffff:192.0.2.0/120", false},
		{"2001:db8:0:1:fdff:ffff:ffff:ff00/120", true},
		{"2001:db8:0:1:fdff:ffff:ffff:ff80/121", false},
		{"2001:db8:0:1:fdff:ffff:ffff:ffc0/122", false},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, HasDrawable(netip.MustParsePrefix(tt.prefix)), tt.prefix)
	}
}

func TestHostMask(t *testing.T) {
	tests := []struct {
		bits   int
		hi, lo uint64
	}{
		{0, ^uint64(0), ^uint64(0)},
		{48, 0xffff, ^uint64(0)},
		{64, 0, ^uint64(0)},
		{80, 0, 0xffffffffffff},
		{127, 0, 1},
		{128, 0, 0},
	}
	for _, tt := range tests {
		hi, lo := hostMask(tt.bits)
		assert.Equal(t, tt.hi, hi, "bits %d", tt.bits)
		assert.Equal(t, tt.lo, lo, "bits %d", tt.bits)
	}
}

func BenchmarkRandomAddr(b *testing.B) {
	p := netip.MustParsePrefix("2001:db8:1:2::/64")
	b.ReportAllocs()
	var a netip.Addr
	for b.Loop() {
		a = RandomAddr(p)
	}
	_ = a
}
