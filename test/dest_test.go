package test

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/proxy"

	"github.com/egressd/egressd/test/nstest"
)

// destServices are the services a client of egressd must not reach: the
// host's own (a service on every address, and a loopback-only one) and, in
// R, a private network's and a metadata service, plus mail and SSH on the
// upstream's address. Each counts the connections it accepts.
type destServices struct {
	host, private, metadata, mail atomic.Int64
}

// startDestServices starts the services of destServices. R gets 10.9.9.1
// (a private network) and 169.254.169.254 (the clouds' metadata address) on
// its loopback, and H routes to both through R, as a host on a provider's
// network might; H's /etc/hosts gets names for each kind of address.
func startDestServices(t *testing.T, e *env) *destServices {
	t.Helper()
	s := &destServices{}
	count := func(n *atomic.Int64) func(net.Conn) {
		return func(c net.Conn) {
			defer c.Close()
			n.Add(1)
			c.SetDeadline(time.Now().Add(nstest.Guard))
			br := bufio.NewReader(c)
			for { // the request head, so that closing sends no reset
				line, err := br.ReadString('\n')
				if err != nil || strings.TrimSpace(line) == "" {
					break
				}
			}
			c.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nreached\n"))
		}
	}
	for _, addr := range []string{"[::]:9999", "127.0.0.1:8001", "[::1]:8001"} {
		ln, err := e.tp.Host.Listen("tcp", addr)
		require.NoError(t, err)
		serveTCP(t, ln, count(&s.host))
	}
	e.tp.Router.Run(t, "ip", "addr", "add", "10.9.9.1/32", "dev", "lo")
	e.tp.Router.Run(t, "ip", "addr", "add", "169.254.169.254/32", "dev", "lo")
	e.tp.Host.Run(t, "ip", "route", "add", "10.9.9.0/24", "via", nstest.RouterAddr4.String())
	e.tp.Host.Run(t, "ip", "route", "add", "169.254.169.254/32", "via", nstest.RouterAddr4.String())
	for addr, n := range map[string]*atomic.Int64{
		"10.9.9.1:80": &s.private, "169.254.169.254:80": &s.metadata,
		"[" + nstest.UpstreamAddr.String() + "]:25": &s.mail, "[" + nstest.UpstreamAddr.String() + "]:22": &s.mail,
	} {
		ln, err := e.tp.Router.Listen("tcp", addr)
		require.NoError(t, err)
		serveTCP(t, ln, count(n))
	}
	e.tp.AddHosts(t, nstest.HostAddr4.String()+" self.test\n"+nstest.HostAddr.String()+" self.test\n"+
		"127.0.0.1 loop.test\n::1 loop.test\n169.254.169.254 metadata.test\n10.9.9.1 private.test\n"+
		"64:ff9b::c000:202 nat64self.test\n")
	return s
}

// probe is a destination a client asks egressd for, as host:port in URL
// form, and what egressd's refusal must say.
type probe struct {
	name, target, reason string
}

