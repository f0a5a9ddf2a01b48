package test

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

// handleConns serves /conn at the upstream with the peer's address and port:
// requests that share an upstream connection answer the same.
func handleConns(e *env) {
	e.up.Handle("/conn", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, r.RemoteAddr)
	}))
}

// fetchConn GETs url through c with the session header key (none if empty)
// and returns the upstream connection's peer address and port.
func fetchConn(t *testing.T, c *nstest.Client, url, key string) netip.AddrPort {
	t.Helper()
	req, err := http.NewRequestWithContext(guardCtx(t), http.MethodGet, url, nil)
	require.NoError(t, err)
	if key != "" {
		req.Header.Set("X-Egress-Session", key)
	}
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, "body %q", body)
	return parseConn(t, string(body))
}

func parseConn(t *testing.T, body string) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(strings.TrimSpace(body))
	require.NoError(t, err, "upstream answer %q", body)
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// fetchMany fetches url n times with key and returns the distinct egress
// addresses and upstream connections.
func fetchMany(t *testing.T, c *nstest.Client, url, key string, n int) (addrs []netip.Addr, conns []netip.AddrPort) {
	t.Helper()
	for range n {
		ap := fetchConn(t, c, url, key)
		if !slices.Contains(addrs, ap.Addr()) {
			addrs = append(addrs, ap.Addr())
		}
		if !slices.Contains(conns, ap) {
			conns = append(conns, ap)
		}
	}
	return addrs, conns
}

// TestRotateSession: under -rotate session, the requests of a session key
// leave from one address over one kept-alive upstream connection, whether
// the key comes as a header or as the proxy URL's user name, plain HTTP or
// CONNECT; requests without a key rotate per request.
func TestRotateSession(t *testing.T) {
	t.Parallel()
	e := start(t, "-rotate", "session", "-session-idle", "10m")
	handleConns(e)
	url := e.up.HTTPURL + "conn"
	c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, true)

	addrsA, connsA := fetchMany(t, c, url, "a", 10)
	require.Len(t, addrsA, 1, "key a: egress addresses")
	assert.Len(t, connsA, 1, "key a: upstream connections")
	a := addrsA[0]
	for _, rec := range waitRequestLogs(t, e.ed, 10, nil)[:10] {
		assert.Equal(t, a.String(), rec["egress"], "access line of a reused connection names its address")
	}
	addrsB, connsB := fetchMany(t, c, url, "b", 10)
	require.Len(t, addrsB, 1, "key b: egress addresses")
	assert.Len(t, connsB, 1, "key b: upstream connections")
	b := addrsB[0]
	assertFresh(t, []netip.Addr{a, b}, 2)

	var none []netip.Addr
	for range 5 {
		none = append(none, fetchConn(t, c, url, "").Addr())
	}
	assertFresh(t, none, 5, a, b)
	assert.EqualValues(t, 1, c.Dials(), "connections to the proxy")

	// The proxy URL's user name: plain HTTP and CONNECT, with curl.
	out := e.tp.Host.Run(t, "curl", "-q", "-sS", "--max-time", "30",
		"-x", "http://session-a:x@"+proxyAddr, url)
	assert.Equal(t, a, parseConn(t, out).Addr(), "user name session-a, plain HTTP")
	out = e.tp.Host.Run(t, "curl", "-q", "-sS", "--max-time", "30", "--cacert", e.up.CAFile,
		"-x", "http://session-b:x@"+proxyAddr, e.up.HTTPSURL+"conn")
	assert.Equal(t, b, parseConn(t, out).Addr(), "user name session-b, CONNECT")

	// CONNECT with the header.
	out = e.tp.Host.Run(t, "curl", "-q", "-sS", "--max-time", "30", "--cacert", e.up.CAFile,
		"-x", "http://"+proxyAddr, "--proxy-header", "X-Egress-Session: a", e.up.HTTPSURL+"conn")
	assert.Equal(t, a, parseConn(t, out).Addr(), "header a, CONNECT")
}

// TestRotateSessionIdle: a session that was idle for -session-idle gives its
// address back, and its key's next request leaves from a new one. The idle
// time is long enough that a busy machine cannot stretch the gap between
// the first two requests past it.
func TestRotateSessionIdle(t *testing.T) {
	t.Parallel()
	e := start(t, "-rotate", "session", "-session-idle", "5s")
	handleConns(e)
	url := e.up.HTTPURL + "conn"
	c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, true)

	a := fetchConn(t, c, url, "k1").Addr()
	assert.Equal(t, a, fetchConn(t, c, url, "k1").Addr())

	// The session gives its address back when it ends: that is how the
	// test knows, without timing it. (On-link, the address stays warm for
	// the neighbour window; a new session gets a never-used one within the
	// budget.)
	nstest.WaitFor(t, "session k1's address to be given back", func() bool { return ctlStats(t, e).Addresses.InUse == 0 })
	next := fetchConn(t, c, url, "k1").Addr()
	assertFresh(t, []netip.Addr{a, next}, 2)
}

// TestRotateConnection: under -rotate connection, the requests of one
// client connection leave from one address; another client connection
// leaves from another.
func TestRotateConnection(t *testing.T) {
	t.Parallel()
	e := start(t, "-rotate", "connection")
	handleConns(e)
	url := e.up.HTTPURL + "conn"

	var got []netip.Addr
	for i := range 2 {
		c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, true)
		addrs, _ := fetchMany(t, c, url, "", 10)
		require.Len(t, addrs, 1, "client connection %d: egress addresses", i)
		assert.EqualValues(t, 1, c.Dials(), "client %d: connections to the proxy", i)
		got = append(got, addrs[0])
	}
	assertFresh(t, got, 2)

	// A session header changes nothing in this mode.
	c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, true)
	addrs, _ := fetchMany(t, c, url, "a", 3)
	require.Len(t, addrs, 1)
	assertFresh(t, append(got, addrs[0]), 3)
}
