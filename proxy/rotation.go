package proxy

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy/stats"
)

// Rotation on demand (RotateSession): a session gives up its address for a
// new one when its client asks, with the RotateHeader or a proxy user name
// ending in "-rotate", when the operator asks (Server.RotateSession, the
// admin API's POST /sessions/KEY/rotate), or when an upstream answers one of
// its plain HTTP requests with a status of Config.RotateOn. The request
// that asks leaves from the new address already; every later one of the
// session does too. Connections already open from the old address keep
// going, and it is given back to the pool once the last of them closes.

// RotateHeader, with the value 1, asks for a new address for the session
// of the request (SessionHeader, or the proxy user name), on HTTP requests
// and CONNECT; it is removed before a request is forwarded.
const RotateHeader = "X-Egress-Rotate"

// rotateSuffix ends the session key of a proxy user name that asks for a
// new address: session-KEY-rotate, USER-session-KEY-rotate.
const rotateSuffix = "-rotate"

// cutRotate splits the session key of a proxy user name into the key and
// whether it asks for a new address.
func cutRotate(key string) (string, bool) {
	return strings.CutSuffix(key, rotateSuffix)
}

// ErrNoSession is RotateSession's answer for a key with no session open.
var ErrNoSession = errors.New("no session open with this key (it never had a request, or it idled out)")

// ErrNoSessions is RotateSession's answer when the proxy does not rotate
// per session.
var ErrNoSessions = errors.New("egressd does not run -rotate session: there are no sessions to rotate")

// sessionAddr is one address of a session; held.tr is the keep-alive
// transport its plain HTTP requests take while it is the session's (set
// when it is made, never changed).
type sessionAddr struct {
	held    heldAddr
	retired atomic.Bool // a rotation replaced it: its connections close once idle
}

// end closes the address's idle upstream connections and gives it back
// once the others have closed.
func (a *sessionAddr) end() { a.held.end() }

// retire ends a, which a rotation replaced. The transport closes every
// connection that goes idle from now on (CloseIdleConnections says so until
// the next round trip on it), so that no keep-alive connection holds the
// old address.
func (a *sessionAddr) retire() {
	a.retired.Store(true)
	a.end()
}

// closeIdleIfRetired closes what went idle on a's transport after a round
// trip that began on it just before a rotation (a round trip undoes
// CloseIdleConnections).
func (a *sessionAddr) closeIdleIfRetired() {
	if a != nil && a.retired.Load() {
		a.held.tr.CloseIdleConnections()
	}
}

// dialSession dials from the address of sess. A dial that lost a race
// with a rotation (it took the address just before it was given back) is
// made again from the new one.
func (s *Server) dialSession(ctx context.Context, sess *session, network, addr string) (net.Conn, error) {
	for tries := 0; ; tries++ {
		a := sess.addr.Load()
		conn, err := s.dialHeld(ctx, &a.held, network, addr)
		if err != nil && tries < 3 && errors.Is(err, netutil.ErrNoAddress) && sess.addr.Load() != a {
			continue
		}
		return conn, err
	}
}

// rotate gives sess a new address in place of from (nil: whatever it
// holds), and counts it under reason. It leases the new address first,
// while the old one is still held, so that the pool cannot hand the old
// one back. It does nothing, and reports false, if the session ended, if
// from is no longer its address (another rotation came first: a burst of
// 429s rotates once), or if its address was never leased (its first
// connection takes a fresh one anyway). old is the address the session's
// connections left from last, if any.
func (s *Server) rotate(ctx context.Context, sess *session, from *sessionAddr, reason stats.RotateReason) (old netip.Addr, ok bool) {
	t := s.sessions
	cur := sess.addr.Load()
	if (from != nil && cur != from) || !cur.held.leased() {
		return netip.Addr{}, false
	}
	next := t.newAddr(sess)
	// Best effort: if no address can be had within DialTimeout (the pool
	// waits for one as long as its context lets it), the next dial asks
	// again and tells its client why. Unbounded, a -rotate-on answer would
	// not reach its client, nor the admin API answer, until one came. Where
	// there are several /64s, the new address is on another than the old one.
	ctx, cancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
	defer cancel()
	if a := cur.held.lastAddr(); a.IsValid() {
		ctx = netutil.AvoidingSubnetOf(ctx, a)
	}
	_, _ = next.held.dialer(ctx, t.hold)
	t.mu.Lock()
	if t.closed || t.m[sess.key] != sess || !sess.addr.CompareAndSwap(cur, next) {
		t.mu.Unlock()
		next.end()
		return netip.Addr{}, false
	}
	t.mu.Unlock()
	cur.retire()
	s.sessionStats.Rotated(reason)
	old = cur.held.lastAddr()
	s.log.Info("session rotated", "session", sess.key, "reason", reason.String(), "old", addrAttr(old))
	return old, true
}