// destProbes are the ways to the host itself, its link and its private
// networks: every one must be refused.
func destProbes(hostLink string, routed bool) []probe {
	ps := []probe{
		{"host IPv4", "192.0.2.2:9999", "an address of the proxy host"},
		{"host IPv4-mapped", "[::ffff:192.0.2.2]:9999", "(192.0.2.2) not allowed: an address of the proxy host"},
		{"host by name", "self.test:9999", "not allowed"},
		{"loopback", "127.0.0.1:8001", "loopback"},
		{"loopback IPv6", "[::1]:8001", "loopback"},
		{"loopback by name", "loop.test:8001", "loopback"},
		// curl drops the zone before it asks the proxy; TestZonedDestinations
		// sends them as they are.
		{"zoned loopback", "[::1%25lo]:8001", "not allowed"},
		{"zoned unspecified", "[::%25lo]:8001", "not allowed"},
		{"zoned link-local", "[fe80::1%25" + hostLink + "]:80", "not allowed"},
		{"private", "10.9.9.1:80", "a private network (RFC 1918); -allow-dest re-admits it"},
		{"private by name", "private.test:80", "(10.9.9.1) not allowed: a private network (RFC 1918)"},
		{"metadata", "169.254.169.254:80", "link-local"},
		{"metadata by name", "metadata.test:80", "(169.254.169.254) not allowed: link-local"},
		{"NAT64 of loopback", "[64:ff9b::7f00:1]:8001", "NAT64 (RFC 6052) form of 127.0.0.1, loopback"},
		{"NAT64 of the host", "nat64self.test:9999", "NAT64 (RFC 6052) form of 192.0.2.2, an address of the proxy host"},
	}
	ps = append(ps, probe{"host IPv6", "[" + nstest.HostAddr.String() + "]:9999", "an address of the proxy host"})
	if routed {
		// The local route makes every address of the prefix the host's.
		ps = append(ps, probe{"host in the routed prefix", "[2001:db8:5:5::53]:9999", "an address of the proxy host"},
			probe{"egress prefix", "[2001:db8:5:5::99]:9999", "in egressd's own egress prefix 2001:db8:5:5::/64"})
	} else {
		ps = append(ps, probe{"egress prefix", "[2001:db8:1:2::99]:9999", "in egressd's own egress prefix 2001:db8:1:2::/64"})
	}
	return ps
}

// destArgs are egressd's flags for these tests: SOCKS5, and the services'
// ports admitted for tunnels, so that what refuses them is the destination
// guard and not the port list.
var destArgs = []string{"-socks5", socksAddr, "-connect-ports", "443,80,9999,8001"}

