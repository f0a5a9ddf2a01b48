package proxy

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/egressd/egressd/netutil"
)

// Rotate says how often upstream connections change egress address.
type Rotate string

const (
	// RotateRequest gives every upstream connection a fresh address: every
	// plain HTTP request and every tunnel. The zero value means the same.
	RotateRequest Rotate = "request"
	// RotateConnection gives every client connection to the proxy one
	// address, held from its first upstream dial until it closes.
	RotateConnection Rotate = "connection"
	// RotateSession gives every session key (see SessionHeader) one address,
	// held until the session has been idle for Config.SessionIdle, and keeps
	// the session's plain HTTP upstream connections alive. Requests without
	// a key rotate per request.
	RotateSession Rotate = "session"
)

// HoldFunc leases one fresh egress address for many upstream connections:
// dial opens a connection from it (closing the connection keeps the
// address), and release gives it back once the connections still open from
// it have closed. egressd's is netutil.Pool.Acquire with
// netutil.Dialer.DialFrom.
type HoldFunc func(ctx context.Context) (dial DialFunc, release func(), err error)

// maxSessionKey bounds the length of a session key, since the table keeps
// up to MaxSessions of them.
const maxSessionKey = 256

var (
	errTooManySessions = refusal(http.StatusServiceUnavailable, typeConnLimit, "too many sessions open (-max-addrs)")
	errHeldEnded       = fmt.Errorf("%w: the held address was given back", netutil.ErrNoAddress)
)

// heldAddr is an egress address held for many upstream connections: those
// of one client connection, or of one session. It is leased on first use.
type heldAddr struct {
	owner *client // RotateConnection: the client it counts against while leased

	mu      sync.Mutex
	dial    DialFunc
	release func()
	ended   bool
	tr      *http.Transport // keep-alive transport (keepalive.go): a session address's from the start, a client connection's once it forwarded plain HTTP
	last    netip.Addr      // the address its last connection left from, for the admin API

	hijacked atomic.Bool // RotateConnection: the client connection was hijacked
}

// dialer returns the function that dials from the held address, leasing it
// with hold first if need be.
func (h *heldAddr) dialer(ctx context.Context, hold HoldFunc) (DialFunc, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ended {
		return nil, errHeldEnded
	}
	if h.dial == nil {
		if e := h.owner.reserveAddr(); e != nil {
			return nil, e
		}
		dial, release, err := hold(ctx)
		if err != nil {
			h.owner.releaseAddr()
			return nil, err
		}
		h.dial, h.release = dial, release
	}
	return h.dial, nil
}

// leased reports whether the address was leased and not given back.
func (h *heldAddr) leased() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.dial != nil && !h.ended
}

// dialed records c as the held address's latest connection.
func (h *heldAddr) dialed(c net.Conn) {
	if ta, ok := c.LocalAddr().(*net.TCPAddr); ok {
		h.mu.Lock()
		h.last = ta.AddrPort().Addr().Unmap()
		h.mu.Unlock()
	}
}

// lastAddr is the address the latest connection from h left from, if any.
func (h *heldAddr) lastAddr() netip.Addr {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.last
}

// end closes the idle upstream connections of its transport, if it has
// one, and gives the address back, if it was ever leased. Later dials fail.
func (h *heldAddr) end() {
	h.mu.Lock()
	h.ended = true
	release := h.release
	h.release = nil
	tr := h.tr
	h.mu.Unlock()
	if tr != nil {
		// Connections still in use close when their response body does:
		// the transport keeps no connection idle after this.
		tr.CloseIdleConnections()
	}
	if release != nil {
		release()
		h.owner.releaseAddr()
	}
}

type connHeldKey struct{}

// holdForConn gives a client connection its held address (RotateConnection).
func (s *Server) holdForConn(ctx context.Context, c net.Conn) context.Context {
	h := &heldAddr{}
	if cc, ok := c.(*clientConn); ok {
		h.owner = cc.client
	}
	s.heldMu.Lock()
	s.held[c] = h
	s.heldMu.Unlock()
	return context.WithValue(ctx, connHeldKey{}, h)
}

