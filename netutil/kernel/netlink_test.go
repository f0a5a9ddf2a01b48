package kernel

import (
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/egressd/egressd/internal/nettest"
	"github.com/egressd/egressd/netutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

var (
	hostAddr = nettest.HostAddr
	prefix64 = nettest.Prefix64
)

// nstestGuard bounds what a test waits for; a failure guard, not a timing
// assertion.
const nstestGuard = nettest.Guard

var quiet = slog.New(slog.DiscardHandler)

// newTestLink makes an unnamed network namespace holding a veth pair whose
// end "eg0" is up with the host address 2001:db8:1:2::2/64 and a default
// route via 2001:db8:1:2::1 (nettest.New), and returns a netlink handle
// inside it and a manager of eg0.
func newTestLink(t testing.TB) (*netlink.Handle, *Netlink) {
	t.Helper()
	_, h, mgr := newTestNetns(t)
	return h, mgr
}

// newTestNetns is newTestLink that also returns the namespace, for sockets
// and subscriptions inside it (see nettest.In).
func newTestNetns(t testing.TB) (netns.NsHandle, *netlink.Handle, *Netlink) {
	t.Helper()
	ns, h := nettest.New(t)
	mgr, err := NewNetlink(h, "eg0")
	require.NoError(t, err)
	return ns, h, mgr
}

var ipNet = nettest.IPNet

func find(t *testing.T, mgr *Netlink, a netip.Addr) (IfAddr, bool) {
	t.Helper()
	addrs, err := mgr.Addrs()
	require.NoError(t, err)
	for _, x := range addrs {
		if x.Addr() == a {
			return x, true
		}
	}
	return IfAddr{}, false
}

func TestNetlinkAddRefreshRemove(t *testing.T) {
	_, mgr := newTestLink(t)
	a := netip.MustParseAddr("2001:db8:1:2::abcd")

	require.NoError(t, mgr.Add(a, time.Minute))
	got, ok := find(t, mgr, a)
	require.True(t, ok)
	assert.Equal(t, 128, got.Prefix.Bits())
	assert.Equal(t, unix.IFA_F_NODAD, got.Flags&unix.IFA_F_NODAD)
	assert.Equal(t, unix.IFA_F_NOPREFIXROUTE, got.Flags&unix.IFA_F_NOPREFIXROUTE)
	assert.Equal(t, unix.IFA_F_DEPRECATED, got.Flags&unix.IFA_F_DEPRECATED)
	assert.Zero(t, got.Flags&unix.IFA_F_TENTATIVE, "usable at once")
	assert.Zero(t, got.PreferredLft)
	assert.LessOrEqual(t, got.ValidLft, uint32(60))
	assert.True(t, IsLeftover(got, prefix64))

	err := mgr.Add(a, time.Minute)
	require.ErrorIs(t, err, fs.ErrExist, "adding twice says it exists")

	require.NoError(t, mgr.Refresh(a, time.Hour))
	got, _ = find(t, mgr, a)
	assert.Greater(t, got.ValidLft, uint32(60))
	assert.Zero(t, got.PreferredLft, "a refresh keeps it deprecated")

	require.NoError(t, mgr.Remove(a))
	_, ok = find(t, mgr, a)
	assert.False(t, ok)
	require.NoError(t, mgr.Remove(a), "removing what is gone is not an error")
}

func TestNetlinkDefaultSourceUnchanged(t *testing.T) {
	h, mgr := newTestLink(t)
	dst := net.ParseIP("2001:db8:ffff::1")
	before, err := h.RouteGet(dst)
	require.NoError(t, err)
	require.Len(t, before, 1)
	require.Equal(t, hostAddr.Addr().String(), before[0].Src.String())

	for range 20 {
		require.NoError(t, mgr.Add(netutil.RandomAddr(prefix64), time.Minute))
	}
	after, err := h.RouteGet(dst)
	require.NoError(t, err)
	assert.Equal(t, hostAddr.Addr().String(), after[0].Src.String(),
		"deprecated egress addresses never become the default source")
}

func TestRemoveLeftovers(t *testing.T) {
	h, mgr := newTestLink(t)
	link := mgr.Link()
	ours := []netip.Addr{netip.MustParseAddr("2001:db8:1:2::a1"), netip.MustParseAddr("2001:db8:1:2::a2")}
	pinned := netip.MustParseAddr("2001:db8:1:2::a3")
	for _, a := range append(ours, pinned) {
		require.NoError(t, mgr.Add(a, time.Minute))
	}
	// Addresses that are not egressd's, though close to it.
	other := map[string]*netlink.Addr{
		"preferred /128": {IPNet: ipNet(netip.MustParsePrefix("2001:db8:1:2::b1/128")), Flags: unix.IFA_F_NODAD | unix.IFA_F_NOPREFIXROUTE},
		"no nodad":       {IPNet: ipNet(netip.MustParsePrefix("2001:db8:1:2::b2/128")), Flags: unix.IFA_F_NOPREFIXROUTE, ValidLft: 60, PreferedLft: 0},
		"other prefix":   {IPNet: ipNet(netip.MustParsePrefix("2001:db8:9::b3/128")), Flags: egressFlags, ValidLft: 60},
		"/64 deprecated": {IPNet: ipNet(netip.MustParsePrefix("2001:db8:1:2::b4/64")), Flags: egressFlags, ValidLft: 60},
	}
	for name, a := range other {
		require.NoError(t, h.AddrAdd(link, a), name)
	}

	n, err := mgr.RemoveLeftovers(prefix64, []netip.Addr{pinned})
	require.NoError(t, err)
	assert.Equal(t, 2, n)
	for _, a := range ours {
		_, ok := find(t, mgr, a)
		assert.False(t, ok, "%s is a leftover", a)
	}
	for _, a := range []netip.Addr{pinned, hostAddr.Addr()} {
		_, ok := find(t, mgr, a)
		assert.True(t, ok, "%s must stay", a)
	}
	for name, a := range other {
		ip, _ := netip.AddrFromSlice(a.IP)
		_, ok := find(t, mgr, ip)
		assert.True(t, ok, "%s (%s) is not ours and must stay", ip, name)
	}
}

func TestDefaults(t *testing.T) {
	h, mgr := newTestLink(t)
	ifname, err := DefaultInterface(h)
	require.NoError(t, err)
	assert.Equal(t, "eg0", ifname)

	require.NoError(t, mgr.Add(netip.MustParseAddr("2001:db8:1:2::1234"), time.Minute))
	addrs, err := mgr.Addrs()
	require.NoError(t, err)
	p, err := DefaultPrefix(addrs)
	require.NoError(t, err)
	assert.Equal(t, prefix64, p)
	assert.True(t, OnInterface(prefix64, addrs))
	assert.True(t, OnInterface(netip.MustParsePrefix("2001:db8:1:2:1::/80"), addrs), "a narrower prefix of the /64")
	assert.False(t, OnInterface(netip.MustParsePrefix("2001:db8:1:3::/64"), addrs))
	// A /48 or /56 that holds the /64 is not on-link for that: its other
	// /64s are not on this link.
	assert.False(t, OnInterface(netip.MustParsePrefix("2001:db8:1::/48"), addrs), "a /48 with one /64 on the link")
	assert.False(t, OnInterface(netip.MustParsePrefix("2001:db8:1:0::/56"), addrs), "a /56 with one /64 on the link")
	// An address added as a /128 stands for its /64.
	one := []IfAddr{{Prefix: netip.MustParsePrefix("2001:db8:7:7::5/128"), PreferredLft: infiniteLifetime, ValidLft: infiniteLifetime}}
	assert.True(t, OnInterface(netip.MustParsePrefix("2001:db8:7:7::/64"), one))
	assert.False(t, OnInterface(netip.MustParsePrefix("2001:db8:7::/56"), one))

	_, err = NewNetlink(h, "nosuch0")
	require.Error(t, err)
}

func TestDefaultsWithoutRoute(t *testing.T) {
	h, mgr := newTestLink(t)
	routes, err := h.RouteList(mgr.Link(), netlink.FAMILY_V6)
	require.NoError(t, err)
	for _, r := range routes {
		if r.Gw != nil {
			require.NoError(t, h.RouteDel(&r))
		}
	}
	_, err = DefaultInterface(h)
	require.ErrorContains(t, err, "no IPv6 default route")
	_, err = DefaultPrefix(nil)
	require.ErrorContains(t, err, "no global IPv6 address")
}

// BenchmarkNetlinkAddRemove times one add and one delete of an egress
// address with 0, 1,000 and 5,000 addresses already on the interface: the
// kernel's cost per connection in on-link mode, and how it grows.
func BenchmarkNetlinkAddRemove(b *testing.B) {
	for _, existing := range []int{0, 1000, 5000} {
		b.Run(fmt.Sprintf("existing=%d", existing), func(b *testing.B) {
			if testing.Short() && existing > 0 {
				b.Skip("filling the interface takes seconds; make bench runs it")
			}
			_, mgr := newTestLink(b)
			for range existing {
				for {
					if err := mgr.Add(netutil.RandomAddr(prefix64), time.Hour); err == nil {
						break
					}
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				a := netutil.RandomAddr(prefix64)
				if err := mgr.Add(a, time.Minute); err != nil {
					b.Fatal(err)
				}
				if err := mgr.Remove(a); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
