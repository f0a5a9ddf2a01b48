package test

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/test/nstest"
)

const n = 50 // requests per check

// TestKeepAliveClientFreshAddressPerRequest: one client connection to the
// proxy, many requests, and every request still leaves from its own address.
func TestKeepAliveClientFreshAddressPerRequest(t *testing.T) {
	t.Parallel()
	e := start(t)

	t.Run("go client", func(t *testing.T) {
		e.up.Reset()
		c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, true)
		ctx := guardCtx(t)
		var bodies []string
		for i := range n {
			status, body, err := c.Fetch(ctx, fmt.Sprintf("%s?i=%d", e.up.HTTPURL, i))
			require.NoError(t, err, "request %d", i)
			require.Equal(t, http.StatusOK, status, "request %d: %s", i, body)
			bodies = append(bodies, body)
		}
		assert.EqualValues(t, 1, c.Dials(), "connections to the proxy")
		peers := e.up.Peers()
		assertFresh(t, peers, n)
		for i, p := range peers {
			assert.Equal(t, p.String()+"\n", bodies[i], "request %d: body and upstream's peer differ", i)
		}

		// The access log names each request's egress address.
		recs := waitRequestLogs(t, e.ed, n, egressIn(peers))
		assert.Len(t, recs, n, "one access line per request")
		var egress []string
		for _, rec := range recs {
			assert.Equal(t, "GET", rec["method"])
			assert.Equal(t, nstest.UpstreamName+":80", rec["host"], "host:port the client asked for")
			assert.Equal(t, "200", rec["status"])
			egress = append(egress, rec["egress"])
		}
		var want []string
		for _, p := range peers {
			want = append(want, p.String())
		}
		assert.ElementsMatch(t, want, egress, "egress= of the access lines against the upstream's peers")
	})

	t.Run("curl with many URLs", func(t *testing.T) {
		e.up.Reset()
		args := []string{"-q", "-sS", "--max-time", "60", "-x", "http://" + proxyAddr, "-w", "%{num_connects}\n"}
		for i := range n {
			args = append(args, fmt.Sprintf("%s?i=%d", e.up.HTTPURL, i))
		}
		out := e.tp.Host.Run(t, "curl", args...)
		// Each transfer prints the body (an address and a newline) and then
		// the number of connections it opened.
		lines := strings.Fields(out)
		require.Len(t, lines, 2*n, "curl output:\n%s", out)
		var bodies []netip.Addr
		connects := 0
		for i := 0; i < len(lines); i += 2 {
			a, err := netip.ParseAddr(lines[i])
			require.NoError(t, err)
			bodies = append(bodies, a)
			c, err := strconv.Atoi(lines[i+1])
			require.NoError(t, err)
			connects += c
		}
		assert.Equal(t, 1, connects, "curl's connections to the proxy")
		assertFresh(t, e.up.Peers(), n)
		assert.Equal(t, e.up.Peers(), bodies)
	})
}

// TestConcurrentClients: many client connections at once, each request from
// its own address.
func TestConcurrentClients(t *testing.T) {
	t.Parallel()
	e := start(t)
	ctx := guardCtx(t)

	gate := make(chan struct{})
	errs := make(chan error, n)
	var wg sync.WaitGroup
	clients := make([]*nstest.Client, n)
	for i := range n {
		clients[i] = e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
		wg.Go(func() {
			<-gate
			status, body, err := clients[i].Fetch(ctx, fmt.Sprintf("%s?i=%d", e.up.HTTPURL, i))
			if err == nil && status != http.StatusOK {
				err = fmt.Errorf("request %d: status %d: %s", i, status, body)
			}
			errs <- err
		})
	}
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		assert.NoError(t, err)
	}
	var dials int64
	for _, c := range clients {
		dials += c.Dials()
	}
	assert.EqualValues(t, n, dials, "connections to the proxy")
	assertFresh(t, e.up.Peers(), n)
}

