package proxy

import (
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/proxy/auth"
)

// fakeHold holds "addresses" on loopback: hold number i dials from
// 127.0.0.(10+i), so the upstream tells held addresses apart by the peer
// address it sees; per-request dials (the fakeDialer) leave from 127.0.0.1.
type fakeHold struct {
	mu       sync.Mutex
	holds    int
	released int
	dials    int
}

func (f *fakeHold) Hold(context.Context) (DialFunc, func(), error) {
	f.mu.Lock()
	f.holds++
	src := &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(10+f.holds))}
	f.mu.Unlock()
	var once sync.Once
	release := func() {
		once.Do(func() {
			f.mu.Lock()
			f.released++
			f.mu.Unlock()
		})
	}
	dial := func(ctx context.Context, _, addr string) (net.Conn, error) {
		f.mu.Lock()
		f.dials++
		f.mu.Unlock()
		nd := net.Dialer{LocalAddr: src}
		c, err := nd.DialContext(ctx, "tcp4", addr)
		if err != nil {
			return nil, err
		}
		return boundConn{c.(*net.TCPConn)}, nil
	}
	return dial, release, nil
}

func (f *fakeHold) counts() (holds, released, dials int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.holds, f.released, f.dials
}

// connUpstream records, per request, the peer (host:port, so one entry per
// upstream connection) and the session header it got, and answers with the
// peer's host.
type connUpstream struct {
	addr    string
	mu      sync.Mutex
	peers   []string
	headers []string
}

func startConnUpstream(t *testing.T) *connUpstream {
	t.Helper()
	u := &connUpstream{}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	u.addr = ln.Addr().String()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.peers = append(u.peers, r.RemoteAddr)
		u.headers = append(u.headers, r.Header.Get(SessionHeader)+r.Header.Get("Proxy-Authorization")+r.Header.Get(RotateHeader))
		u.mu.Unlock()
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		fmt.Fprintln(w, host)
	})}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-done
	})
	return u
}

// take returns and forgets what the upstream recorded.
func (u *connUpstream) take() (peers, headers []string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	peers, headers = u.peers, u.headers
	u.peers, u.headers = nil, nil
	return peers, headers
}

// hosts returns the distinct hosts and the distinct host:port pairs of peers.
func hosts(peers []string) (hostSet, connSet map[string]bool) {
	hostSet, connSet = map[string]bool{}, map[string]bool{}
	for _, p := range peers {
		h, _, _ := net.SplitHostPort(p)
		hostSet[h] = true
		connSet[p] = true
	}
	return hostSet, connSet
}

// get fetches url with the session header key (none if empty) and returns
// the body, failing the test unless the answer is 200.
func get(t *testing.T, c *http.Client, rawURL, key string) string {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, rawURL, nil)
	require.NoError(t, err)
	if key != "" {
		req.Header.Set(SessionHeader, key)
	}
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, "body %q", body)
	return string(body)
}

func withRotate(r Rotate, h *fakeHold) proxyOpt {
	return func(c *Config) { c.Rotate, c.Hold = r, h.Hold }
}

// fakeClock is the session table's clock, moved by the test.
type fakeClock struct{ offset atomic.Int64 }

func (c *fakeClock) now() time.Time          { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *fakeClock) advance(d time.Duration) { c.offset.Add(int64(d)) }

