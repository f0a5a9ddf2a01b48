package proxy

import (
	"bufio"
	"encoding/base64"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/bcrypt"

	"github.com/egressd/egressd/proxy/auth"
	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/socks5"
)

// testUsers returns users with one user and password, hashed at bcrypt's
// lowest cost.
func testUsers(t testing.TB, user, pass string) *auth.Users {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(pass), bcrypt.MinCost)
	require.NoError(t, err)
	u, err := auth.Parse(strings.NewReader(user+":"+string(h)+"\n"), "test")
	require.NoError(t, err)
	return u
}

func withAccess(a Access) proxyOpt { return func(c *Config) { c.Access = a } }

// elsewhere admits no loopback client.
var elsewhere = Access{Allow: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}}

// proxyRequest sends a raw request head to the proxy and returns its answer.
func proxyRequest(t *testing.T, p *testProxy, head string) *http.Response {
	t.Helper()
	c, br := p.raw(t)
	_, err := io.WriteString(c, head)
	require.NoError(t, err)
	method, _, _ := strings.Cut(head, " ")
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	require.NoError(t, err)
	var body []byte
	if resp.StatusCode != http.StatusOK || method != http.MethodConnect { // a tunnel's body never ends
		body, err = io.ReadAll(resp.Body)
		require.NoError(t, err)
	}
	resp.Body = io.NopCloser(strings.NewReader(string(body)))
	require.NoError(t, c.Close())
	return resp
}

func basicAuth(userPass string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(userPass))
}

// TestAccessHTTP: a client outside the allow list gets 403 for plain HTTP
// and CONNECT, is never dialed for, and its connection is closed; with
// users, missing or wrong credentials get 407 with the Basic challenge, right
// ones pass, and Proxy-Authorization never reaches the upstream.
func TestAccessHTTP(t *testing.T) {
	var seen sync.Map // Proxy-Authorization values the upstream saw
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen.Store(r.Header.Get("Proxy-Authorization"), true)
		io.WriteString(w, "ok")
	}))
	t.Cleanup(up.Close)
	target := strings.TrimPrefix(up.URL, "http://")

	t.Run("not allowed", func(t *testing.T) {
		var logs logBuffer
		p := startProxy(t, nil, withAccess(elsewhere), withLogger(slog.New(slog.NewTextHandler(&logs, nil))))
		for _, head := range []string{
			"GET " + up.URL + "/ HTTP/1.1\r\nHost: " + target + "\r\n\r\n",
			"CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n\r\n",
		} {
			resp := proxyRequest(t, p, head)
			assert.Equal(t, http.StatusForbidden, resp.StatusCode)
			assert.True(t, resp.Close, "the connection is closed")
			body, _ := io.ReadAll(resp.Body)
			assertCleanErrorBody(t, string(body))
			assert.Equal(t, errNotAllowed.body(), string(body))
		}
		assert.Zero(t, p.dialer.calls(), "nothing dialed for a refused client")
		assert.Equal(t, 2, strings.Count(logs.String(), "status=403"))
	})

	users := testUsers(t, "alice", "pw")
	var logs logBuffer
	p := startProxy(t, nil, withAccess(Access{Users: users}), withLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	tests := []struct {
		name   string
		auth   string
		status int
	}{
		{"missing", "", http.StatusProxyAuthRequired},
		{"wrong password", basicAuth("alice:nope"), http.StatusProxyAuthRequired},
		{"unknown user", basicAuth("bob:pw"), http.StatusProxyAuthRequired},
		{"not basic", "Digest username=alice", http.StatusProxyAuthRequired},
		{"right", basicAuth("alice:pw"), http.StatusOK},
		{"right, again (cached)", basicAuth("alice:pw"), http.StatusOK},
		{"right with session key", basicAuth("alice-session-k1:pw"), http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hdr := ""
			if tt.auth != "" {
				hdr = "Proxy-Authorization: " + tt.auth + "\r\n"
			}
			resp := proxyRequest(t, p, "GET "+up.URL+"/ HTTP/1.1\r\nHost: "+target+"\r\n"+hdr+"\r\n")
			assert.Equal(t, tt.status, resp.StatusCode)
			if tt.status == http.StatusProxyAuthRequired {
				assert.Equal(t, `Basic realm="egressd"`, resp.Header.Get("Proxy-Authenticate"))
			}

			resp = proxyRequest(t, p, "CONNECT "+target+" HTTP/1.1\r\nHost: "+target+"\r\n"+hdr+"\r\n")
			assert.Equal(t, tt.status, resp.StatusCode, "CONNECT")
			if tt.status == http.StatusProxyAuthRequired {
				assert.Equal(t, `Basic realm="egressd"`, resp.Header.Get("Proxy-Authenticate"))
			}
		})
	}
	seen.Range(func(k, _ any) bool {
		assert.Empty(t, k, "the upstream saw Proxy-Authorization")
		return true
	})

	// Go's client, with the credentials in the proxy URL, through a tunnel:
	// the upstream gets only what the client sends inside it.
	u := startTCPUpstream(t)
	c, br := p.raw(t)
	_, err := io.WriteString(c, "CONNECT "+u.addr+" HTTP/1.1\r\nHost: "+u.addr+"\r\nProxy-Authorization: "+basicAuth("alice:pw")+"\r\n\r\nhello")
	require.NoError(t, err)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	s := u.accept(t)
	assert.Equal(t, "hello", string(readFull(t, s, 5)), "the tunnel carries only the client's bytes")
	require.NoError(t, c.Close())
	require.NoError(t, s.Close())
	require.Eventually(t, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond)

	log := logs.String()
	assert.NotContains(t, log, "pw", "no password in the log")
	assert.NotContains(t, log, "nope", "no password in the log")
	assert.NotContains(t, log, basicAuth("alice:pw")[6:], "no credentials in the log")
	assert.Contains(t, log, "status=200")
	assert.Contains(t, log, "user=alice")
	assert.NotContains(t, log, "user=alice-session", "the user, without the session key")
}

