package proxy

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy/socks5"
	"github.com/egressd/egressd/proxy/stats"
)

// getWith fetches url through c with the extra headers hdr and returns the
// status and body.
func getWith(t *testing.T, c *http.Client, rawURL string, hdr ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, rawURL, nil)
	require.NoError(t, err)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Add(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, strings.TrimSpace(string(body))
}

// userClient is an HTTP client of the proxy at p with the proxy user name
// user.
func userClient(t *testing.T, p *testProxy, user string) *http.Client {
	c := &http.Client{Transport: &http.Transport{
		Proxy: http.ProxyURL(&url.URL{Scheme: "http", User: url.UserPassword(user, "x"), Host: p.addr}),
	}}
	t.Cleanup(c.CloseIdleConnections)
	return c
}

// rotations returns the rotation counters of p.
func rotations(p *testProxy) map[string]uint64 { return p.SessionStats().Rotations }

// TestRotateOnDemand: a session's address changes after each way to ask,
// the header, the user name's -rotate (plain HTTP and SOCKS5) and
// RotateSession, and only then; the request that asks leaves from the new
// address already. Neither header goes upstream.
func TestRotateOnDemand(t *testing.T) {
	h := &fakeHold{}
	p := startProxy(t, nil, withRotate(RotateSession, h))
	up := startConnUpstream(t)
	c := p.client(t)
	target := "http://" + up.addr + "/"
	session := func(hdr ...string) string {
		t.Helper()
		code, body := getWith(t, c, target, append([]string{SessionHeader, "a"}, hdr...)...)
		require.Equal(t, http.StatusOK, code, body)
		return body
	}

	first := session()
	assert.Equal(t, first, session(), "no ask, same address")
	seen := []string{first}
	fresh := func(how, addr string) {
		t.Helper()
		assert.NotContains(t, seen, addr, "%s: a new address", how)
		assert.NotEqual(t, "127.0.0.1", addr, "%s: a held address", how)
		seen = append(seen, addr)
	}

	byHeader := session(RotateHeader, "1")
	fresh("X-Egress-Rotate: 1", byHeader)
	assert.Equal(t, byHeader, session(), "the next request keeps the new address")
	_, headers := up.take()
	for _, hd := range headers {
		assert.Empty(t, hd, "neither the session nor the rotate header is forwarded")
	}

	code, byUser := getWith(t, userClient(t, p, "session-a-rotate"), target)
	require.Equal(t, http.StatusOK, code, byUser)
	fresh("user session-a-rotate", byUser)
	assert.Equal(t, byUser, session(), "the header's key a is the user name's")
	code, body := getWith(t, userClient(t, p, "session-a"), target)
	require.Equal(t, http.StatusOK, code, body)
	assert.Equal(t, byUser, body, "user session-a: no ask")

	old, rotated, err := p.RotateSession(context.Background(), "a")
	require.NoError(t, err)
	assert.True(t, rotated)
	assert.Equal(t, byUser, old.String(), "the address given up")
	byAdmin := session()
	fresh("RotateSession", byAdmin)
	assert.Equal(t, byAdmin, session())

	// SOCKS5: session-a-rotate leaves from a new address, session-a from
	// the session's.
	socksAddr := p.serveSOCKS(t)
	tcp := startTCPUpstream(t)
	socksPeer := func(user string) string {
		t.Helper()
		sc := socksClient(t, socksAddr)
		rep, _ := socksConnect(t, sc, user, tcp.addr)
		require.EqualValues(t, socks5.ReplySucceeded, rep, "user %q", user)
		uc := tcp.accept(t)
		host, _, err := net.SplitHostPort(uc.RemoteAddr().String())
		require.NoError(t, err)
		return host
	}
	bySOCKS := socksPeer("session-a-rotate")
	fresh("SOCKS5 user session-a-rotate", bySOCKS)
	assert.Equal(t, bySOCKS, socksPeer("session-a"))
	assert.Equal(t, bySOCKS, session())

	assert.Equal(t, map[string]uint64{"header": 1, "user_name": 2, "admin": 1, "status": 0}, rotations(p))
	assert.Equal(t, 1, p.SessionStats().Open)

	// Asking for a new address of a session that has none yet, or of a
	// key with no session, rotates nothing.
	code, body = getWith(t, c, target, SessionHeader, "new", RotateHeader, "1")
	require.Equal(t, http.StatusOK, code, body)
	assert.NotContains(t, seen, body)
	_, _, err = p.RotateSession(context.Background(), "none")
	assert.ErrorIs(t, err, ErrNoSession)
	assert.Equal(t, map[string]uint64{"header": 1, "user_name": 2, "admin": 1, "status": 0}, rotations(p))

	holds, released, _ := h.counts()
	assert.Equal(t, 6, holds, "a, its four rotations, and new")
	assert.Equal(t, 4, released, "the four addresses given up")
}

