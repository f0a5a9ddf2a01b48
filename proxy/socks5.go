package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/socks5"
)

// SOCKS5 is served next to HTTP, with the same admission, dial, tunnel,
// statistics and access log: a SOCKS5 CONNECT is a CONNECT tunnel that was
// asked for in another protocol. The access log line says method=SOCKS5,
// with the HTTP status the same outcome would have had over HTTP (200 once
// the tunnel is up), and socks_reply, the reply code sent, if any.

// socksHandshakeTimeout bounds the handshake, from accepting the connection
// to the request read; dialing is bounded by DialTimeout, waiting for the
// shaper by its rule's wait.
const socksHandshakeTimeout = 10 * time.Second

// socksListeners are the listeners ServeSOCKS5 accepts on, closed by
// Shutdown.
type socksListeners struct {
	mu     sync.Mutex
	lns    map[net.Listener]struct{}
	closed bool // Shutdown ran: accept nothing more
}

func (l *socksListeners) add(ln net.Listener) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	if l.lns == nil {
		l.lns = make(map[net.Listener]struct{})
	}
	l.lns[ln] = struct{}{}
	return true
}

func (l *socksListeners) remove(ln net.Listener) {
	l.mu.Lock()
	delete(l.lns, ln)
	l.mu.Unlock()
}

func (l *socksListeners) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	for ln := range l.lns {
		_ = ln.Close()
	}
	clear(l.lns)
}

func (l *socksListeners) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

// enter counts a connection just accepted as active, unless Shutdown has
// begun. Both under one lock: Shutdown closes the listeners before it waits
// for active connections, so each one is either waited for or refused.
func (l *socksListeners) enter(s *Server) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	s.begin()
	return true
}

// ServeSOCKS5 accepts SOCKS5 clients on ln until Shutdown is called, and
// closes ln when it returns. It serves the CONNECT command (RFC 1928) with
// IPv4, IPv6 and domain name targets; names are resolved by egressd's dial,
// as clients that say socks5h expect, so that rotation applies to them.
//
// A client whose address Access does not allow gets the reply "connection
// not allowed by ruleset". With users (Access.Users), the client must
// authenticate with a user name and password (RFC 1929), and a user name
// USER-session-KEY carries a session key. Without, it may authenticate or
// not, any credentials pass, and a user name "session-KEY" carries a
// session key, so user/password is chosen whenever the client offers it.
// BIND and UDP ASSOCIATE are answered "command not supported".
//
// Like Serve, it may be called for several listeners at once; Shutdown
// waits for SOCKS5 connections as for CONNECT tunnels and force-closes them
// when its context ends. It returns nil after Shutdown, or the error that
// stopped accepting.
func (s *Server) ServeSOCKS5(ln net.Listener) error {
	if !s.socks.add(ln) {
		_ = ln.Close()
		return nil
	}
	defer s.socks.remove(ln)
	defer ln.Close()

	var delay time.Duration // backoff after a temporary accept error, as http.Server does
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.socks.isClosed() {
				return nil
			}
			if ne, ok := err.(net.Error); ok && ne.Temporary() { //nolint:staticcheck // EMFILE and the like
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("socks5: accept failed; retrying", "err", err, "delay", delay)
				time.Sleep(delay)
				continue
			}
			return err
		}
		delay = 0
		if !s.socks.enter(s) {
			_ = c.Close()
			return nil
		}
		go s.serveSOCKS(c)
	}
}

// socksCloser is what Shutdown force-closes for a SOCKS5 connection: the
// client connection, and the context a dial or shaper wait runs under.
type socksCloser struct {
	c      net.Conn
	cancel context.CancelFunc
}

func (k *socksCloser) Close() error {
	k.cancel()
	return k.c.Close()
}