// TestConnect: HTTPS through CONNECT tunnels, from the Go client and from
// real programs configured the usual way, with proxy environment variables.
func TestConnect(t *testing.T) {
	t.Parallel()
	e := start(t)

	t.Run("go client", func(t *testing.T) {
		e.up.Reset()
		c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
		ctx := guardCtx(t)
		for i := range n {
			status, body, err := c.Fetch(ctx, fmt.Sprintf("%s?i=%d", e.up.HTTPSURL, i))
			require.NoError(t, err, "request %d", i)
			require.Equal(t, http.StatusOK, status, "request %d: %s", i, body)
			require.Equal(t, e.up.Peers()[i].String()+"\n", body)
		}
		assert.EqualValues(t, n, c.Dials(), "tunnels")
		assertFresh(t, e.up.Peers(), n)
	})

	t.Run("proxy environment", func(t *testing.T) {
		fetch := binary(t, "./test/fetch")
		proxy := "http://" + proxyAddr
		// curl reads http_proxy only in lower case, wget reads lower case
		// only, Go reads both: set both.
		vars := []string{
			"HTTP_PROXY=" + proxy, "http_proxy=" + proxy,
			"HTTPS_PROXY=" + proxy, "https_proxy=" + proxy,
		}
		e.up.Reset()
		var got []netip.Addr
		for _, c := range []struct {
			name string
			args []string
		}{
			{"curl", []string{"-q", "-sS", "--max-time", "30", "--cacert", e.up.CAFile, e.up.HTTPSURL}},
			{"curl", []string{"-q", "-sS", "--max-time", "30", e.up.HTTPURL}},
			{"wget", []string{"--no-config", "-q", "-T", "30", "-t", "1", "-O", "-", "--ca-certificate=" + e.up.CAFile, e.up.HTTPSURL}},
			{"wget", []string{"--no-config", "-q", "-T", "30", "-t", "1", "-O", "-", e.up.HTTPURL}},
			{fetch, []string{"-cacert", e.up.CAFile, e.up.HTTPSURL, e.up.HTTPURL}},
		} {
			out, err := e.tp.Host.OutputEnv(vars, c.name, c.args...)
			require.NoError(t, err)
			got = append(got, parseBodies(t, out)...)
		}
		assertFresh(t, got, 6)
		assert.ElementsMatch(t, got, e.up.Peers())
	})
}

// TestHostDefaultSourceUnchanged: the addresses egressd adds never become the
// host's own source address, and the host's address is left as it was.
func TestHostDefaultSourceUnchanged(t *testing.T) {
	t.Parallel()
	e := setup(t)
	tp := e.tp

	plainSource := func() (curl, dial netip.Addr) {
		t.Helper()
		out := tp.Host.Run(t, "curl", "-q", "-sS", "--max-time", "30", e.up.HTTPURL)
		curl = parseBodies(t, out)[0]
		conn, err := tp.Host.DialContext(guardCtx(t), "tcp", net.JoinHostPort(nstest.UpstreamAddr.String(), "80"))
		require.NoError(t, err)
		defer conn.Close()
		return curl, netip.MustParseAddrPort(conn.LocalAddr().String()).Addr()
	}
	curl, dial := plainSource()
	require.Equal(t, nstest.HostAddr, curl, "before egressd: curl's source")
	require.Equal(t, nstest.HostAddr, dial, "before egressd: a Go dial's source")

	before := hostAddrs(t, tp)
	own := findAddr(before, nstest.HostAddr)
	require.NotNil(t, own)
	routesBefore := tp.Host.Run(t, "ip", "-6", "route", "show")

	e.restart(t, "-ready", "8")
	c := tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, true)
	ctx := guardCtx(t)
	for i := range 10 {
		status, body, err := c.Fetch(ctx, e.up.HTTPURL)
		require.NoError(t, err, "request %d", i)
		require.Equal(t, http.StatusOK, status, body)
	}
	// An open tunnel holds an address for sure while we look.
	tunnel, resp, err := tp.Host.Connect(ctx, proxyAddr, nstest.UpstreamName+":443")
	require.NoError(t, err)
	defer tunnel.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)

	added := addedAddrs(t, tp, before)
	require.NotEmpty(t, added, "egressd holds a tunnel but added no address")
	t.Logf("egressd holds %d addresses", len(added))
	for _, a := range added {
		assert.True(t, nstest.Prefix.Contains(nstest.AddrOf(a)), "%s outside the prefix", a)
		assertEgressAddr(t, a)
	}

	curl, dial = plainSource()
	assert.Equal(t, nstest.HostAddr, curl, "with egressd running: curl's source")
	assert.Equal(t, nstest.HostAddr, dial, "with egressd running: a Go dial's source")

	after := findAddr(hostAddrs(t, tp), nstest.HostAddr)
	if assert.NotNil(t, after, "H's own address is gone") {
		assert.Equal(t, own.Flags, after.Flags, "flags of H's own address")
		assert.Equal(t, 64, nstest.PrefixLen(*after))
		assert.Equal(t, own.PreferedLft, after.PreferedLft)
		assert.Equal(t, own.ValidLft, after.ValidLft)
	}
	assert.Equal(t, routesBefore, tp.Host.Run(t, "ip", "-6", "route", "show"), "H's routes changed")
}