// TestRotateAskRefused: an ask for a new address that is not 1, or that
// names no session, is refused with a 400 that says why; outside -rotate
// session the header is removed and changes nothing.
func TestRotateAskRefused(t *testing.T) {
	basic := func(s string) string { return "Basic " + base64.StdEncoding.EncodeToString([]byte(s)) }
	tests := []struct {
		name   string
		rotate Rotate
		hdr    []string
		status int
		reason string
	}{
		{"not 1", RotateSession, []string{SessionHeader, "a", RotateHeader, "yes"}, 400, `X-Egress-Rotate must be 1, not "yes"`},
		{"zero", RotateSession, []string{SessionHeader, "a", RotateHeader, "0"}, 400, `X-Egress-Rotate must be 1, not "0"`},
		{"empty", RotateSession, []string{SessionHeader, "a", RotateHeader, ""}, 400, `X-Egress-Rotate must be 1, not ""`},
		{"twice", RotateSession, []string{SessionHeader, "a", RotateHeader, "1", RotateHeader, "1"}, 400, `X-Egress-Rotate must be 1, not "1, 1"`},
		{"no key", RotateSession, []string{RotateHeader, "1"}, 400, "asking for a new address needs a session key"},
		{"empty key in the user name", RotateSession, []string{"Proxy-Authorization", basic("session--rotate:x")}, 400, "asking for a new address needs a session key"},
		{"session", RotateSession, []string{SessionHeader, "a", RotateHeader, "1"}, 200, ""},
		{"request mode", RotateRequest, []string{RotateHeader, "yes"}, 200, ""},
		{"connection mode", RotateConnection, []string{SessionHeader, "a", RotateHeader, "1"}, 200, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := startProxy(t, nil, withRotate(tt.rotate, &fakeHold{}))
			up := startConnUpstream(t)
			code, body := getWith(t, p.client(t), "http://"+up.addr+"/", tt.hdr...)
			assert.Equal(t, tt.status, code, body)
			if tt.reason != "" {
				assert.Contains(t, body, tt.reason)
				assertCleanErrorBody(t, body+"\n")
				peers, _ := up.take()
				assert.Empty(t, peers, "a refused request does not go upstream")
				return
			}
			_, headers := up.take()
			assert.Equal(t, []string{""}, headers, "no egressd header goes upstream")
		})
	}

	// SOCKS5: session--rotate is refused before anything is dialed.
	p := startProxy(t, nil, withRotate(RotateSession, &fakeHold{}))
	tcp := startTCPUpstream(t)
	rep, _ := socksConnect(t, socksClient(t, p.serveSOCKS(t)), "session--rotate", tcp.addr)
	assert.EqualValues(t, socks5.ReplyGeneralFailure, rep)
	assert.Zero(t, p.dialer.calls())
}

