package netutil

import (
	"context"
	"errors"
	"net/netip"
	"slices"
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

// FuzzDestination: whatever literal a client sends, the dialer's lookup and
// the guard never admit an address that net/netip itself calls loopback,
// unspecified, link-local, multicast or private, nor a zoned one, the
// host's own, one of the egress prefix, or a NAT64 or 6to4 form of any of
// these; and an IPv4 address and its IPv4-mapped form get the same answer.
func FuzzDestination(f *testing.F) {
	for _, s := range []string{"::1", "::1%lo", "::%lo", "::0%0", "fe80::1%eth0", "127.0.0.1", "::ffff:127.0.0.1",
		"::ffff:192.0.2.2", "64:ff9b::7f00:1", "64:ff9b::a00:1", "2002:7f00:1::1", "10.0.0.1", "0.0.0.0", "::",
		"169.254.169.254", "2001:db8:1:2::5", "2001:db8:ffff::1", "8.8.8.8", "ff02::1", "fd00::1", "::7f00:1"} {
		f.Add(s)
	}
	egress := netip.MustParsePrefix("2001:db8:1:2::/64")
	host := []netip.Addr{netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("2001:db8:64::2")}
	g := NewGuard([]netip.Prefix{egress}, nil)
	g.SetHostAddrs(host)
	d := &Dialer{Guard: g, IPv4: IPv4Direct}
	bad := func(ip netip.Addr) bool {
		return ip.Zone() != "" || ip.IsLoopback() || ip.IsUnspecified() || ip.IsLinkLocalUnicast() ||
			ip.IsMulticast() || ip.IsPrivate() || egress.Contains(ip) || slices.Contains(host, ip)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if _, err := netip.ParseAddr(s); err != nil {
			return // names go to the resolver: not fuzzed here
		}
		ips, _, err := d.lookup(context.Background(), s)
		if err != nil {
			if !errors.Is(err, ErrDenied) {
				t.Fatalf("lookup(%q): %v", s, err)
			}
			return
		}
		admitted, err := d.admit(ips)
		if err != nil && !errors.Is(err, ErrDenied) {
			t.Fatalf("admit(%q): %v", s, err)
		}
		for _, ip := range admitted {
			u := ip.Unmap()
			if bad(u) {
				t.Fatalf("%q admitted as %s", s, ip)
			}
			b := u.As16()
			for _, embedded := range []struct {
				p  netip.Prefix
				v4 netip.Addr
			}{
				{nat64Prefix, netip.AddrFrom4([4]byte(b[12:16]))},
				{sixToFour, netip.AddrFrom4([4]byte(b[2:6]))},
			} {
				if u.Is6() && embedded.p.Contains(u) && bad(embedded.v4) {
					t.Fatalf("%q admitted: its embedded %s is not to be reached", s, embedded.v4)
				}
			}
		}
		if ip, err := netip.ParseAddr(s); err == nil && ip.Is4() {
			mapped := netip.AddrFrom16(ip.As16())
			if (g.Check(ip) == nil) != (g.Check(mapped) == nil) {
				t.Fatalf("%s and %s answered differently", ip, mapped)
			}
		}
	})
}
