package test

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/proxy/stats"
	"github.com/egressd/egressd/test/nstest"
)

// routed56 is a /56 that R routes to H, as a provider routes a /56 to a
// server: 256 /64s, nothing of it configured on H's link.
var routed56 = netip.MustParsePrefix("2001:db8:56:ff00::/56")

// slash64 is the /64 of a.
func slash64(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, 64).Masked() }

// curlMany GETs url n times with one curl run through the proxy (one
// keep-alive connection to it), each with its own query, and returns the
// addresses the upstream echoed, in order.
func curlMany(t *testing.T, e *env, url string, n int) []netip.Addr {
	t.Helper()
	args := []string{"-q", "-sS", "--max-time", "120", "-x", "http://" + proxyAddr}
	for i := range n {
		args = append(args, fmt.Sprintf("%s?i=%d", url, i))
	}
	got := parseBodies(t, e.tp.Host.Run(t, "curl", args...))
	require.Len(t, got, n)
	return got
}

// TestRoutedSlash56: a /56 routed to the host (and a /64 beside it) is used
// as its /64s: 256 requests leave from 256 distinct addresses over at least
// 200 /64s, each prefix has its local route while egressd runs and none
// after, egressctl stats counts the connections per /64, and a client
// cannot reach an address of the prefixes through the proxy.
func TestRoutedSlash56(t *testing.T) {
	t.Parallel()
	e := setup(t)
	ctl := binary(t, "./cmd/egressctl")
	routeToHost(t, e.tp) // routedPrefix, the /64
	e.tp.Router.Run(t, "ip", "-6", "route", "add", routed56.String(), "via", nstest.HostAddr.String(), "dev", e.tp.RouterLink)
	local := func() string {
		return e.tp.Host.Run(t, "ip", "-6", "route", "show", "table", "local", "proto", "71")
	}

	e.ed = e.tp.StartEgressd(t, e.bin, "-listen", proxyAddr, "-interface", e.tp.HostLink, "-mode", "routed",
		"-prefix", routed56.String(), "-prefix", routedPrefix.String())
	e.ed.WaitListening(t, 1)
	routes := local()
	assert.Contains(t, routes, "local "+routed56.String()+" dev lo")
	assert.Contains(t, routes, "local "+routedPrefix.String()+" dev lo")

	const n = 256
	got := curlMany(t, e, e.up.HTTPURL, n)
	assert.Equal(t, e.up.Peers(), got, "the bodies echo the upstream's peers")
	addrs := map[netip.Addr]bool{}
	per64 := map[netip.Prefix]int{}
	for i, a := range got {
		require.True(t, routed56.Contains(a) || routedPrefix.Contains(a), "request %d left from %s", i, a)
		addrs[a] = true
		per64[slash64(a)]++
		if i > 0 {
			assert.NotEqual(t, slash64(got[i-1]), slash64(a), "requests %d and %d from one /64", i-1, i)
		}
	}
	most := 0
	for _, c := range per64 {
		most = max(most, c)
	}
	t.Logf("%d requests: %d distinct addresses, %d distinct /64s of 257, at most %d from one /64", n, len(addrs), len(per64), most)
	assert.Len(t, addrs, n, "distinct addresses")
	assert.GreaterOrEqual(t, len(per64), 200, "distinct /64s")

	// egressctl counts the connections per /64: every one of them, and
	// the same /64s the upstream saw.
	s := e.tp.Host.CtlStats(t, ctl, e.ed.Admin)
	var sum uint64
	seen := map[netip.Prefix]uint64{}
	for _, sn := range s.Addresses.Subnets {
		require.NotEqual(t, stats.OtherSubnet, sn.Subnet, "257 /64s fit the table of 256 only if all were used, and here fewer were")
		sum += sn.Conns
		seen[netip.MustParsePrefix(sn.Subnet)] = sn.Conns
	}
	assert.EqualValues(t, n, sum, "connections counted per /64")
	for p, c := range per64 {
		assert.EqualValues(t, c, seen[p], "%s", p)
	}
	table := e.tp.Host.Run(t, ctl, "-admin", e.ed.Admin, "stats")
	assert.Contains(t, table, fmt.Sprintf("\nsubnets: %d /64s, ", len(per64)))

	// The prefixes are the host's own in routed mode: never a destination.
	code, _, err := e.tp.Host.CurlStatus("-x", "http://"+proxyAddr, "http://[2001:db8:56:ff42::7]/")
	require.NoError(t, err)
	assert.Equal(t, "403", code, "a destination inside the /56")

	require.NoError(t, e.ed.Signal(syscall.SIGTERM))
	assert.Equal(t, 0, e.ed.Wait(t))
	assert.Empty(t, strings.TrimSpace(local()), "the local routes are gone after exit")
}

// second64 is a second /64 on the link between H and R: H has 2001:db8:1:3::2,
// R 2001:db8:1:3::1, so R resolves addresses of it by neighbour discovery.
var second64 = netip.MustParsePrefix("2001:db8:1:3::/64")