// TestRotateOnStatus: with RotateOn 429, an upstream 429 to a session's
// plain HTTP request ends its address: the next request leaves from a new
// one, once however many 429s came from the old one, while a tunnel of the
// session opened before keeps moving bytes. Other statuses, and requests
// without a session, rotate nothing.
func TestRotateOnStatus(t *testing.T) {
	h := &fakeHold{}
	p := startProxy(t, nil, withRotate(RotateSession, h), func(c *Config) { c.RotateOn = []int{429} })
	var mu sync.Mutex
	status := http.StatusOK
	var arrived, gate chan struct{} // when set, requests say they arrived and wait for the gate
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		st, in, wait := status, arrived, gate
		mu.Unlock()
		if in != nil {
			in <- struct{}{}
			<-wait
		}
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		w.WriteHeader(st)
		fmt.Fprintln(w, host)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	answer := func(st int) {
		mu.Lock()
		status = st
		mu.Unlock()
	}
	c := p.client(t)
	target := "http://" + ln.Addr().String() + "/"
	get := func(key string, want int) string {
		t.Helper()
		code, body := getWith(t, c, target, SessionHeader, key)
		require.Equal(t, want, code, body)
		return body
	}

	a := get("a", 200)
	// A tunnel of session a, open across the rotation.
	tcp := startTCPUpstream(t)
	conn, br := p.raw(t)
	_, err = io.WriteString(conn, "CONNECT "+tcp.addr+" HTTP/1.1\r\nHost: "+tcp.addr+"\r\n"+SessionHeader+": a\r\n\r\n")
	require.NoError(t, err)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	upConn := tcp.accept(t)
	tunnelHost, _, _ := net.SplitHostPort(upConn.RemoteAddr().String())
	assert.Equal(t, a, tunnelHost, "the tunnel leaves from session a's address")
	echo := func(msg string) {
		t.Helper()
		_, err := io.WriteString(conn, msg)
		require.NoError(t, err)
		assert.Equal(t, msg, string(readFull(t, upConn, len(msg))))
		_, err = io.WriteString(upConn, msg)
		require.NoError(t, err)
		assert.Equal(t, msg, string(readFull(t, br, len(msg))))
	}
	echo("before")

	answer(http.StatusForbidden)
	assert.Equal(t, a, get("a", 403), "403 is not in RotateOn")
	b := get("b", 403)
	assert.NotEqual(t, a, b)
	assert.Equal(t, b, get("b", 403), "403 is not in RotateOn")
	answer(http.StatusTooManyRequests)
	assert.Equal(t, a, get("a", 429), "the 429 itself came from the old address")
	answer(http.StatusOK)
	next := get("a", 200)
	assert.NotEqual(t, a, next, "after a 429 the next request leaves from a new address")
	assert.Equal(t, next, get("a", 200))
	echo("after the rotation")

	// A burst of 429s from one address rotates once: all four requests
	// are upstream before the first answer.
	mu.Lock()
	status, arrived, gate = http.StatusTooManyRequests, make(chan struct{}), make(chan struct{})
	in, open := arrived, gate
	mu.Unlock()
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			code, _ := getWith(t, c, target, SessionHeader, "a")
			assert.Equal(t, 429, code)
		})
	}
	for range 4 {
		<-in
	}
	mu.Lock()
	arrived, gate = nil, nil
	mu.Unlock()
	close(open)
	wg.Wait()
	answer(http.StatusOK)
	third := get("a", 200)
	assert.NotEqual(t, next, third)
	assert.NotEqual(t, a, third)
	assert.EqualValues(t, 2, rotations(p)["status"], "one rotation per address")
	echo("after two rotations")

	// Without a session a 429 rotates nothing (there is nothing to keep).
	answer(http.StatusTooManyRequests)
	code, _ := getWith(t, c, target)
	assert.Equal(t, 429, code)
	assert.EqualValues(t, 2, rotations(p)["status"])
}

