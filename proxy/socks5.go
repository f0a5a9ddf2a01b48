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

	"github.com/egressd/egressd/proxy/socks5"
	"github.com/egressd/egressd/proxy/stats"
)

// SOCKS5 is served next to HTTP, with the same admission, dial, tunnel,
// statistics and access log: a SOCKS5 CONNECT is a CONNECT tunnel that was
// asked for in another protocol. The access log line says method=SOCKS5,
// with the HTTP status the same outcome would have had over HTTP (200 once
// the tunnel is up), and socks_reply, the reply code sent, if any.

// socksHandshakeTimeout bounds the handshake, from accepting the connection
// to the request read, unless ClientTimeout is shorter; dialing is bounded
// by DialTimeout, waiting for the shaper by its rule's wait.
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
	cl := s.listen(ln, true) // limits, and backoff when accepting fails
	if !s.socks.add(cl) {
		_ = cl.Close()
		return nil
	}
	defer s.socks.remove(cl)
	defer cl.Close()

	for {
		c, err := cl.Accept()
		if err != nil {
			if s.socks.isClosed() {
				return nil
			}
			return err
		}
		if !s.socks.enter(s) {
			_ = c.Close()
			return nil
		}
		go s.serveSOCKS(c.(*clientConn))
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

// serveSOCKS serves one SOCKS5 connection: the steps of request.go's list,
// from the handshake to the tunnel. The connection was counted active by
// enter.
func (s *Server) serveSOCKS(c *clientConn) {
	defer s.end()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	k := &socksCloser{c: c, cancel: cancel}
	if !s.track(k) { // Shutdown already force-closed everything
		return
	}
	defer s.untrack(k)
	defer c.Close()

	x := &request{start: time.Now(), method: "SOCKS5", remote: c.RemoteAddr().String(), client: c.client}
	ctx = withRequest(ctx, x)
	reply := -1 // the reply code sent, if any
	defer func() {
		if x.status != http.StatusOK && x.status != 0 {
			lingerClose(c) // after an error reply
		}
		// 7. Record.
		var extra []slog.Attr
		if reply >= 0 {
			extra = append(extra, slog.Int("socks_reply", reply))
		}
		s.record(x, extra...)
	}()
	// Every reply is written under a deadline: a client that reads
	// nothing cannot hold the connection.
	answer := func(rep byte, status int) {
		reply, x.status = int(rep), status
		_ = c.SetWriteDeadline(time.Now().Add(s.cfg.ClientTimeout))
		if err := socks5.WriteReply(c, rep); err != nil {
			s.log.Debug("socks5: replying", "client", x.remote, "err", err)
		}
	}
	refuseWith := func(e *Error) {
		x.reason, x.refused = e.Reason, e.refused
		answer(e.socksReply(), e.Status)
	}

	// 1. Admit the client: the handshake, within its own deadline.
	handshake := min(socksHandshakeTimeout, s.cfg.ClientTimeout)
	_ = c.SetDeadline(time.Now().Add(handshake))
	x.access = s.access.Load() // the same rules for the whole connection, across a reload
	q, fail, ok := s.socksHandshake(ctx, c, x, handshake)
	if !ok {
		if fail != nil {
			x.refusedWith(fail)
			if fail.Status == http.StatusForbidden {
				reply = int(fail.socksReply()) // socksRefuse sent it
			}
		}
		return
	}
	// Waiting for the shaper and dialing have bounds of their own.
	_ = c.SetDeadline(time.Time{})

	// 2. Parse the target.
	x.host = q.Addr()
	if _, err := netip.ParseAddr(q.Host); err != nil && !validHostname(q.Host) {
		s.log.Debug("socks5: bad host name", "client", x.remote, "host", q.Host)
		refuseWith(malformed(http.StatusBadRequest, "bad host name"))
		return
	}
	if e := checkDest(q.Host, q.Port, x.access.ConnectPorts, "tunnels", "connect-ports"); e != nil {
		refuseWith(e)
		return
	}

	// 3. Pick the address: the session's, if any, in use while the tunnel
	// is open, as a CONNECT tunnel's is, so that it cannot idle out from
	// under it; a new one if the user name ends in -rotate.
	if s.cfg.Rotate == RotateSession {
		var rotate bool
		x.sessionKey, rotate = cutRotate(x.sessionKey)
		var e *Error
		if x.rotate, e = askedRotation(nil, x.sessionKey, rotate); e != nil {
			refuseWith(e)
			return
		}
	}
	ctx, e := s.useSession(withSession(ctx, x.sessionKey), x)
	if e != nil {
		refuseWith(e)
		return
	}

	// 4. Shape: a tunnel counts as one request, when it opens.
	if e, ok := s.shape(ctx, x, q.Host); !ok {
		if e != nil {
			answer(e.socksReply(), e.Status) // the log says 429, as HTTP would
		}
		return
	}

	// 5. Dial.
	upstream, err := s.dial(ctx, "tcp", x.host)
	if err != nil {
		refuseWith(s.fail(ctx, x, q.Host, err))
		return
	}

	// 6. Relay.
	t := s.newTunnel(c, upstream)
	if !s.track(t) {
		x.status = http.StatusServiceUnavailable
		return
	}
	defer s.untrack(t)
	defer t.Close()
	answer(socks5.ReplySucceeded, http.StatusOK)
	_ = c.SetWriteDeadline(time.Time{}) // the tunnel's idle timeout bounds it now
	x.answered = time.Now()
	s.runTunnel(x, t)
}

// socksHandshake admits a SOCKS5 client under the access rules of x: it
// runs the method negotiation, the user name/password subnegotiation if
// chosen, and reads the request. It records in x the authenticated user
// (only when users authenticate) and the session key in the user name, if
// any, and returns the request and ok; or, when the handshake failed or the
// client was refused and it was answered as the protocol says, what the log
// says of it (nil if the client sent nothing at all). handshake is the
// deadline set on c, for the reason of a timeout.
func (s *Server) socksHandshake(ctx context.Context, c *clientConn, x *request, handshake time.Duration) (q socks5.Request, _ *Error, ok bool) {
	a := x.access
	fail := func(err error, e *Error) (socks5.Request, *Error, bool) {
		s.log.Debug("socks5: handshake failed", "client", x.remote, "err", err)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			e = clientRefusal(stats.RefusedHeaderTimeout, http.StatusRequestTimeout, typeRequestError,
				"SOCKS5 handshake not complete within %v (-client-timeout)", handshake)
		}
		return socks5.Request{}, e, false
	}
	badHandshake := malformed(http.StatusBadRequest, "malformed SOCKS5 handshake")

	methods, err := socksGreeting(c)
	if errors.Is(err, io.EOF) {
		return socks5.Request{}, nil, false
	}
	if err != nil {
		_ = socks5.WriteMethod(c, socks5.MethodNoAcceptable)
		return fail(err, badHandshake)
	}
	noMethod := refusal(http.StatusProxyAuthRequired, typeRequestDenied, "no acceptable SOCKS5 authentication method")
	if !a.admitsConn(c.RemoteAddr()) {
		if !slices.Contains(methods, socks5.MethodNoAuth) && !slices.Contains(methods, socks5.MethodUserPass) {
			// No method to go on with, so no way to send the reply.
			_ = socks5.WriteMethod(c, socks5.MethodNoAcceptable)
			return fail(errors.New("no acceptable authentication method (and the client address is not allowed)"), noMethod)
		}
		err := socksRefuse(c, methods, socks5.ReplyNotAllowed)
		if err == nil {
			err = errors.New(errNotAllowed.Reason)
		}
		return fail(err, errNotAllowed)
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
		return fail(err, badHandshake)
	}
	switch method {
	case socks5.MethodNoAcceptable:
		return fail(errors.New("no acceptable authentication method"), noMethod)
	case socks5.MethodUserPass:
		name, pass, err := socks5.ReadUserPass(c)
		if err != nil {
			_ = socks5.WriteUserPassStatus(c, false)
			return fail(err, badHandshake)
		}
		if a.Users == nil {
			x.sessionKey, _ = sessionFromUser(name)
		} else {
			x.user, x.sessionKey = splitSessionUser(name)
			res, retry := s.login(ctx, clientAddr(c.RemoteAddr()), a.Users, x.user, pass)
			if res != loginOK {
				_ = socks5.WriteUserPassStatus(c, false)
				e := errLoginFailed
				if res == loginThrottled {
					e = errLoginThrottled(retry)
				}
				return fail(errors.New(e.Reason), e)
			}
		}
		if err := socks5.WriteUserPassStatus(c, true); err != nil {
			return fail(err, badHandshake)
		}
	}

	q, err = socks5.ReadRequest(c)
	if rqErr, ok := errors.AsType[*socks5.RequestError](err); ok {
		e := badHandshake
		if rqErr.Reply == socks5.ReplyCommandNotSupported || rqErr.Reply == socks5.ReplyAddrNotSupported {
			e = refusal(http.StatusNotImplemented, typeRequestError, "SOCKS5 %s", rqErr.Err)
		}
		_ = socks5.WriteReply(c, rqErr.Reply)
		return fail(err, e)
	}
	if err != nil { // truncated: nothing to answer
		return fail(err, badHandshake)
	}
	return q, nil, true
}

// socksGreeting reads a SOCKS5 client's greeting: the methods it offers.
func socksGreeting(c net.Conn) ([]byte, error) { return socks5.ReadGreeting(c) }

// socksRefuse answers a client that is refused before its request is read
// (its address is not allowed, or it is over a cap) with reply, as early as
// the protocol lets it: the method (no authentication if offered) and the
// reply go in one write, and the request is never read. A client that
// offers user/password only has its credentials read but not checked:
// bcrypt's work is not spent on it. The client must have offered one of
// the two.
func socksRefuse(c net.Conn, methods []byte, rep byte) error {
	method := byte(socks5.MethodNoAuth)
	if !slices.Contains(methods, socks5.MethodNoAuth) {
		method = socks5.MethodUserPass
	}
	if !slices.Contains(methods, method) {
		return socks5.WriteMethod(c, socks5.MethodNoAcceptable)
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
	_ = socks5.WriteReply(&reply, rep)
	_, err := c.Write(reply.Bytes())
	return err
}

type closeWriter interface{ CloseWrite() error }

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