// TestDestinationGuard: through plain HTTP (curl -x), CONNECT (curl -p) and
// SOCKS5 (Go's golang.org/x/net/proxy, which sends a name with a zone as
// the domain it is), every way to the host itself is refused: its IPv4 and
// IPv6 addresses in every spelling, its loopback, zoned addresses, names in
// /etc/hosts that lead there, NAT64 forms, and in routed mode an address of
// the routed prefix; so are a private network and the metadata address.
// The answer is 403 (SOCKS5: "not allowed by ruleset") with the reason in
// the body and in Proxy-Status, which curl -v shows for a refused tunnel,
// and no service sees a connection. -allow-dest re-admits the private
// network, never the metadata address.
func TestDestinationGuard(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"onlink", "routed"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			e := setup(t)
			routed := mode == "routed"
			args := destArgs
			if routed {
				routeToHost(t, e.tp)
				// A service address of the host inside the routed prefix.
				e.tp.Host.Run(t, "ip", "addr", "add", "2001:db8:5:5::53/128", "dev", "lo", "noprefixroute")
				args = append([]string{"-mode", "routed", "-prefix", routedPrefix.String()}, args...)
			}
			svc := startDestServices(t, e)
			e.ed = e.restart(t, args...)

			for _, p := range destProbes(e.tp.HostLink, routed) {
				t.Run(p.name, func(t *testing.T) {
					code, hdr, body := curlHTTP(t, e.tp.Host, "http://"+p.target+"/")
					assert.Equal(t, "403", code, "plain HTTP: %s", body)
					assert.Contains(t, body, p.reason, "plain HTTP")
					assert.Contains(t, hdr, "Proxy-Status: egressd; error=destination_ip_prohibited; details=", "plain HTTP")

					connect, verbose := curlConnect(t, e.tp.Host, "http://"+p.target+"/")
					assert.Equal(t, "403", connect, "CONNECT")
					assert.Contains(t, verbose, "< Proxy-Status: egressd; error=destination_ip_prohibited; details=", "curl -v shows why")
					assert.Contains(t, verbose, p.reason, "CONNECT")

					err := socksDial(t, e.tp.Host, strings.ReplaceAll(p.target, "%25", "%"))
					require.Error(t, err, "SOCKS5")
					assert.Contains(t, err.Error(), "not allowed by ruleset", "SOCKS5")
				})
			}
			// Zones as raw clients send them: in the request line and as a
			// SOCKS5 domain.
			for _, target := range []string{"[::1%25lo]:8001", "[::%25lo]:8001", "[fe80::1%25" + e.tp.HostLink + "]:80", "[::0%250]:8001"} {
				for _, head := range []string{
					"GET http://" + target + "/ HTTP/1.1\r\nHost: x\r\n\r\n",
					"CONNECT " + target + " HTTP/1.1\r\nHost: x\r\n\r\n",
				} {
					code, body := rawRequest(t, e.tp.Host, head)
					assert.Equal(t, "403", code, "%q", head)
					assert.Contains(t, body, "a zoned address", "%q", head)
				}
				err := socksDial(t, e.tp.Host, strings.ReplaceAll(target, "%25", "%"))
				require.Error(t, err, target)
				assert.Contains(t, err.Error(), "not allowed by ruleset", target)
			}
			// git's verbose mode shows why its tunnel was refused.
			ctx, cancel := context.WithTimeout(context.Background(), nstest.Guard)
			defer cancel()
			git := e.tp.Host.Command(ctx, "git", "-c", "http.proxy=http://"+proxyAddr, "ls-remote", "https://self.test:9999/repo.git")
			git.Env = append(git.Env, "GIT_CURL_VERBOSE=1", "GIT_TERMINAL_PROMPT=0", "HOME="+t.TempDir())
			out, err := git.CombinedOutput()
			require.Error(t, err, "git ls-remote through a refused tunnel")
			assert.Contains(t, string(out), "Proxy-Status: egressd; error=destination_ip_prohibited; details=\"destination self.test (")

			// An address the host gets after egressd started is refused as
			// its own at once, and no longer once it is gone.
			const late = "2001:db8:77::1"
			hostNow := func() bool {
				code, _, body := curlHTTP(t, e.tp.Host, "http://["+late+"]:9999/")
				return code == "403" && strings.Contains(body, "an address of the proxy host")
			}
			require.False(t, hostNow())
			e.tp.Host.Run(t, "ip", "addr", "add", late+"/128", "dev", "lo", "noprefixroute")
			nstest.WaitFor(t, late+" refused as the host's", hostNow)
			e.tp.Host.Run(t, "ip", "addr", "del", late+"/128", "dev", "lo")
			nstest.WaitFor(t, late+" no longer the host's", func() bool { return !hostNow() })

			assert.Zero(t, svc.host.Load(), "a host service was reached")
			assert.Zero(t, svc.private.Load(), "the private network was reached")
			assert.Zero(t, svc.metadata.Load(), "the metadata service was reached")

			// Every refusal's access line names the reason.
			recs := waitRequestLogs(t, e.ed, 3*len(destProbes(e.tp.HostLink, routed))+12, statusIs("403"))
			recs = slices.DeleteFunc(recs, func(rec map[string]string) bool { return strings.Contains(rec["host"], "2001:db8:77::1") })
			for _, rec := range recs {
				assert.Contains(t, rec["reason"], "not allowed", "%v", rec)
				assert.Empty(t, rec["egress"], "a refused destination took an egress address: %v", rec)
			}

			// -allow-dest re-admits the private network, for all three ways
			// in, but never the link-local metadata address.
			e.replace(t, append(args, "-allow-dest", "10.9.9.0/24", "-allow-dest", "169.254.0.0/16")...)
			code, _, body := curlHTTP(t, e.tp.Host, "http://private.test/")
			assert.Equal(t, "200", code, body)
			connect, verbose := curlConnect(t, e.tp.Host, "http://10.9.9.1/")
			assert.Equal(t, "200", connect, verbose)
			require.NoError(t, socksDial(t, e.tp.Host, "private.test:80"))
			assert.EqualValues(t, 3, svc.private.Load())
			code, _, body = curlHTTP(t, e.tp.Host, "http://metadata.test/")
			assert.Equal(t, "403", code, body)
			assert.Zero(t, svc.metadata.Load())
		})
	}
}