// TestRotateRace: requests of a session, plain HTTP and CONNECT, go on
// while its address rotates under them: none fails (a dial that took the
// old address just before it was given back is made again from the new
// one), and the race detector sees the session's address swapped safely.
func TestRotateRace(t *testing.T) {
	h := &fakeHold{}
	p := startProxy(t, nil, withRotate(RotateSession, h))
	up := startConnUpstream(t)
	tcp := startTCPUpstream(t)
	target := "http://" + up.addr + "/"
	c := p.client(t)
	getWith(t, c, target, SessionHeader, "a")

	// fakeHold has some 240 loopback addresses: about 100 rotations.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var wg sync.WaitGroup
	wg.Go(func() {
		for ctx.Err() == nil {
			_, _, err := p.RotateSession(context.Background(), "a")
			assert.NoError(t, err)
			time.Sleep(10 * time.Millisecond)
		}
	})
	wg.Go(func() {
		for {
			select {
			case c := <-tcp.conns:
				c.Close()
			case <-ctx.Done():
				return
			}
		}
	})
	for range 3 {
		wg.Go(func() {
			for ctx.Err() == nil {
				code, body := getWith(t, c, target, SessionHeader, "a")
				assert.Equal(t, http.StatusOK, code, body)
			}
		})
	}
	wg.Go(func() {
		for ctx.Err() == nil {
			conn, err := net.Dial("tcp4", p.addr)
			if !assert.NoError(t, err) {
				return
			}
			fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %[1]s\r\n%s: a\r\n\r\n", tcp.addr, SessionHeader)
			resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: http.MethodConnect})
			if assert.NoError(t, err) {
				assert.Equal(t, http.StatusOK, resp.StatusCode)
			}
			conn.Close()
		}
	})
	wg.Wait()
	assert.Positive(t, rotations(p)["admin"])
}

// TestRotateDialRace: a dial that took the session's address just before a
// rotation gave it back (the pool says it has no address for it) is made
// again from the new address, and the client never sees the race.
func TestRotateDialRace(t *testing.T) {
	h := &fakeHold{}
	var p *testProxy
	var raced atomic.Bool
	hold := func(ctx context.Context) (DialFunc, func(), error) {
		dial, release, err := h.Hold(ctx)
		if holds, _, _ := h.counts(); holds > 1 {
			return dial, release, err
		}
		// The first address: the rotation comes between the lease and
		// the connection, whose bind then finds the address gone.
		return func(ctx context.Context, network, addr string) (net.Conn, error) {
			if raced.CompareAndSwap(false, true) {
				sess := p.sessions.lookup("a")
				_, ok := p.rotate(ctx, sess, nil, stats.RotatedAdmin)
				require.True(t, ok)
				return nil, fmt.Errorf("binding: %w", netutil.ErrNoAddress)
			}
			return dial(ctx, network, addr)
		}, release, err
	}
	p = startProxy(t, nil, func(c *Config) { c.Rotate, c.Hold = RotateSession, hold })
	up := startConnUpstream(t)
	c := p.client(t)
	// Lease the first address without dialing: a session whose first
	// request is under way.
	sess, err := p.sessions.begin("a", nil)
	require.NoError(t, err)
	_, err = sess.addr.Load().held.dialer(context.Background(), hold)
	require.NoError(t, err)
	p.sessions.end(sess)

	code, body := getWith(t, c, "http://"+up.addr+"/", SessionHeader, "a")
	require.Equal(t, http.StatusOK, code, body)
	assert.True(t, raced.Load())
	assert.Equal(t, "127.0.0.12", body, "left from the second address")
}

// TestRotateSessionNotServed: RotateSession outside -rotate session says
// so.
func TestRotateSessionNotServed(t *testing.T) {
	p := startProxy(t, nil)
	_, _, err := p.RotateSession(context.Background(), "a")
	assert.ErrorIs(t, err, ErrNoSessions)
	assert.Equal(t, stats.SessionStats{Rotations: map[string]uint64{"header": 0, "user_name": 0, "admin": 0, "status": 0}}, p.SessionStats())
}

