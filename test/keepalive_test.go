package test

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

// TestRotateConnectionKeepAlive: under -rotate connection, the plain HTTP
// requests a keep-alive client sends over one connection to the proxy share
// one upstream connection, from one address: a Go program
// (http.ProxyFromEnvironment, keep-alive) and curl with several URLs in one
// command. When the client leaves, its address is given back; the next
// client leaves from another one.
func TestRotateConnectionKeepAlive(t *testing.T) {
	t.Parallel()
	e := start(t, "-rotate", "connection")
	handleConns(e)
	const n = 5
	urls := slices.Repeat([]string{e.up.HTTPURL + "conn"}, n)
	env := []string{"HTTP_PROXY=http://" + proxyAddr, "http_proxy=http://" + proxyAddr}
	fetch := binary(t, "./test/fetch")

	var addrs []netip.Addr
	for _, cl := range []struct {
		name string
		args []string
	}{
		{"go", append([]string{fetch, "-keepalive"}, urls...)},
		{"curl", append([]string{"curl", "-q", "-sS", "-f", "--max-time", "30"}, urls...)},
	} {
		out, err := e.tp.Host.OutputEnv(env, cl.args[0], cl.args[1:]...)
		require.NoError(t, err, cl.name)
		conns := map[netip.AddrPort]int{}
		for line := range strings.Lines(out) {
			conns[parseConn(t, line)]++
		}
		require.Len(t, conns, 1, "%s: upstream connections for %d requests: %v", cl.name, n, conns)
		for c, reqs := range conns {
			require.Equal(t, n, reqs, cl.name)
			addrs = append(addrs, c.Addr())
		}
		nstest.WaitFor(t, cl.name+"'s address to be given back", func() bool { return ctlStats(t, e).Addresses.InUse == 0 })
	}
	assertFresh(t, addrs, 2)
}