func findAddr(addrs []netlink.Addr, ip netip.Addr) *netlink.Addr {
	i := slices.IndexFunc(addrs, func(a netlink.Addr) bool { return nstest.AddrOf(a) == ip })
	if i < 0 {
		return nil
	}
	return &addrs[i]
}

// TestSignalShutdown: on SIGTERM or SIGINT egressd stops accepting, lets
// in-flight work finish within the grace period, removes every address it
// added and exits 0.
func TestSignalShutdown(t *testing.T) {
	nstest.RequireRoot(t)
	t.Parallel()

	t.Run("idle", func(t *testing.T) {
		t.Parallel()
		e := start(t, "-ready", "8")
		before := withoutEgress(t, e)
		c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, true)
		for i := range 10 {
			status, _, err := c.Fetch(guardCtx(t), e.up.HTTPURL)
			require.NoError(t, err, "request %d", i)
			require.Equal(t, http.StatusOK, status)
		}
		c.Transport.CloseIdleConnections()

		require.NoError(t, e.ed.Signal(syscall.SIGTERM))
		assert.Equal(t, 0, e.ed.Wait(t), "exit status after SIGTERM")
		assert.Equal(t, addrStrings(before), addrStrings(hostAddrs(t, e.tp)), "addresses left on %s", e.tp.HostLink)
	})

	t.Run("in-flight request finishes", func(t *testing.T) {
		t.Parallel()
		e := start(t)
		before := withoutEgress(t, e)
		arrived, release := make(chan struct{}), make(chan struct{})
		e.up.Handle("/slow", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			close(arrived)
			<-release
			io.WriteString(w, "slow done\n")
		}))
		c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
		type result struct {
			status int
			body   string
			err    error
		}
		res := make(chan result, 1)
		ctx := guardCtx(t)
		go func() {
			s, b, err := c.Fetch(ctx, e.up.HTTPURL+"slow")
			res <- result{s, b, err}
		}()
		<-arrived

		require.NoError(t, e.ed.Signal(syscall.SIGTERM))
		nstest.WaitFor(t, "egressd to stop accepting", func() bool {
			conn, err := e.tp.Host.DialContext(ctx, "tcp", proxyAddr)
			if err == nil {
				conn.Close()
			}
			return err != nil
		})
		assert.False(t, e.ed.Exited(), "egressd exited with a request in flight")
		close(release)
		r := <-res
		require.NoError(t, r.err, "the in-flight request")
		assert.Equal(t, http.StatusOK, r.status)
		assert.Equal(t, "slow done\n", r.body)
		assert.Equal(t, 0, e.ed.Wait(t), "exit status after SIGTERM")
		assert.Equal(t, addrStrings(before), addrStrings(hostAddrs(t, e.tp)), "addresses left on %s", e.tp.HostLink)
	})

	t.Run("tunnel open past the grace period", func(t *testing.T) {
		t.Parallel()
		e := start(t, "-grace", "1s")
		before := withoutEgress(t, e)
		tunnel, resp, err := e.tp.Host.Connect(guardCtx(t), proxyAddr, nstest.UpstreamName+":443")
		require.NoError(t, err)
		defer tunnel.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)

		require.NoError(t, e.ed.Signal(syscall.SIGINT))
		assert.Equal(t, 0, e.ed.Wait(t), "exit status after SIGINT")
		_, err = tunnel.Read(make([]byte, 1))
		assert.Error(t, err, "the tunnel is still open after egressd exited")
		assert.Equal(t, addrStrings(before), addrStrings(hostAddrs(t, e.tp)), "addresses left on %s", e.tp.HostLink)
	})
}