// connState follows each client connection: a connection that went idle
// readies for its next request head, a hijacked one is the tunnel's (see
// clientConn). With RotateConnection it gives a connection's address back
// when it closes; the request that hijacked a connection (a tunnel, a
// WebSocket relay) gives it back when it ends (see record).
func (s *Server) connState(c net.Conn, state http.ConnState) {
	if cc, ok := c.(*clientConn); ok {
		switch state {
		case http.StateIdle:
			cc.nextRequest()
		case http.StateHijacked:
			cc.hijack()
		}
	}
	if s.held == nil || (state != http.StateClosed && state != http.StateHijacked) {
		return
	}
	s.heldMu.Lock()
	h := s.held[c]
	delete(s.held, c)
	s.heldMu.Unlock()
	if h == nil {
		return
	}
	if state == http.StateHijacked {
		h.hijacked.Store(true)
		return
	}
	h.end()
}

// heldFor returns the address a dial with ctx must leave from: the client
// connection's (RotateConnection), or its session's (RotateSession); or
// neither, for a fresh one.
func (s *Server) heldFor(ctx context.Context) (*heldAddr, *session, error) {
	switch s.cfg.Rotate {
	case RotateConnection:
		h, _ := ctx.Value(connHeldKey{}).(*heldAddr)
		return h, nil, nil
	case RotateSession:
		if sess := sessionOf(ctx); sess != nil {
			return nil, sess, nil
		}
		// A session key set by another front end (SOCKS5) without
		// beginSession: the dial itself keeps the session alive.
		if key := sessionFrom(ctx); key != "" {
			sess, err := s.sessions.begin(key, clientOf(ctx))
			if err != nil {
				return nil, nil, err
			}
			s.sessions.end(sess)
			return nil, sess, nil
		}
	}
	return nil, nil, nil
}

type sessionCtxKey struct{}

func sessionOf(ctx context.Context) *session {
	sess, _ := ctx.Value(sessionCtxKey{}).(*session)
	return sess
}

// beginSession marks the session of key in use until done is called, so
// that it does not idle out under a long request or tunnel, and returns ctx
// carrying it. Outside RotateSession, or without a key, it does nothing.
func (s *Server) beginSession(ctx context.Context, key string) (_ context.Context, done func(), _ error) {
	if s.cfg.Rotate != RotateSession || key == "" {
		return ctx, func() {}, nil
	}
	sess, err := s.sessions.begin(key, clientOf(ctx))
	if err != nil {
		return ctx, nil, err
	}
	// sessionFrom finds the key in sess: one context value, not two.
	return context.WithValue(ctx, sessionCtxKey{}, sess), func() { s.sessions.end(sess) }, nil
}

// session is one session key and the address it leaves from.
type session struct {
	key   string
	addr  atomic.Pointer[sessionAddr] // its address now; a rotation replaces it (see rotation.go)
	owner *client                     // the client that opened it: it counts against its MaxAddrsPerClient

	refs int       // requests and tunnels using it; table mutex
	last time.Time // when it was last used; table mutex
}

// sessionTable maps session keys to sessions, ends sessions idle for idle,
// and holds at most max of them. Its janitor is a timer armed only while
// sessions exist, so that an idle proxy runs no goroutine for it.
type sessionTable struct {
	idle    time.Duration
	max     int
	now     func() time.Time
	newAddr func(*session) *sessionAddr
	hold    HoldFunc

	mu     sync.Mutex
	m      map[string]*session
	timer  *time.Timer
	closed bool
}

func newSessionTable(idle time.Duration, max int, hold HoldFunc, newAddr func(*session) *sessionAddr) *sessionTable {
	return &sessionTable{idle: idle, max: max, now: time.Now, hold: hold, newAddr: newAddr, m: make(map[string]*session)}
}