// serveSOCKS serves one SOCKS5 connection: handshake, admission, dial,
// reply, tunnel. The connection was counted active by enter.
func (s *Server) serveSOCKS(c net.Conn) {
	defer s.end()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	k := &socksCloser{c: c, cancel: cancel}
	if !s.track(k) { // Shutdown already force-closed everything
		return
	}
	defer s.untrack(k)
	defer c.Close()

	start := time.Now()
	st := &reqState{}
	ctx = context.WithValue(ctx, stateKey{}, st)
	var rec record
	reply := -1 // the reply code sent, if any
	defer func() {
		if rec.status != http.StatusOK && rec.status != 0 {
			lingerClose(c) // after an error reply
		}
		s.finish(&rec, st)
		if rec.status == 0 {
			return // the client hung up without a byte: a port probe, nothing to log
		}
		var extra []slog.Attr
		if reply >= 0 {
			extra = append(extra, slog.Int("socks_reply", reply))
		}
		s.logRecord(c.RemoteAddr().String(), "SOCKS5", &rec, st, time.Since(start), extra...)
	}()
	answer := func(rep byte, status int) {
		reply, rec.status = int(rep), status
		if err := socks5.WriteReply(c, rep); err != nil {
			s.log.Debug("socks5: replying", "client", c.RemoteAddr(), "err", err)
		}
	}

	_ = c.SetDeadline(time.Now().Add(socksHandshakeTimeout))
	a := s.access.Load() // the same rules for the whole connection, across a reload
	q, user, session, status, ok := s.socksHandshake(c, a)
	rec.user = user
	if !ok {
		rec.status = status
		if status == http.StatusForbidden {
			reply = socks5.ReplyNotAllowed
		}
		return
	}
	// Waiting for the shaper and dialing have bounds of their own.
	_ = c.SetDeadline(time.Time{})
	rec.host = q.Addr()
	if _, err := netip.ParseAddr(q.Host); err != nil && !validHostname(q.Host) {
		s.log.Debug("socks5: bad host name", "client", c.RemoteAddr().String(), "host", q.Host)
		rec.reason = "bad host name"
		answer(socks5.ReplyGeneralFailure, http.StatusBadRequest)
		return
	}
	if e := checkDest(q.Host, q.Port, a.ConnectPorts, "tunnels", "connect-ports"); e != nil {
		rec.reason = e.Reason
		answer(e.socksReply(), e.Status)
		return
	}
	// The session stays in use while the tunnel is open, as a CONNECT
	// tunnel's does, so it cannot idle out from under it.
	ctx, done, err := s.beginSession(withSession(ctx, session), session)
	if err != nil {
		answer(socks5.ReplyGeneralFailure, http.StatusServiceUnavailable)
		return
	}
	defer done()

	// A tunnel counts as one request for the shaper, when it opens.
	if err := s.acquire(ctx, q.Host, &rec); err != nil {
		if _, ok := errors.AsType[*shape.RejectError](err); ok {
			// SOCKS5 has no "slow down": "not allowed by ruleset" is the
			// closest, and the log says 429 as HTTP would.
			answer(socks5.ReplyNotAllowed, http.StatusTooManyRequests)
			return
		}
		rec.status = statusClientClosed // Shutdown gave up on it
		return
	}

	upstream, err := s.dial(ctx, "tcp", rec.host)
	if err != nil {
		e := upstreamError(q.Host, err)
		level := slog.LevelWarn
		if ctx.Err() != nil {
			level = slog.LevelDebug // closed by Shutdown
		}
		s.log.Log(ctx, level, "upstream failed", "client", c.RemoteAddr().String(), "method", "SOCKS5",
			"host", rec.host, "status", e.Status, "err", e.Err)
		st.failed = true
		rec.reason = e.Reason
		answer(e.socksReply(), e.Status)
		return
	}
	t := newTunnel(c, upstream, s.cfg.TunnelIdleTimeout)
	if !s.track(t) {
		rec.status = http.StatusServiceUnavailable
		return
	}
	defer s.untrack(t)
	defer t.Close()

	answer(socks5.ReplySucceeded, http.StatusOK)
	st.answered = time.Now()
	down, up, err := t.run()
	rec.down += down
	rec.up += up
	if err != nil {
		s.log.Debug("tunnel ended", "client", c.RemoteAddr().String(), "host", rec.host, "err", err)
	}
}

