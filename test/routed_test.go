package test

import (
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

// routedPrefix is routed by R to H's address, as a hosting provider routes
// a /64 to a dedicated server: nothing of it is configured on H's link.
var routedPrefix = netip.MustParsePrefix("2001:db8:5:5::/64")

// routeToHost makes R route routedPrefix to H.
func routeToHost(t *testing.T, tp *nstest.Topo) {
	t.Helper()
	tp.Router.Run(t, "ip", "-6", "route", "add", routedPrefix.String(), "via", nstest.HostAddr.String(), "dev", tp.RouterLink)
}

func localRoutes(t *testing.T, tp *nstest.Topo) string {
	t.Helper()
	return tp.Host.Run(t, "ip", "-6", "route", "show", "table", "local", routedPrefix.String())
}

// TestRoutedMode: with the prefix routed to the host, -mode routed sends
// every request from a distinct address of it, adds no address to the
// interface, and removes its local route on exit; after a SIGKILL the next
// run takes the route over.
func TestRoutedMode(t *testing.T) {
	t.Parallel()
	e := setup(t)
	routeToHost(t, e.tp)
	before, err := e.tp.HostAddrs()
	require.NoError(t, err)

	args := []string{"-mode", "routed", "-prefix", routedPrefix.String()}
	ed := e.tp.StartEgressd(t, e.bin, "-listen", proxyAddr, "-interface", e.tp.HostLink, "-log-level", "debug", args[0], args[1], args[2], args[3])
	ed.WaitListening(t, 1)
	assert.Contains(t, localRoutes(t, e.tp), "proto 71")

	const n = 30
	c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, true)
	for range n {
		code, _, err := c.Fetch(guardCtx(t), e.up.HTTPURL)
		require.NoError(t, err)
		require.Equal(t, http200, code)
	}
	// A keep-alive client would send every HTTPS request through one
	// tunnel (one address): a tunnel per request here.
	tunnels := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
	for range n {
		code, _, err := tunnels.Fetch(guardCtx(t), e.up.HTTPSURL)
		require.NoError(t, err)
		require.Equal(t, http200, code)
	}
	peers := e.up.Peers()
	require.Len(t, peers, 2*n)
	seen := map[netip.Addr]bool{}
	for _, p := range peers {
		assert.True(t, routedPrefix.Contains(p), "%s is not in %s", p, routedPrefix)
		assert.NotEqual(t, routedPrefix.Addr(), p)
		seen[p] = true
	}
	assert.Len(t, seen, 2*n, "every request from its own address")

	after, err := e.tp.HostAddrs()
	require.NoError(t, err)
	assert.Equal(t, len(before), len(after), "routed mode adds no address to the interface")

	// A SIGKILL leaves the route; the next run takes it over and removes
	// it when it stops.
	require.NoError(t, ed.Signal(syscall.SIGKILL))
	ed.Wait(t)
	assert.Contains(t, localRoutes(t, e.tp), "proto 71", "a killed run leaves its route")
	ed = e.tp.StartEgressd(t, e.bin, "-listen", proxyAddr, "-interface", e.tp.HostLink, args[0], args[1], args[2], args[3])
	ed.WaitListening(t, 1)
	code, body, err := c.Fetch(guardCtx(t), e.up.HTTPURL)
	require.NoError(t, err)
	require.Equal(t, http200, code)
	assert.True(t, routedPrefix.Contains(netip.MustParseAddr(strings.TrimSpace(body))))
	require.NoError(t, ed.Signal(syscall.SIGTERM))
	assert.Equal(t, 0, ed.Wait(t))
	assert.Empty(t, strings.TrimSpace(localRoutes(t, e.tp)), "the local route is gone after exit")
}

// TestRoutedModeRefusesOverlap: a prefix that overlaps a route to another
// interface (a container bridge) is refused in one line naming the route,
// and nothing is installed.
func TestRoutedModeRefusesOverlap(t *testing.T) {
	t.Parallel()
	e := setup(t)
	routeToHost(t, e.tp)
	h := e.tp.Host.Name
	// A second link in H standing in for a container bridge.
	e.tp.Host.Run(t, "ip", "link", "add", "egtbr0", "type", "veth", "peer", "name", "egtbr1")
	e.tp.Host.Run(t, "ip", "link", "set", "egtbr0", "up")
	e.tp.Host.Run(t, "ip", "-6", "route", "add", "2001:db8:5:5:1::/80", "dev", "egtbr0")

	p := e.tp.Host.Start(t, nil, e.bin, "-interface", e.tp.HostLink, "-mode", "routed", "-prefix", routedPrefix.String(), "-admin", "")
	assert.Equal(t, 1, p.Wait(t), "exit status in %s", h)
	lines := slices.Collect(strings.Lines(p.Stderr()))
	require.Len(t, lines, 1, "%s", p.Stderr())
	assert.Contains(t, lines[0], "2001:db8:5:5:1::/80 dev egtbr0")
	assert.Empty(t, strings.TrimSpace(localRoutes(t, e.tp)))

	// A /80 beside the bridge's is fine.
	ed := e.tp.StartEgressd(t, e.bin, "-listen", proxyAddr, "-interface", e.tp.HostLink, "-mode", "routed", "-prefix", "2001:db8:5:5:2::/80")
	ed.WaitListening(t, 1)
	code, body, err := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, true).Fetch(guardCtx(t), e.up.HTTPURL)
	require.NoError(t, err)
	require.Equal(t, http200, code)
	assert.True(t, netip.MustParsePrefix("2001:db8:5:5:2::/80").Contains(netip.MustParseAddr(strings.TrimSpace(body))))
}

const http200 = 200