// begin returns the session of key, made now if there is none or it idled
// out, and counts one more user of it. A new session counts against the
// MaxAddrsPerClient of owner, the client that opens it, until it ends.
func (t *sessionTable) begin(key string, owner *client) (*session, error) {
	if len(key) > maxSessionKey {
		return nil, refusal(http.StatusBadRequest, typeRequestError, "session key longer than %d bytes", maxSessionKey)
	}
	var ended []*session
	defer func() { finish(ended) }()
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, errShutdown
	}
	now := t.now()
	sess := t.m[key]
	if sess != nil && t.expiredLocked(sess, now) {
		delete(t.m, key)
		ended = append(ended, sess)
		sess = nil
	}
	if sess == nil {
		if len(t.m) >= t.max {
			ended = append(ended, t.sweepLocked(now)...)
		}
		if len(t.m) >= t.max {
			return nil, errTooManySessions
		}
		if e := owner.reserveAddr(); e != nil {
			return nil, e
		}
		sess = &session{key: key, owner: owner}
		sess.addr.Store(t.newAddr(sess))
		t.m[key] = sess
		if t.timer == nil {
			t.timer = time.AfterFunc(t.idle, t.janitor)
		}
	}
	sess.refs++
	sess.last = now
	return sess, nil
}

// end counts one user of sess fewer.
func (t *sessionTable) end(sess *session) {
	t.mu.Lock()
	sess.refs--
	sess.last = t.now()
	t.mu.Unlock()
}

func (t *sessionTable) expiredLocked(sess *session, now time.Time) bool {
	return sess.refs == 0 && now.Sub(sess.last) >= t.idle
}

// sweepLocked removes the sessions that idled out and returns them, to be
// finished outside the lock.
func (t *sessionTable) sweepLocked(now time.Time) []*session {
	var ended []*session
	for key, sess := range t.m {
		if t.expiredLocked(sess, now) {
			delete(t.m, key)
			ended = append(ended, sess)
		}
	}
	return ended
}

// janitor ends idle sessions, and runs again when the next one may be due,
// as long as sessions exist.
func (t *sessionTable) janitor() {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return
	}
	now := t.now()
	ended := t.sweepLocked(now)
	next := t.idle
	for _, sess := range t.m {
		if sess.refs == 0 {
			next = min(next, sess.last.Add(t.idle).Sub(now))
		}
	}
	if len(t.m) == 0 {
		t.timer = nil
	} else {
		t.timer.Reset(max(next, time.Millisecond))
	}
	t.mu.Unlock()
	finish(ended)
}

// close ends every session and stops the janitor. Sessions still in use keep
// their upstream connections until those close, and their address until the
// last of them does.
func (t *sessionTable) close() {
	t.mu.Lock()
	t.closed = true
	if t.timer != nil {
		t.timer.Stop()
		t.timer = nil
	}
	ended := make([]*session, 0, len(t.m))
	for _, sess := range t.m {
		ended = append(ended, sess)
	}
	clear(t.m)
	t.mu.Unlock()
	finish(ended)
}

// closeSessions ends every session (RotateSession), at the end of Shutdown.
func (s *Server) closeSessions() {
	if s.sessions != nil {
		s.sessions.close()
	}
}

// finish closes the idle upstream connections of ended sessions and gives
// their addresses back. Sessions leave the table before they are finished,
// so no rotation replaces their address meanwhile.
func finish(ended []*session) {
	for _, sess := range ended {
		sess.addr.Load().end()
		sess.owner.releaseAddr()
	}
}

// clientOf returns the client of the request whose state ctx carries, if
// any.
func clientOf(ctx context.Context) *client {
	if x := requestFrom(ctx); x != nil {
		return x.client
	}
	return nil
}

// newSessionAddr returns a new address of sess, to be leased on first use,
// with its keep-alive transport, dialing from the session's address.
func (s *Server) newSessionAddr(sess *session) *sessionAddr {
	a := &sessionAddr{}
	a.held.tr = s.keptTransport(s.cfg.SessionIdle, func(ctx context.Context, network, addr string) (net.Conn, error) {
		return s.dialSession(ctx, sess, network, addr)
	})
	return a
}

// sessionRoundTrip sends req over the keep-alive transport of its session's
// address.
func (s *Server) sessionRoundTrip(sess *session, req *http.Request) (*http.Response, error) {
	a := sess.addr.Load()
	if x := requestFrom(req.Context()); x != nil {
		x.sessAddr = a
	}
	return roundTripKept(a.held.tr, req)
}