// socksHandshake runs the method negotiation, the user name/password
// subnegotiation if chosen, and reads the request. It returns the request,
// the authenticated user (only when users authenticate) and the session key
// in the user name, if any, and ok; or, when the handshake failed or the
// client was refused and it was answered as the protocol says, the HTTP-like
// status for the log (0 if the client sent nothing at all).
func (s *Server) socksHandshake(c net.Conn, a *Access) (q socks5.Request, user, session string, status int, ok bool) {
	fail := func(err error, status int) (socks5.Request, string, string, int, bool) {
		s.log.Debug("socks5: handshake failed", "client", c.RemoteAddr().String(), "err", err)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			status = http.StatusRequestTimeout
		}
		return socks5.Request{}, user, "", status, false
	}

	methods, err := socks5.ReadGreeting(c)
	if errors.Is(err, io.EOF) {
		return socks5.Request{}, "", "", 0, false
	}
	if err != nil {
		_ = socks5.WriteMethod(c, socks5.MethodNoAcceptable)
		return fail(err, http.StatusBadRequest)
	}
	if !a.admitsConn(c.RemoteAddr()) {
		if !slices.Contains(methods, socks5.MethodNoAuth) && !slices.Contains(methods, socks5.MethodUserPass) {
			// No method to go on with, so no way to send the reply.
			_ = socks5.WriteMethod(c, socks5.MethodNoAcceptable)
			return fail(errors.New("no acceptable authentication method (and the client address is not allowed)"), http.StatusProxyAuthRequired)
		}
		return fail(s.socksRefuse(c, methods), http.StatusForbidden)
	}
	// With users, user/password is the only method; without, it is chosen
	// whenever offered, for the session key a user name may carry.
	var method byte = socks5.MethodNoAcceptable
	for _, m := range methods {
		if m == socks5.MethodUserPass {
			method = m
			break
		}
		if m == socks5.MethodNoAuth && a.Users == nil {
			method = m
		}
	}
	if err := socks5.WriteMethod(c, method); err != nil {
		return fail(err, http.StatusBadRequest)
	}
	switch method {
	case socks5.MethodNoAcceptable:
		return fail(errors.New("no acceptable authentication method"), http.StatusProxyAuthRequired)
	case socks5.MethodUserPass:
		name, pass, err := socks5.ReadUserPass(c)
		if err != nil {
			_ = socks5.WriteUserPassStatus(c, false)
			return fail(err, http.StatusBadRequest)
		}
		if a.Users == nil {
			session, _ = sessionFromUser(name)
		} else {
			user, session = splitSessionUser(name)
			if !a.Users.Verify(user, pass) {
				_ = socks5.WriteUserPassStatus(c, false)
				return fail(errors.New("wrong user name or password"), http.StatusProxyAuthRequired)
			}
		}
		if err := socks5.WriteUserPassStatus(c, true); err != nil {
			return fail(err, http.StatusBadRequest)
		}
	}

	q, err = socks5.ReadRequest(c)
	if rqErr, ok := errors.AsType[*socks5.RequestError](err); ok {
		status := http.StatusBadRequest
		if rqErr.Reply == socks5.ReplyCommandNotSupported || rqErr.Reply == socks5.ReplyAddrNotSupported {
			status = http.StatusNotImplemented
		}
		_ = socks5.WriteReply(c, rqErr.Reply)
		return fail(err, status)
	}
	if err != nil { // truncated: nothing to answer
		return fail(err, http.StatusBadRequest)
	}
	return q, user, session, 0, true
}

// socksRefuse answers a client whose address is not allowed with the reply
// "connection not allowed by ruleset", as early as the protocol lets it: the
// method (no authentication if offered) and the reply go in one write, and
// the request is never read. A client that offers user/password only has
// its credentials read but not checked: it is refused for its address, and
// bcrypt's work is not spent on it. The client offered one of the two.
func (s *Server) socksRefuse(c net.Conn, methods []byte) error {
	method := byte(socks5.MethodNoAuth)
	if !slices.Contains(methods, socks5.MethodNoAuth) {
		method = socks5.MethodUserPass
	}
	msg := []byte{socks5.Version, method}
	if method == socks5.MethodUserPass {
		if err := socks5.WriteMethod(c, method); err != nil {
			return err
		}
		if _, _, err := socks5.ReadUserPass(c); err != nil {
			return err
		}
		msg = []byte{socks5.UserPassVersion, 0x00}
	}
	var reply bytes.Buffer
	reply.Write(msg)
	_ = socks5.WriteReply(&reply, socks5.ReplyNotAllowed)
	if _, err := c.Write(reply.Bytes()); err != nil {
		return err
	}
	return errors.New(errNotAllowed.Reason)
}

// lingerClose ends a connection whose handshake failed so that the error
// reply reaches the client: closing a socket with unread input (the rest of
// a request the server did not read) makes the kernel send a reset, which
// can discard the reply before the client reads it. So it half-closes, and
// reads and drops what the client still sends, for a short while.
func lingerClose(c net.Conn) {
	if cw, ok := c.(closeWriter); ok {
		_ = cw.CloseWrite()
	}
	_ = c.SetReadDeadline(time.Now().Add(lingerTimeout))
	_, _ = io.Copy(io.Discard, io.LimitReader(c, lingerMax))
}

// lingerClose's bounds.
const (
	lingerTimeout = 500 * time.Millisecond
	lingerMax     = 64 << 10
)