func TestRotateSession(t *testing.T) {
	h := &fakeHold{}
	p := startProxy(t, nil, withRotate(RotateSession, h))
	clock := &fakeClock{}
	p.sessions.mu.Lock()
	p.sessions.now = clock.now
	p.sessions.mu.Unlock()
	up := startConnUpstream(t)
	c := p.client(t)
	target := "http://" + up.addr + "/"

	// Key a: one held address, one upstream connection kept alive.
	for range 10 {
		get(t, c, target, "a")
	}
	peers, headers := up.take()
	hostsA, conns := hosts(peers)
	assert.Len(t, hostsA, 1, "key a left from one address: %v", peers)
	assert.Len(t, conns, 1, "key a reused one upstream connection: %v", peers)
	assert.NotContains(t, hostsA, "127.0.0.1", "key a left from a held address")
	for _, hd := range headers {
		assert.Empty(t, hd, "the session header and credentials are not forwarded")
	}

	// Key b: another address.
	for range 10 {
		get(t, c, target, "b")
	}
	peers, _ = up.take()
	hostsB, conns := hosts(peers)
	assert.Len(t, hostsB, 1)
	assert.Len(t, conns, 1)
	for a := range hostsB {
		assert.NotContains(t, hostsA, a, "keys a and b share an address")
	}

	// No key: per request, through the fresh-address dialer.
	before := p.dialer.calls()
	for range 3 {
		assert.Equal(t, "127.0.0.1\n", get(t, c, target, ""))
	}
	assert.Equal(t, before+3, p.dialer.calls(), "one fresh dial per request without a key")
	up.take()

	// The proxy URL's user name session-a is key a.
	userClient := &http.Client{Transport: &http.Transport{
		Proxy: http.ProxyURL(&url.URL{Scheme: "http", User: url.UserPassword("session-a", "x"), Host: p.addr}),
	}}
	t.Cleanup(userClient.CloseIdleConnections)
	body := get(t, userClient, target, "")
	assert.Contains(t, hostsA, body[:len(body)-1], "user name session-a leaves from key a's address")
	_, headers = up.take()
	assert.Equal(t, []string{""}, headers, "Proxy-Authorization is not forwarded")

	// CONNECT with the header leaves from key a's address too.
	tcp := startTCPUpstream(t)
	conn, br := p.raw(t)
	_, err := io.WriteString(conn, "CONNECT "+tcp.addr+" HTTP/1.1\r\nHost: "+tcp.addr+"\r\n"+SessionHeader+": a\r\n\r\n")
	require.NoError(t, err)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	upConn := tcp.accept(t)
	peerHost, _, _ := net.SplitHostPort(upConn.RemoteAddr().String())
	assert.Contains(t, hostsA, peerHost, "the tunnel of key a leaves from its address")

	// An open tunnel keeps its session alive, however long it idles.
	clock.advance(DefaultSessionIdle + time.Second)
	p.sessions.janitor()
	assert.Equal(t, 1, sessionCount(p.sessions), "session a, with its tunnel open, is not idle")
	_, released, _ := h.counts()
	assert.Equal(t, 1, released, "idle session b gave its address back")
	require.NoError(t, conn.Close())
	require.NoError(t, upConn.Close())
	require.Eventually(t, func() bool { return p.Active() == 0 }, 5*time.Second, time.Millisecond)

	// Idle past SessionIdle: the next request of key a gets a new address.
	clock.advance(DefaultSessionIdle + time.Second)
	body = get(t, c, target, "a")
	assert.NotContains(t, hostsA, body[:len(body)-1], "a session that idled out keeps no address")
	holds, released, _ := h.counts()
	assert.Equal(t, 3, holds)
	assert.Equal(t, 2, released)
}

func TestRotateSessionLimit(t *testing.T) {
	h := &fakeHold{}
	p := startProxy(t, nil, withRotate(RotateSession, h), func(c *Config) { c.MaxSessions = 1 })
	up := startConnUpstream(t)
	c := p.client(t)
	target := "http://" + up.addr + "/"

	get(t, c, target, "a")
	req, err := http.NewRequest(http.MethodGet, target, nil)
	require.NoError(t, err)
	req.Header.Set(SessionHeader, "b")
	resp, err := c.Do(req)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assertCleanErrorBody(t, string(body))
	assert.Contains(t, string(body), "too many sessions")
	get(t, c, target, "a") // the open session still works
	get(t, c, target, "")  // and so do requests without a key
}

