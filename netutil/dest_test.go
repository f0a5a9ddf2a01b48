package netutil

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestGuard(t *testing.T) {
	egress := netip.MustParsePrefix("2001:db8:1:2::/64")
	g := NewGuard([]netip.Prefix{egress}, nil)
	g.SetHostAddrs([]netip.Addr{netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("2001:db8:64::2")})

	for _, tt := range []struct {
		addr    string
		reason  string // "" when admitted
		special bool
	}{
		{"2001:db8:ffff::1", "", false},
		{"192.0.2.1", "", false},
		{"8.8.8.8", "", false},
		{"2a00:1450:4001::1", "", false},
		{"127.0.0.1", "loopback", false},
		{"127.255.0.7", "loopback", false},
		{"::1", "loopback", false},
		{"::ffff:127.0.0.1", "loopback", false},
		{"0.0.0.0", "unspecified", false},
		{"0.1.2.3", "unspecified", false},
		{"::", "unspecified", false},
		{"169.254.169.254", "link-local", false},
		{"fe80::1", "link-local", false},
		{"fe80::1%eth0", "zoned", false},
		{"::1%lo", "zoned", false},
		{"::%lo", "zoned", false},
		{"::%0", "zoned", false},
		{"2001:db8:ffff::1%lo", "zoned", false},
		{"224.0.0.1", "multicast", false},
		{"ff02::1", "multicast", false},
		{"255.255.255.255", "broadcast", false},
		{"192.0.2.2", "proxy host", false},
		{"::ffff:192.0.2.2", "proxy host", false},
		{"2001:db8:64::2", "proxy host", false},
		{"2001:db8:1:2::2", "egress prefix", false},
		{"2001:db8:1:2:abcd::1", "egress prefix", false},
		{"10.0.0.1", "RFC 1918", true},
		{"172.16.5.4", "RFC 1918", true},
		{"172.32.0.1", "", false},
		{"192.168.1.1", "RFC 1918", true},
		{"::ffff:10.0.0.1", "RFC 1918", true},
		{"100.64.0.1", "RFC 6598", true},
		{"fd00::1", "RFC 4193", true},
		{"fc00::1", "RFC 4193", true},
		{"240.0.0.1", "reserved", true},
		{"::7f00:1", "IPv4-compatible", true},
		{"64:ff9b::7f00:1", "NAT64 (RFC 6052) form of 127.0.0.1, loopback", false},
		{"64:ff9b::a00:1", "NAT64 (RFC 6052) form of 10.0.0.1, a private network", true},
		{"64:ff9b::c000:202", "NAT64 (RFC 6052) form of 192.0.2.2, an address of the proxy host", false},
		{"64:ff9b::808:808", "", false},
		{"2002:7f00:1::1", "6to4 (RFC 3056) form of 127.0.0.1", false},
		{"2002:a00:1::1", "6to4 (RFC 3056) form of 10.0.0.1", true},
		{"2002:808:808::1", "", false},
		{"64:ff9b:1::1", "local-use NAT64", true},
	} {
		t.Run(tt.addr, func(t *testing.T) {
			err := g.Check(netip.MustParseAddr(tt.addr))
			if tt.reason == "" {
				assert.NoError(t, err)
				return
			}
			var de *DeniedError
			require.ErrorAs(t, err, &de)
			assert.ErrorIs(t, err, ErrDenied)
			assert.Contains(t, de.Reason, tt.reason)
			assert.Equal(t, tt.special, de.Special, "special: %v", err)
			if tt.special {
				assert.Contains(t, err.Error(), "-allow-dest re-admits it")
			}
		})
	}
}

// TestGuardAllow: the allow list re-admits special ranges, in either
// spelling of the address, but never what is always refused.
func TestGuardAllow(t *testing.T) {
	g := NewGuard([]netip.Prefix{netip.MustParsePrefix("2001:db8:1:2::/64")}, []netip.Prefix{
		netip.MustParsePrefix("10.0.5.0/24"),
		netip.MustParsePrefix("::ffff:172.16.0.0/108"),
		netip.MustParsePrefix("fd00:1::/32"),
		netip.MustParsePrefix("127.0.0.0/8"),          // never admitted
		netip.MustParsePrefix("2001:db8:1:2::/64"),    // nor is the egress prefix
		netip.MustParsePrefix("64:ff9b::a00:600/120"), // a NAT64 range
	})
	g.SetHostAddrs([]netip.Addr{netip.MustParseAddr("10.0.5.1")})
	for addr, ok := range map[string]bool{
		"10.0.5.7":          true,
		"::ffff:10.0.5.7":   true,
		"10.0.6.7":          false,
		"172.16.9.9":        true,
		"fd00:1::5":         true,
		"fd00:2::5":         false,
		"64:ff9b::a00:507":  true, // NAT64 of 10.0.5.7
		"64:ff9b::a00:607":  true, // in the NAT64 range allowed
		"64:ff9b::a00:707":  false,
		"127.0.0.1":         false,
		"2001:db8:1:2::5":   false,
		"10.0.5.1":          false, // the host's own, though inside an allowed range
		"64:ff9b::a00:501":  false,
		"64:ff9b::7f00:1":   false,
		"169.254.169.254":   false,
		"fe80::1":           false,
		"2001:db8:ffff::10": true,
	} {
		err := g.Check(netip.MustParseAddr(addr))
		if ok {
			assert.NoError(t, err, addr)
		} else {
			assert.ErrorIs(t, err, ErrDenied, addr)
		}
	}

	// Host addresses come and go.
	a := netip.MustParseAddr("2001:db8:99::1")
	require.NoError(t, g.Check(a))
	g.AddHostAddr(a)
	require.ErrorIs(t, g.Check(a), ErrDenied)
	g.RemoveHostAddr(a)
	require.NoError(t, g.Check(a))
	g.SetAllow(nil)
	require.ErrorIs(t, g.Check(netip.MustParseAddr("10.0.5.7")), ErrDenied)
}

func BenchmarkGuardCheck(b *testing.B) {
	g := NewGuard([]netip.Prefix{netip.MustParsePrefix("2001:db8:1:2::/64")}, []netip.Prefix{netip.MustParsePrefix("10.0.5.0/24")})
	g.SetHostAddrs([]netip.Addr{netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("2001:db8:1:2::2")})
	ip := netip.MustParseAddr("2a00:1450:4001:80b::200e")
	b.ReportAllocs()
	for b.Loop() {
		if g.Check(ip) != nil {
			b.Fatal("denied")
		}
	}
}