// TestPortPolicy: mail (25) and SSH (22) on an upstream are refused through
// CONNECT, SOCKS5 and plain HTTP alike with 403 (SOCKS5: "not allowed by
// ruleset") naming the port and the setting, and nothing reaches them;
// -connect-ports admits a port named alone.
func TestPortPolicy(t *testing.T) {
	t.Parallel()
	e := setup(t)
	svc := startDestServices(t, e)
	e.ed = e.restart(t, "-socks5", socksAddr)
	for _, port := range []string{"25", "22"} {
		target := nstest.UpstreamName + ":" + port
		code, hdr, body := curlHTTP(t, e.tp.Host, "http://"+target+"/")
		assert.Equal(t, "403", code)
		assert.Equal(t, "port "+port+" not allowed for plain HTTP (-http-ports 80,443,1024-65535)\n", body)
		assert.Contains(t, hdr, "Proxy-Status: egressd; error=http_request_denied; details=\"port "+port)
		connect, verbose := curlConnect(t, e.tp.Host, "http://"+target+"/")
		assert.Equal(t, "403", connect)
		assert.Contains(t, verbose, "port "+port+" not allowed for tunnels (-connect-ports 443,80)")
		err := socksDial(t, e.tp.Host, target)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "not allowed by ruleset")
	}
	assert.Zero(t, svc.mail.Load(), "mail or SSH was reached")

	e.replace(t, "-socks5", socksAddr, "-connect-ports", "443,80,25")
	require.NoError(t, socksDial(t, e.tp.Host, nstest.UpstreamName+":25"))
	assert.EqualValues(t, 1, svc.mail.Load())
}

// curlHTTP fetches url through egressd with curl -x and returns the status,
// the response head and the body.
func curlHTTP(t *testing.T, ns *nstest.NS, url string) (code, head, body string) {
	t.Helper()
	out, err := ns.Output("curl", "-q", "-sS", "-i", "--max-time", "30", "-x", "http://"+proxyAddr, url)
	require.NoError(t, err)
	br := bufio.NewReader(strings.NewReader(out))
	resp, err := http.ReadResponse(br, nil)
	require.NoError(t, err, "%s", out)
	b, _ := io.ReadAll(resp.Body)
	var h strings.Builder
	require.NoError(t, resp.Header.Write(&h))
	return resp.Status[:3], h.String(), string(b)
}

// curlConnect asks egressd for a tunnel with curl -v -p and returns the
// proxy's answer to CONNECT and curl's verbose output.
func curlConnect(t *testing.T, ns *nstest.NS, url string) (connect, verbose string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), nstest.Guard)
	defer cancel()
	cmd := ns.Command(ctx, "curl", "-q", "-sS", "-v", "-o", "/dev/null", "--max-time", "30",
		"-w", "%{http_connect}", "-x", "http://"+proxyAddr, "-p", url)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	_ = cmd.Run() // curl fails when the tunnel is refused
	return strings.TrimSpace(stdout.String()), stderr.String()
}

// rawRequest sends a request head to egressd from H exactly as given and
// returns the status code and body of the answer.
func rawRequest(t *testing.T, ns *nstest.NS, head string) (code, body string) {
	t.Helper()
	c, err := ns.DialContext(guardCtx(t), "tcp", proxyAddr)
	require.NoError(t, err)
	defer c.Close()
	c.SetDeadline(time.Now().Add(nstest.Guard))
	_, err = io.WriteString(c, head)
	require.NoError(t, err)
	method, _, _ := strings.Cut(head, " ")
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: method})
	require.NoError(t, err)
	b, _ := io.ReadAll(resp.Body)
	return resp.Status[:3], string(b)
}

// socksDial connects through egressd's SOCKS5 listener from H with
// golang.org/x/net/proxy, which sends names (zoned ones included) as
// domains, and closes the tunnel at once.
func socksDial(t *testing.T, ns *nstest.NS, target string) error {
	t.Helper()
	d, err := proxy.SOCKS5("tcp", socksAddr, nil, nsDialer{ns})
	require.NoError(t, err)
	host, port, err := net.SplitHostPort(target)
	require.NoError(t, err)
	c, err := d.(proxy.ContextDialer).DialContext(guardCtx(t), "tcp", net.JoinHostPort(host, port))
	if err != nil {
		return err
	}
	// Read what the service says, so that it has surely accepted.
	_, _ = c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	_, err = io.ReadAll(c)
	c.Close()
	return err
}
