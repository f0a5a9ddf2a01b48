package test

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

// getThroughTunnel opens a CONNECT tunnel to target through the proxy, sends
// a plain HTTP GET inside it and returns the status and body of the answer.
// The proxy's answer to the CONNECT must be 200.
func getThroughTunnel(t *testing.T, e *env, target string) (int, string) {
	t.Helper()
	conn, resp, err := e.tp.Host.Connect(guardCtx(t), proxyAddr, target)
	require.NoError(t, err)
	defer conn.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "CONNECT %s", target)
	_, err = io.WriteString(conn, "GET / HTTP/1.1\r\nHost: "+target+"\r\nConnection: close\r\n\r\n")
	require.NoError(t, err)
	inner, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err)
	defer inner.Body.Close()
	body, err := io.ReadAll(inner.Body)
	require.NoError(t, err)
	return inner.StatusCode, string(body)
}

// connectStatus asks for a tunnel to target and returns the proxy's status
// and body.
func connectStatus(t *testing.T, e *env, target string) (int, string) {
	t.Helper()
	conn, resp, err := e.tp.Host.Connect(guardCtx(t), proxyAddr, target)
	require.NoError(t, err)
	conn.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// TestIPv4Only: an upstream with no IPv6 address (an A record only) is
// reached from H's own IPv4 address under -ipv4 direct, the default, without
// taking an egress address, and is counted apart; under -ipv4 deny it gets
// 502 naming the host, and the upstream sees nothing. A name with AAAA
// records never goes over IPv4, not even when its IPv6 dial fails.
func TestIPv4Only(t *testing.T) {
	nstest.RequireRoot(t)
	t.Parallel()
	v4URL := "http://" + nstest.V4OnlyName + "/"
	v4Target := nstest.V4OnlyName + ":80"

	t.Run("direct", func(t *testing.T) {
		t.Parallel()
		// No addresses kept ready: every address added is one a request took.
		e := start(t, "-ready", "0")
		c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)

		status, body, err := c.Fetch(guardCtx(t), v4URL)
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, status, body)
		assert.Equal(t, nstest.HostAddr4.String()+"\n", body)
		assert.Equal(t, []netip.Addr{nstest.HostAddr4}, e.up.Peers(), "the upstream saw H's own IPv4 address")

		recs := waitRequestLogs(t, e.ed, 1, nil)
		assert.Equal(t, nstest.HostAddr4.String(), recs[0]["egress"], "the access log names the source")
		s := ctlStats(t, e)
		u := nstest.UpstreamStats(t, s, nstest.V4OnlyName)
		assert.Equal(t, uint64(1), u.Requests)
		assert.Equal(t, uint64(1), u.IPv4, "counted as over IPv4")
		assert.Zero(t, u.Errors)
		assert.Equal(t, uint64(1), s.Totals.IPv4)
		assert.Zero(t, s.Addresses.Added, "no egress address for a direct IPv4 request")

		// A tunnel goes the same way.
		status, body = getThroughTunnel(t, e, v4Target)
		assert.Equal(t, http.StatusOK, status)
		assert.Equal(t, nstest.HostAddr4.String()+"\n", body)

		// An IPv6 upstream still gets a fresh address, and is not counted
		// as IPv4.
		status, body, err = c.Fetch(guardCtx(t), e.up.HTTPURL)
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, status, body)
		peers := e.up.Peers()
		require.Len(t, peers, 3)
		assertFresh(t, peers[2:], 1)

		waitRequestLogs(t, e.ed, 3, nil)
		s = ctlStats(t, e)
		assert.Equal(t, uint64(2), nstest.UpstreamStats(t, s, nstest.V4OnlyName).IPv4)
		assert.Zero(t, nstest.UpstreamStats(t, s, nstest.UpstreamName).IPv4)
		assert.Equal(t, uint64(2), s.Totals.IPv4)
		assert.Equal(t, uint64(1), s.Addresses.Added, "only the IPv6 request took an address")
	})

	t.Run("deny", func(t *testing.T) {
		t.Parallel()
		e := start(t, "-ipv4", "deny")
		c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
		const want = nstest.V4OnlyName + " has no IPv6 address\n"

		status, body, err := c.Fetch(guardCtx(t), v4URL)
		require.NoError(t, err)
		assert.Equal(t, http.StatusBadGateway, status)
		assert.Equal(t, want, body)
		assertOneLineReason(t, body)

		status, body = connectStatus(t, e, v4Target)
		assert.Equal(t, http.StatusBadGateway, status)
		assert.Equal(t, want, body)
		assert.Empty(t, e.up.Peers(), "the upstream saw a request that should have got 502")

		// IPv6 upstreams are not affected.
		status, body, err = c.Fetch(guardCtx(t), e.up.HTTPURL)
		require.NoError(t, err)
		assert.Equal(t, http.StatusOK, status, body)

		waitRequestLogs(t, e.ed, 3, nil)
		s := ctlStats(t, e)
		u := nstest.UpstreamStats(t, s, nstest.V4OnlyName)
		assert.Equal(t, uint64(2), u.Requests)
		assert.Equal(t, uint64(2), u.Errors)
		assert.Zero(t, u.IPv4)
		assert.Zero(t, s.Totals.IPv4)
	})

	t.Run("no fallback from IPv6", func(t *testing.T) {
		t.Parallel()
		e := start(t, "-connect-ports", "443,80,81", "-http-ports", "80,81") // -ipv4 direct
		// dual.test has an AAAA record and an A record. On port 81 nothing
		// listens at its IPv6 address, while its IPv4 address accepts.
		ln, err := e.tp.Router.Listen("tcp", net.JoinHostPort(nstest.RouterAddr4.String(), "81"))
		require.NoError(t, err)
		var accepted atomic.Int64
		serveTCP(t, ln, func(c net.Conn) {
			accepted.Add(1)
			c.Close()
		})

		c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
		status, body, err := c.Fetch(guardCtx(t), "http://"+nstest.DualName+":81/")
		require.NoError(t, err)
		assert.Equal(t, http.StatusBadGateway, status)
		assert.Equal(t, "upstream "+nstest.DualName+" refused the connection\n", body)

		status, body = connectStatus(t, e, nstest.DualName+":81")
		assert.Equal(t, http.StatusBadGateway, status)
		assert.Equal(t, "upstream "+nstest.DualName+" refused the connection\n", body)

		// The same name on a port that listens at its IPv6 address works,
		// from a fresh address.
		status, body, err = c.Fetch(guardCtx(t), "http://"+nstest.DualName+"/")
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, status, body)
		assertFresh(t, e.up.Peers(), 1)

		waitRequestLogs(t, e.ed, 3, nil)
		assert.Zero(t, accepted.Load(), "egressd fell back to IPv4 for a name with an AAAA record")
		assert.Zero(t, nstest.UpstreamStats(t, ctlStats(t, e), nstest.DualName).IPv4)

		// The IPv4 listener does answer H: the check above is not vacuous.
		conn, err := e.tp.Host.DialContext(guardCtx(t), "tcp", net.JoinHostPort(nstest.RouterAddr4.String(), "81"))
		require.NoError(t, err)
		conn.Close()
		nstest.WaitFor(t, "the IPv4 listener to accept H's own connection", func() bool { return accepted.Load() == 1 })
	})

	t.Run("name does not resolve", func(t *testing.T) {
		t.Parallel()
		e := start(t)
		c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
		status, body, err := c.Fetch(guardCtx(t), "http://nosuch.test/")
		require.NoError(t, err)
		assert.Equal(t, http.StatusBadGateway, status)
		assertOneLineReason(t, body)
		assert.True(t, strings.HasPrefix(body, "cannot resolve nosuch.test"), "body %q", body)
		assert.Empty(t, e.up.Peers())
	})
}