func TestRotateConnection(t *testing.T) {
	h := &fakeHold{}
	p := startProxy(t, nil, withRotate(RotateConnection, h))
	up := startConnUpstream(t)
	target := "http://" + up.addr + "/"

	var seen []map[string]bool
	for range 2 {
		c := p.client(t)
		for range 5 {
			get(t, c, target, "")
		}
		peers, _ := up.take()
		hs, conns := hosts(peers)
		assert.Len(t, hs, 1, "one client connection, one address: %v", peers)
		assert.Len(t, conns, 1, "the client connection's upstream connection is kept alive")
		seen = append(seen, hs)
		c.CloseIdleConnections()
	}
	for a := range seen[0] {
		assert.NotContains(t, seen[1], a, "two client connections share an address")
	}
	assert.Zero(t, p.dialer.calls(), "nothing dialed from a fresh address")
	require.Eventually(t, func() bool {
		holds, released, _ := h.counts()
		return holds == 2 && released == 2
	}, 5*time.Second, time.Millisecond, "closed client connections gave their addresses back")

	// A tunnel holds its connection's address until it ends.
	tcp := startTCPUpstream(t)
	conn, _, resp := p.connect(t, tcp.addr, nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	upConn := tcp.accept(t)
	_, released, _ := h.counts()
	assert.Equal(t, 2, released)
	require.NoError(t, conn.Close())
	require.NoError(t, upConn.Close())
	require.Eventually(t, func() bool {
		_, released, _ := h.counts()
		return released == 3
	}, 5*time.Second, time.Millisecond, "the tunnel's address was given back")
}

// TestUserSession: without users, a proxy user name session-KEY carries a
// session key; with users, USER-session-KEY does, and the user must
// authenticate. The credentials never stay in the request.
func TestUserSession(t *testing.T) {
	basic := func(s string) string { return "Basic " + base64.StdEncoding.EncodeToString([]byte(s)) }
	users := testUsers(t, "alice", "pw")
	tests := []struct {
		name      string
		users     *auth.Users
		auth      string // Proxy-Authorization
		user, key string
		status    int // 0: admitted
	}{
		{name: "none"},
		{name: "user", auth: basic("session-k1:x"), key: "k1"},
		{name: "user lower-case scheme", auth: "basic " + basic("session-k1:")[6:], key: "k1"},
		{name: "other user", auth: basic("alice:x")},
		{name: "empty key", auth: basic("session-:x")},
		{name: "not basic", auth: "Bearer session-k1"},
		{name: "bad base64", auth: "Basic !!!"},
		{name: "auth user", users: users, auth: basic("alice:pw"), user: "alice"},
		{name: "auth user with key", users: users, auth: basic("alice-session-k1:pw"), user: "alice", key: "k1"},
		{name: "auth key with dashes", users: users, auth: basic("alice-session-a-session-b:pw"), user: "alice", key: "a-session-b"},
		{name: "auth bare session user", users: users, auth: basic("session-k1:pw"), status: http.StatusProxyAuthRequired},
		{name: "auth wrong password", users: users, auth: basic("alice-session-k1:nope"), status: http.StatusProxyAuthRequired},
		{name: "auth none", users: users, status: http.StatusProxyAuthRequired},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := New(Config{Dial: (&fakeDialer{}).Dial, Access: Access{Users: tt.users}})
			require.NoError(t, err)
			r := httptest.NewRequest(http.MethodGet, "http://example.org/", nil)
			r.RemoteAddr = "127.0.0.1:40000"
			if tt.auth != "" {
				r.Header.Set("Proxy-Authorization", tt.auth)
			}
			w := httptest.NewRecorder()
			x := request{access: s.access.Load()}
			key, ok := s.authorize(w, r, &x)
			user := x.user
			assert.Empty(t, r.Header.Get("Proxy-Authorization"), "credentials removed")
			if tt.status != 0 {
				assert.False(t, ok)
				assert.Equal(t, tt.status, w.Code)
				assert.Equal(t, `Basic realm="egressd"`, w.Header().Get("Proxy-Authenticate"))
				return
			}
			require.True(t, ok, "status %d", w.Code)
			assert.Equal(t, tt.user, user)
			assert.Equal(t, tt.key, key)
		})
	}
}

func TestRotateValidate(t *testing.T) {
	h := &fakeHold{}
	d := (&fakeDialer{}).Dial
	tests := []struct {
		name string
		cfg  Config
		err  string
	}{
		{"default", Config{Dial: d}, ""},
		{"session", Config{Dial: d, Rotate: RotateSession, Hold: h.Hold}, ""},
		{"session without hold", Config{Dial: d, Rotate: RotateSession}, `Rotate "session" needs Hold`},
		{"connection without hold", Config{Dial: d, Rotate: RotateConnection}, `Rotate "connection" needs Hold`},
		{"unknown", Config{Dial: d, Rotate: "sometimes"}, `Rotate "sometimes"`},
		{"negative idle", Config{Dial: d, SessionIdle: -1}, "SessionIdle is negative"},
		{"negative max", Config{Dial: d, MaxSessions: -1}, "MaxSessions is negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if tt.err == "" {
				assert.NoError(t, err)
			} else {
				assert.ErrorContains(t, err, tt.err)
			}
		})
	}
}

// sessionCount returns the number of sessions t holds.
func sessionCount(t *sessionTable) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}
