package kernel

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

var routedPrefix = netip.MustParsePrefix("2001:db8:5:5::/64")

func localRoutes(t *testing.T, h *netlink.Handle, prefix netip.Prefix) []netlink.Route {
	t.Helper()
	routes, err := h.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Table: unix.RT_TABLE_LOCAL}, netlink.RT_FILTER_TABLE)
	require.NoError(t, err)
	var out []netlink.Route
	for _, r := range routes {
		if routePrefix(r) == prefix {
			out = append(out, r)
		}
	}
	return out
}

func TestLocalRoute(t *testing.T) {
	h, mgr := newTestLink(t)
	lo, err := h.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, h.LinkSetUp(lo))

	r, err := InstallLocalRoute(h, routedPrefix)
	require.NoError(t, err)
	assert.True(t, r.Ours())
	got := localRoutes(t, h, routedPrefix)
	require.Len(t, got, 1)
	assert.Equal(t, unix.RTN_LOCAL, got[0].Type)
	assert.Equal(t, lo.Attrs().Index, got[0].LinkIndex)
	assert.Equal(t, netlink.RouteProtocol(RouteProtocol), got[0].Protocol)

	// A second install (a restart after a kill) takes the route over.
	r2, err := InstallLocalRoute(h, routedPrefix)
	require.NoError(t, err)
	assert.True(t, r2.Ours())
	assert.Len(t, localRoutes(t, h, routedPrefix), 1)

	before, err := mgr.Addrs()
	require.NoError(t, err)
	require.NoError(t, r2.Remove())
	assert.Empty(t, localRoutes(t, h, routedPrefix))
	require.NoError(t, r.Remove(), "removing a route already gone is not an error")
	after, err := mgr.Addrs()
	require.NoError(t, err)
	assert.Equal(t, before, after, "routed mode adds no address")
}

func TestLocalRouteOfSomebodyElse(t *testing.T) {
	h, _ := newTestLink(t)
	lo, err := h.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, h.LinkSetUp(lo))
	theirs := localRoute(lo, routedPrefix)
	theirs.Protocol = unix.RTPROT_STATIC
	require.NoError(t, h.RouteAdd(&theirs))

	r, err := InstallLocalRoute(h, routedPrefix)
	require.NoError(t, err)
	assert.False(t, r.Ours())
	require.NoError(t, r.Remove())
	got := localRoutes(t, h, routedPrefix)
	require.Len(t, got, 1, "a route egressd did not make stays")
	assert.Equal(t, netlink.RouteProtocol(unix.RTPROT_STATIC), got[0].Protocol)
}

func TestCheckRoutedPrefix(t *testing.T) {
	h, mgr := newTestLink(t)
	ifindex := mgr.Link().Attrs().Index
	require.NoError(t, CheckRoutedPrefix(h, routedPrefix, ifindex))
	require.NoError(t, CheckRoutedPrefix(h, netip.MustParsePrefix("2001:db8:1:2:1::/80"), ifindex),
		"overlapping the egress interface's own on-link route is fine")

	// A container bridge holding a /80 of the prefix: the whole /64 would
	// capture it, a /80 beside it would not.
	peer, err := h.LinkByName("eg1")
	require.NoError(t, err)
	bridge := netip.MustParsePrefix("2001:db8:5:5:1::/80")
	require.NoError(t, h.RouteAdd(&netlink.Route{LinkIndex: peer.Attrs().Index, Dst: ipNet(bridge)}))
	err = CheckRoutedPrefix(h, routedPrefix, ifindex)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "2001:db8:5:5:1::/80 dev eg1")
	require.NoError(t, CheckRoutedPrefix(h, netip.MustParsePrefix("2001:db8:5:5:2::/80"), ifindex))

	// The gateway of the default route (2001:db8:1:2::1) inside the prefix.
	err = CheckRoutedPrefix(h, netip.MustParsePrefix("2001:db8:1:2::/120"), ifindex)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "default gateway 2001:db8:1:2::1")
}

func TestHostAddrs(t *testing.T) {
	h, _ := newTestLink(t)
	addrs, err := HostAddrs(h)
	require.NoError(t, err)
	assert.Contains(t, addrs, hostAddr.Addr())
}