// TestOnLinkTwoPrefixes: two on-link /64s; consecutive requests alternate
// between them, half from each, every one from a new address.
func TestOnLinkTwoPrefixes(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.tp.Host.Run(t, "ip", "addr", "add", "2001:db8:1:3::2/64", "dev", e.tp.HostLink, "nodad")
	e.tp.Router.Run(t, "ip", "addr", "add", "2001:db8:1:3::1/64", "dev", e.tp.RouterLink, "nodad")
	e.restart(t, "-prefix", nstest.Prefix.String(), "-prefix", second64.String())

	const n = 40
	got := curlMany(t, e, e.up.HTTPURL, n)
	assert.Equal(t, e.up.Peers(), got)
	per64 := map[netip.Prefix]int{}
	addrs := map[netip.Addr]bool{}
	for i, a := range got {
		require.True(t, nstest.Prefix.Contains(a) || second64.Contains(a), "request %d left from %s", i, a)
		per64[slash64(a)]++
		addrs[a] = true
		if i > 0 {
			assert.NotEqual(t, slash64(got[i-1]), slash64(a), "requests %d and %d from one /64", i-1, i)
		}
	}
	t.Logf("%d requests: %v", n, per64)
	assert.Equal(t, map[netip.Prefix]int{nstest.Prefix: n / 2, second64: n / 2}, per64)
	assert.Len(t, addrs, n, "every request from a new address")
}

// TestOnLinkPrefixNotOnInterface: on-link, every prefix must be on the
// interface; one that is not stops egressd with one line naming it and the
// interface, exit status 1, and nothing on the host changed.
func TestOnLinkPrefixNotOnInterface(t *testing.T) {
	t.Parallel()
	bin := binary(t, "./cmd/egressd")
	tp := nstest.New(t)
	show := func() string {
		return tp.Host.Run(t, "ip", "-6", "addr", "show") + tp.Host.Run(t, "ip", "-6", "route", "show", "table", "all")
	}
	before := show()

	p := tp.Host.Start(t, nil, bin, "-interface", tp.HostLink, "-prefix", nstest.Prefix.String(), "-prefix", "2001:db8:9:9::/64",
		"-admin", filepath.Join(t.TempDir(), "admin.sock"))
	assert.Equal(t, 1, p.Wait(t), "exit status")
	lines := slices.Collect(strings.Lines(p.Stderr()))
	require.Len(t, lines, 1, "stderr should be one line:\n%s", p.Stderr())
	assert.Equal(t, "egressd: prefix 2001:db8:9:9::/64 is not on interface "+tp.HostLink+
		": no address or on-link route of it is there (if it is routed to this host, use -mode routed)\n", lines[0])
	assert.Equal(t, before, show(), "addresses and routes of H")
	locks, err := filepath.Glob(filepath.Join(tp.RuntimeDir, "*", "*.lock"))
	require.NoError(t, err)
	assert.Empty(t, locks, "no lock file left")

	// A /48 typed where one /64 of it is on the link: one line naming the
	// /64, not a start that draws from /64s the router never delivers.
	p = tp.Host.Start(t, nil, bin, "-interface", tp.HostLink, "-prefix", "2001:db8:1::/48",
		"-admin", filepath.Join(t.TempDir(), "admin.sock"))
	assert.Equal(t, 1, p.Wait(t), "exit status")
	assert.Equal(t, "egressd: prefix 2001:db8:1::/48 is not on interface "+tp.HostLink+": only "+nstest.Prefix.String()+
		" of it is (give that as -prefix; if all of 2001:db8:1::/48 is routed to this host, use -mode routed)\n", p.Stderr())
	assert.Equal(t, before, show(), "addresses and routes of H")

	// Overlapping prefixes: one line too.
	p = tp.Host.Start(t, nil, bin, "-interface", tp.HostLink, "-prefix", nstest.Prefix.String(), "-prefix", "2001:db8:1:2:8000::/65")
	assert.Equal(t, 1, p.Wait(t), "exit status")
	assert.Equal(t, "egressd: prefix 2001:db8:1:2:8000::/65 overlaps prefix 2001:db8:1:2::/64: give each range of addresses once\n", p.Stderr())
	assert.Equal(t, before, show(), "addresses and routes of H")

	// An on-link route of it (no address) is enough.
	tp.Host.Run(t, "ip", "-6", "route", "add", "2001:db8:9:9::/64", "dev", tp.HostLink)
	ed := tp.StartEgressd(t, bin, "-listen", proxyAddr, "-interface", tp.HostLink, "-prefix", nstest.Prefix.String(), "-prefix", "2001:db8:9:9::/64")
	ed.WaitListening(t, 1)
	require.NoError(t, ed.Signal(syscall.SIGTERM))
	assert.Equal(t, 0, ed.Wait(t))
}