// TestRotateOnValidate: RotateOn holds HTTP statuses, and needs
// RotateSession.
func TestRotateOnValidate(t *testing.T) {
	h := &fakeHold{}
	d := (&fakeDialer{}).Dial
	tests := []struct {
		name string
		cfg  Config
		err  string
	}{
		{"session", Config{Dial: d, Rotate: RotateSession, Hold: h.Hold, RotateOn: []int{403, 429}}, ""},
		{"too low", Config{Dial: d, Rotate: RotateSession, Hold: h.Hold, RotateOn: []int{99}}, "RotateOn 99 is not an HTTP status (100-599)"},
		{"too high", Config{Dial: d, Rotate: RotateSession, Hold: h.Hold, RotateOn: []int{429, 600}}, "RotateOn 600 is not an HTTP status (100-599)"},
		{"request", Config{Dial: d, RotateOn: []int{429}}, `RotateOn needs Rotate "session", not ""`},
		{"connection", Config{Dial: d, Rotate: RotateConnection, Hold: h.Hold, RotateOn: []int{429}}, `RotateOn needs Rotate "session", not "connection"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if tt.err == "" {
				assert.NoError(t, err)
			} else {
				assert.EqualError(t, err, "proxy config: "+tt.err)
			}
		})
	}
}

// TestRotateLeaseBounded: when the pool has no address to give now (past
// the neighbour budget Acquire waits until its context is done), a
// rotation waits for the new address no longer than DialTimeout, as every
// lease does: RotateSession returns, and the 429 that triggered -rotate-on
// still reaches its client. The session's next request then leases again,
// and gets its 503 within DialTimeout.
func TestRotateLeaseBounded(t *testing.T) {
	h := &fakeHold{}
	var starved atomic.Bool
	hold := func(ctx context.Context) (DialFunc, func(), error) {
		if starved.Load() {
			<-ctx.Done() // as Pool.Acquire waits for an address
			return nil, nil, fmt.Errorf("%w: every address the budget allows is in use", netutil.ErrNoAddress)
		}
		return h.Hold(ctx)
	}
	p := startProxy(t, nil, withDialTimeout(200*time.Millisecond),
		func(c *Config) { c.Rotate, c.Hold, c.RotateOn = RotateSession, hold, []int{http.StatusTooManyRequests} })
	var status atomic.Int32
	status.Store(http.StatusOK)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(int(status.Load()))
		fmt.Fprintln(w, "answer")
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	target := "http://" + ln.Addr().String() + "/"
	c := p.client(t)
	c.Timeout = 10 * time.Second
	leased := func() {
		t.Helper()
		starved.Store(false)
		code, body := getWith(t, c, target, SessionHeader, "a")
		require.Equal(t, http.StatusOK, code, body)
		starved.Store(true)
	}

	leased()
	done := make(chan bool, 1)
	go func() {
		_, rotated, err := p.RotateSession(context.Background(), "a")
		assert.NoError(t, err)
		done <- rotated
	}()
	select {
	case rotated := <-done:
		assert.True(t, rotated, "the old address is given up all the same")
	case <-time.After(10 * time.Second):
		t.Fatal("RotateSession still waits for an address")
	}

	leased()
	status.Store(http.StatusTooManyRequests)
	req, err := http.NewRequest(http.MethodGet, target, nil)
	require.NoError(t, err)
	req.Header.Set(SessionHeader, "a")
	resp, err := c.Do(req)
	require.NoError(t, err, "the upstream's 429 reaches the client while the pool has no address")
	resp.Body.Close()
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.EqualValues(t, 1, rotations(p)["status"])

	code, body := getWith(t, c, target, SessionHeader, "a")
	assert.Equal(t, http.StatusServiceUnavailable, code, body)
}