// withoutEgress is H's veth addresses less those egressd added: the set that
// must remain after egressd exits.
func withoutEgress(t *testing.T, e *env) []netlink.Addr {
	return slices.DeleteFunc(hostAddrs(t, e.tp), func(a netlink.Addr) bool {
		ip := nstest.AddrOf(a)
		return nstest.Prefix.Contains(ip) && ip != nstest.HostAddr
	})
}

// TestRestartAfterKill: a SIGKILLed egressd leaves its addresses behind; the
// next start removes exactly those (the leftover signature), and leaves
// pinned and foreign addresses in the prefix alone.
func TestRestartAfterKill(t *testing.T) {
	t.Parallel()
	e := setup(t)
	tp := e.tp

	pinned := netip.MustParseAddr("2001:db8:1:2::a1")
	hand := []struct {
		addr netip.Addr
		args []string // for `ip addr add ADDR/LEN dev VETH ...`
	}{
		// Looks exactly like a leftover, but -pin protects it.
		{pinned, []string{"/128", "nodad", "noprefixroute", "preferred_lft", "0", "valid_lft", "600"}},
		// A plain /128, as an administrator would add one.
		{netip.MustParseAddr("2001:db8:1:2::b1"), []string{"/128"}},
		// Leftover flags but not deprecated.
		{netip.MustParseAddr("2001:db8:1:2::b2"), []string{"/128", "nodad", "noprefixroute", "preferred_lft", "600", "valid_lft", "600"}},
		// Deprecated with a finite lifetime, but a /64.
		{netip.MustParseAddr("2001:db8:1:2::b3"), []string{"/64", "nodad", "preferred_lft", "0", "valid_lft", "600"}},
		// Deprecated, nodad, noprefixroute, but valid forever.
		{netip.MustParseAddr("2001:db8:1:2::b4"), []string{"/128", "nodad", "noprefixroute", "preferred_lft", "0"}},
	}
	var handAddrs []netip.Addr
	for _, h := range hand {
		args := append([]string{"addr", "add", h.addr.String() + h.args[0], "dev", tp.HostLink}, h.args[1:]...)
		tp.Host.Run(t, "ip", args...)
		handAddrs = append(handAddrs, h.addr)
	}
	before := hostAddrs(t, tp)
	handBefore := map[netip.Addr]netlink.Addr{}
	for _, h := range handAddrs {
		handBefore[h] = *findAddr(before, h)
	}
	checkHand := func(when string) {
		t.Helper()
		now := hostAddrs(t, tp)
		for h, was := range handBefore {
			a := findAddr(now, h)
			if !assert.NotNil(t, a, "%s: hand-added %s was removed", when, h) {
				continue
			}
			assert.Equal(t, nstest.PrefixLen(was), nstest.PrefixLen(*a), "%s: %s prefix length", when, h)
			// DAD may finish meanwhile for the address added without nodad.
			const dadFlags = unix.IFA_F_TENTATIVE | unix.IFA_F_OPTIMISTIC
			assert.Equal(t, was.Flags&^dadFlags, a.Flags&^dadFlags, "%s: %s flags", when, h)
		}
	}
	args := []string{"-ready", "8", "-pin", pinned.String()}

	ed := e.restart(t, args...)
	c := tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
	ctx := guardCtx(t)
	for i := range 10 {
		status, body, err := c.Fetch(ctx, e.up.HTTPURL)
		require.NoError(t, err, "request %d", i)
		require.Equal(t, http.StatusOK, status, body)
	}
	assertFresh(t, e.up.Peers(), 10, handAddrs...)
	tunnel, resp, err := tp.Host.Connect(ctx, proxyAddr, nstest.UpstreamName+":443")
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)

	leftovers := addedAddrs(t, tp, before)
	require.NotEmpty(t, leftovers, "egressd holds a tunnel but added no address")
	t.Logf("egressd holds %d addresses when killed", len(leftovers))
	for _, a := range leftovers {
		assertEgressAddr(t, a)
	}
	require.NoError(t, ed.Signal(syscall.SIGKILL))
	ed.Wait(t)
	tunnel.Close()
	require.ElementsMatch(t, addrStrings(leftovers), addrStrings(addedAddrs(t, tp, before)),
		"the kernel should keep a killed egressd's addresses until their valid_lft ends")
	checkHand("after SIGKILL")

	e.up.Reset()
	ed = e.restart(t, args...)
	assert.Empty(t, addrStrings(intersect(leftovers, hostAddrs(t, tp))), "leftovers still there once the restarted egressd listens")
	checkHand("after restart")

	for i := range 10 {
		status, body, err := c.Fetch(ctx, e.up.HTTPURL)
		require.NoError(t, err, "request %d after restart", i)
		require.Equal(t, http.StatusOK, status, body)
	}
	var avoid []netip.Addr
	for _, l := range leftovers {
		avoid = append(avoid, nstest.AddrOf(l))
	}
	assertFresh(t, e.up.Peers(), 10, append(avoid, handAddrs...)...)
	checkHand("after use")

	require.NoError(t, ed.Signal(syscall.SIGTERM))
	assert.Equal(t, 0, ed.Wait(t), "exit status after SIGTERM")
	checkHand("after exit")
	assert.Equal(t, addrStrings(before), addrStrings(hostAddrs(t, tp)), "addresses on %s after exit", tp.HostLink)
}