// addrAttr is an address for the log; "" if there is none.
func addrAttr(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// RotateSession gives the session of key a new address: its next
// connection leaves from a fresh one, while connections open from the old
// one keep going (POST /sessions/KEY/rotate of the admin API). It returns
// the address the session's connections left from last, if any, and
// whether there was an address to give up: a session that has not
// connected yet holds none, and its first connection takes a fresh one
// anyway. The error is ErrNoSession or ErrNoSessions.
func (s *Server) RotateSession(ctx context.Context, key string) (old netip.Addr, rotated bool, err error) {
	if s.sessions == nil {
		return netip.Addr{}, false, ErrNoSessions
	}
	sess := s.sessions.lookup(key)
	if sess == nil {
		return netip.Addr{}, false, ErrNoSession
	}
	old, rotated = s.rotate(ctx, sess, nil, stats.RotatedAdmin)
	return old, rotated, nil
}

// lookup returns the open session of key, or nil.
func (t *sessionTable) lookup(key string) *session {
	t.mu.Lock()
	defer t.mu.Unlock()
	sess := t.m[key]
	if sess == nil || t.closed || t.expiredLocked(sess, t.now()) {
		return nil
	}
	return sess
}

// rotateOn ends the address of the session of x when the upstream answered
// it with a status of Config.RotateOn, so that the session's next request
// leaves from a new one.
func (s *Server) rotateOn(ctx context.Context, x *request, status int) {
	a := x.sessAddr
	if a == nil || !s.rotatesOn(status) {
		return
	}
	if sess := sessionOf(ctx); sess != nil {
		s.rotate(ctx, sess, a, stats.RotatedStatus)
	}
}

// rotatesOn reports whether status is one of Config.RotateOn.
func (s *Server) rotatesOn(status int) bool {
	for _, st := range s.cfg.RotateOn {
		if st == status {
			return true
		}
	}
	return false
}

// askedRotation reads what a request asks of its session's address, once
// the session key is known (RotateSession only): RotateHeader, whose one
// value must be 1, or the user name's -rotate. The error is the 400 to
// answer.
func askedRotation(h http.Header, key string, userRotate bool) (stats.RotateReason, *Error) {
	var reason stats.RotateReason
	if userRotate {
		reason = stats.RotatedUserName
	}
	switch vals := h.Values(RotateHeader); {
	case len(vals) == 0:
	case len(vals) > 1 || vals[0] != "1":
		return 0, refusal(http.StatusBadRequest, typeRequestError, "%s must be 1, not %q", RotateHeader, strings.Join(vals, ", "))
	default:
		reason = stats.RotatedHeader
	}
	if reason != 0 && key == "" {
		return 0, errRotateNoKey
	}
	return reason, nil
}

// errRotateNoKey refuses a request that asks for a new address without
// naming its session.
var errRotateNoKey = refusal(http.StatusBadRequest, typeRequestError,
	"asking for a new address needs a session key: %s: KEY, or the proxy user name session-KEY-rotate", SessionHeader)

// SessionStats returns the sessions open and the rotations so far, for the
// admin API.
func (s *Server) SessionStats() stats.SessionStats {
	open := 0
	if t := s.sessions; t != nil {
		t.mu.Lock()
		open = len(t.m)
		t.mu.Unlock()
	}
	return s.sessionStats.Snapshot(open)
}