// TestAccessSOCKS5: a client outside the allow list gets "not allowed by
// ruleset"; with users, no authentication is not acceptable, wrong
// credentials fail the subnegotiation, right ones get through.
func TestAccessSOCKS5(t *testing.T) {
	u := startTCPUpstream(t)

	t.Run("not allowed", func(t *testing.T) {
		p := startProxy(t, nil, withAccess(elsewhere))
		addr := p.serveSOCKS(t)
		rep, _ := socksConnect(t, socksClient(t, addr), "", u.addr)
		assert.EqualValues(t, socks5.ReplyNotAllowed, rep)

		// A client offering user/password only: read, not checked, refused.
		c := socksClient(t, addr)
		_, err := c.Write([]byte{5, 1, socks5.MethodUserPass, 1, 1, 'x', 1, 'y'})
		require.NoError(t, err)
		assert.Equal(t, []byte{5, socks5.MethodUserPass, 1, 0, 5, socks5.ReplyNotAllowed}, readFull(t, c, 6))
		assert.Zero(t, p.dialer.calls())
	})

	var logs logBuffer
	p := startProxy(t, nil, withAccess(Access{Users: testUsers(t, "alice", "pw")}),
		withLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	addr := p.serveSOCKS(t)

	// No authentication offered: no acceptable method.
	c := socksClient(t, addr)
	_, err := c.Write([]byte{5, 1, socks5.MethodNoAuth})
	require.NoError(t, err)
	assert.Equal(t, []byte{5, socks5.MethodNoAcceptable}, readFull(t, c, 2))

	for _, tt := range []struct {
		user string
		ok   bool
	}{{"alice", true}, {"alice-session-k1", true}, {"bob", false}} {
		// socksConnect sends the password "pw".
		c := socksClient(t, addr)
		if tt.ok {
			rep, _ := socksConnect(t, c, tt.user, u.addr)
			assert.EqualValues(t, socks5.ReplySucceeded, rep, tt.user)
			s := u.accept(t)
			_, err := io.WriteString(c, "hi")
			require.NoError(t, err)
			assert.Equal(t, "hi", string(readFull(t, s, 2)))
			require.NoError(t, c.Close())
			require.NoError(t, s.Close())
			continue
		}
		_, err := c.Write(append(append([]byte{5, 2, socks5.MethodNoAuth, socks5.MethodUserPass, 1, byte(len(tt.user))}, tt.user...), 2, 'p', 'w'))
		require.NoError(t, err)
		assert.Equal(t, []byte{5, socks5.MethodUserPass, 1, 1}, readFull(t, c, 4), "user/password chosen, then failure")
	}
	// Wrong password for a known user.
	c = socksClient(t, addr)
	_, err = c.Write([]byte{5, 1, socks5.MethodUserPass, 1, 5, 'a', 'l', 'i', 'c', 'e', 2, 'p', 'x'})
	require.NoError(t, err)
	assert.Equal(t, []byte{5, socks5.MethodUserPass, 1, 1}, readFull(t, c, 4))

	require.Eventually(t, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond)
	log := logs.String()
	assert.Contains(t, log, "user=alice")
	assert.Contains(t, log, "status=407")
	assert.NotContains(t, log, "pw")
	assert.NotContains(t, log, "px")
}

// TestReloadUnderLoad swaps the access rules and the shaper while requests
// run (go test -race checks the swap), and shows that the next request
// uses what was swapped in: a tunnel opened before a swap that would refuse
// it keeps going.
func TestReloadUnderLoad(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	t.Cleanup(up.Close)
	u := startTCPUpstream(t)
	p := startProxy(t, nil)

	// A tunnel, open across every swap below.
	tc, tbr, resp := p.connect(t, u.addr, nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	ts := u.accept(t)

	strict, err := shape.ParseRule("127.0.0.1=1r/h,burst=1,wait=10ms")
	require.NoError(t, err)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	client := p.client(t)
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := client.Get(up.URL)
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}
		})
	}
	for i := range 50 {
		if i%2 == 0 {
			sh, err := shape.New(shape.Config{Rules: []shape.Rule{strict}})
			require.NoError(t, err)
			p.SetShaper(sh)
			p.SetAccess(anyPort(elsewhere))
		} else {
			p.SetShaper(nil)
			p.SetAccess(anyPort(Access{}))
		}
	}
	close(stop)
	wg.Wait()

	// The last swap admits loopback and shapes nothing; swap to refusing.
	p.SetAccess(anyPort(elsewhere))
	resp, err = client.Get(up.URL)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusForbidden, resp.StatusCode, "the next request uses the new rules")

	// The tunnel opened before still carries bytes both ways.
	_, err = io.WriteString(tc, "still")
	require.NoError(t, err)
	assert.Equal(t, "still", string(readFull(t, ts, 5)))
	_, err = io.WriteString(ts, "here")
	require.NoError(t, err)
	assert.Equal(t, "here", string(readFull(t, bufio.NewReader(tbr), 4)))
	require.NoError(t, tc.Close())

	// A strict shaper: the first request passes, the second gets 429.
	p.SetAccess(anyPort(Access{}))
	sh, err := shape.New(shape.Config{Rules: []shape.Rule{strict}})
	require.NoError(t, err)
	p.SetShaper(sh)
	for _, want := range []int{http.StatusOK, http.StatusTooManyRequests} {
		resp, err := client.Get(up.URL)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, want, resp.StatusCode)
	}
}

func TestAccessDefaults(t *testing.T) {
	a := Access{}.withDefaults()
	for addr, want := range map[string]bool{
		"127.0.0.1": true, "127.1.2.3": true, "::1": true, "::ffff:127.0.0.1": true,
		"10.0.5.2": false, "::2": false, "2001:db8::1": false,
	} {
		assert.Equal(t, want, a.admits(netip.MustParseAddr(addr)), addr)
	}
	b := Access{Allow: []netip.Prefix{netip.MustParsePrefix("::ffff:10.0.5.0/120"), netip.MustParsePrefix("2001:db8::7/64")}}.withDefaults()
	assert.True(t, b.admits(netip.MustParseAddr("10.0.5.9")), "IPv4-mapped networks match IPv4 clients")
	assert.True(t, b.admits(netip.MustParseAddr("2001:db8::1234")), "host bits are ignored")
	assert.False(t, b.admits(netip.MustParseAddr("127.0.0.1")), "an allow list replaces the default")
	assert.False(t, b.admitsConn(&net.UnixAddr{Name: "x", Net: "unix"}))
}