func intersect(a, b []netlink.Addr) []netlink.Addr {
	return slices.DeleteFunc(slices.Clone(a), func(x netlink.Addr) bool {
		return !slices.ContainsFunc(b, func(y netlink.Addr) bool { return x.Equal(y) })
	})
}

// TestNoAddressIs503: when no fresh address can be had, the request fails
// with 503 and nothing reaches the upstream: egressd never falls back to
// another source address.
func TestNoAddressIs503(t *testing.T) {
	nstest.RequireRoot(t)
	t.Parallel()

	// check503 sends a plain request and a CONNECT and expects 503 for both,
	// with a one-line reason, and nothing at the upstream.
	check503 := func(t *testing.T, e *env) {
		t.Helper()
		e.up.Reset()
		c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
		status, body, err := c.Fetch(guardCtx(t), e.up.HTTPURL)
		require.NoError(t, err)
		assert.Equal(t, http.StatusServiceUnavailable, status, "plain request: %s", body)
		assertOneLineReason(t, body)

		conn, resp, err := e.tp.Host.Connect(guardCtx(t), proxyAddr, nstest.UpstreamName+":443")
		require.NoError(t, err)
		conn.Close()
		assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, "CONNECT")
		b, _ := io.ReadAll(resp.Body)
		assertOneLineReason(t, string(b))

		assert.Empty(t, e.up.Peers(), "the upstream saw a request that should have got 503")
		var methods []string
		for _, rec := range waitRequestLogs(t, e.ed, 2, statusIs("503")) {
			methods = append(methods, rec["method"])
		}
		assert.ElementsMatch(t, []string{"GET", "CONNECT"}, methods, "the access lines with status 503")
	}

	t.Run("max-addrs reached", func(t *testing.T) {
		t.Parallel()
		e := start(t, "-max-addrs", "1", "-ready", "0")
		tunnel, resp, err := e.tp.Host.Connect(guardCtx(t), proxyAddr, nstest.UpstreamName+":443")
		require.NoError(t, err)
		defer tunnel.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode, "the first tunnel")

		check503(t, e)

		// Once the tunnel closes its address goes, and requests work again.
		tunnel.Close()
		c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
		nstest.WaitFor(t, "a request to succeed after the tunnel closed", func() bool {
			status, _, err := c.Fetch(guardCtx(t), e.up.HTTPURL)
			return err == nil && status == http.StatusOK
		})
	})

	for _, ready := range []string{"0", "8"} {
		t.Run("netlink refuses, ready "+ready, func(t *testing.T) {
			t.Parallel()
			e := start(t, "-ready", ready)
			c := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
			status, body, err := c.Fetch(guardCtx(t), e.up.HTTPURL)
			require.NoError(t, err)
			require.Equal(t, http.StatusOK, status, "before breaking netlink: %s", body)

			// No IPv6 on the veth: every address goes and no add succeeds.
			e.tp.Host.Run(t, "sysctl", "-qw", "net.ipv6.conf."+e.tp.HostLink+".disable_ipv6=1")
			check503(t, e)
		})
	}
}

// assertOneLineReason checks a proxy error body: one line of text that names
// no egress address (a client must not learn them from errors).
func assertOneLineReason(t *testing.T, body string) {
	t.Helper()
	line := strings.TrimSuffix(body, "\n")
	assert.NotEmpty(t, line, "empty error body")
	assert.NotContains(t, line, "\n", "error body has more than one line: %q", body)
	for _, f := range strings.FieldsFunc(line, func(r rune) bool {
		return !strings.ContainsRune("0123456789abcdefABCDEF:.", r)
	}) {
		if a, err := netip.ParseAddr(strings.Trim(f, ":.")); err == nil && nstest.Prefix.Contains(a) && a != nstest.Prefix.Addr() {
			t.Errorf("error body names the address %s: %q", a, body)
		}
	}
}

// TestStartupErrors: a configuration egressd cannot run with makes it exit 1
// with one line on stderr that names the cause.
func TestStartupErrors(t *testing.T) {
	t.Parallel()
	bin := binary(t, "./cmd/egressd")
	tp := nstest.New(t)

	for _, tt := range []struct {
		name  string
		ns    *nstest.NS
		args  []string
		names string // the stderr line must contain this
		setup func(t *testing.T)
	}{
		{
			name:  "interface missing",
			ns:    tp.Host,
			args:  []string{"-interface", "egtnosuch0", "-prefix", nstest.Prefix.String()},
			names: "egtnosuch0",
		},
		{
			name:  "prefix not on the interface",
			ns:    tp.Host,
			args:  []string{"-interface", tp.HostLink, "-prefix", "2001:db8:9:9::/64"},
			names: "2001:db8:9:9::/64",
		},
		{
			name:  "listen address in use",
			ns:    tp.Host,
			args:  []string{"-interface", tp.HostLink, "-prefix", nstest.Prefix.String(), "-listen", proxyAddr},
			names: proxyAddr,
			setup: func(t *testing.T) {
				ln, err := tp.Host.Listen("tcp", proxyAddr)
				require.NoError(t, err)
				t.Cleanup(func() { ln.Close() })
			},
		},
		{
			// R has no default route to take the interface from.
			name:  "no IPv6 default route",
			ns:    tp.Router,
			args:  nil,
			names: "route",
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if tt.setup != nil {
				tt.setup(t)
			}
			p := tt.ns.Start(t, nil, bin, tt.args...)
			assert.Equal(t, 1, p.Wait(t), "exit status")
			stderr := p.Stderr()
			lines := slices.Collect(strings.Lines(stderr))
			if assert.Len(t, lines, 1, "stderr should be one line:\n%s", stderr) {
				assert.Contains(t, strings.ToLower(lines[0]), strings.ToLower(tt.names), "the line should name the cause")
			}
		})
	}
}

// TestInterfaceAndPrefixFromDefaultRoute: with no -interface and no -prefix,
// egressd takes the interface of the IPv6 default route and the /64 of its
// first global address.
func TestInterfaceAndPrefixFromDefaultRoute(t *testing.T) {
	t.Parallel()
	bin := binary(t, "./cmd/egressd")
	tp := nstest.New(t)
	up := tp.StartUpstream(t)
	ed := tp.StartEgressd(t, bin)
	ed.WaitListening(t, 1)

	c := tp.Host.NewClient(t, proxyAddr, up.RootCAs, false)
	for i := range 5 {
		status, body, err := c.Fetch(guardCtx(t), up.HTTPSURL)
		require.NoError(t, err, "request %d", i)
		require.Equal(t, http.StatusOK, status, body)
	}
	assertFresh(t, up.Peers(), 5)

	require.NoError(t, ed.Signal(syscall.SIGTERM))
	assert.Equal(t, 0, ed.Wait(t))
}
