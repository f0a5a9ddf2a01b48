package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy/relay"
	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/stats"
)

// Every request, plain HTTP, CONNECT or SOCKS5, takes the same steps, in
// this order; ServeHTTP with serveForward or serveConnect, and serveSOCKS,
// read as this list:
//
//  1. admit the client: its address, its credentials and the session key
//     it asks for (authorize; SOCKS5: socksHandshake);
//  2. parse the target, and refuse a port or an address that is never
//     dialed (checkDest);
//  3. pick the address: the session whose address the request leaves
//     from, if any (useSession); the dial takes that address, the
//     connection's (RotateConnection) or a fresh one (dial);
//  4. shape: account the request to its upstream and wait for its turn
//     (shape);
//  5. dial the upstream (dial), and tell the client what failed (fail);
//  6. relay: goproxy for plain HTTP (goproxy.go), a relay.Tunnel for
//     CONNECT and SOCKS5;
//  7. record: the statistics and the access log line (record).
//
// What the steps learn goes into one request value, which travels in the
// request's context, so that the dial (which sees only a context) and
// goproxy's handlers (which see only the http.Request) find it.

// request is one request or tunnel, from its admission to its access log
// line.
type request struct {
	start  time.Time
	method string  // the HTTP method, or "SOCKS5"
	remote string  // the client's address, host:port
	client *client // the client address it counts against; nil if it came through no listener of ours

	// Admission.
	access     *Access // the same rules for the whole request, across a reload
	user       string  // the proxy user, when users authenticate; never a password
	sessionKey string  // the session key the client asked for, "" for none (RotateSession uses it)
	// rotate says how the client asked its session for a new address, if
	// it did (RotateSession): the header, or the user name's -rotate.
	rotate stats.RotateReason

	// The target.
	host string // host:port the client asked for, for the log

	// The address. held is the client connection's (RotateConnection), done
	// ends the request's use of its session (RotateSession).
	held     *heldAddr
	done     func()
	sessAddr *sessionAddr // the session address a plain HTTP request's round trip took (RotateSession)
	addrs    atomic.Int32 // addrNone, addrCounted or addrEnded: a fresh egress address counted against client (see dialHeld)
	ipv4     atomic.Bool  // the upstream connection left from the host's own IPv4 address
	mu       sync.Mutex   // egress is set from the transport's goroutine
	egress   string       // source IP of the upstream connection

	// Shaping: the normalized upstream host and its statistics, set once
	// the request was attributed to it; when the shaper let it through, and
	// its permit, released when the request ends.
	upstreamHost string
	upstream     *stats.Upstream
	admitted     time.Time
	permit       shape.Permit

	// The outcome. Handler goroutine only.
	status   int
	down     int64  // bytes sent to the client: response body, or upstream->client in a tunnel
	up       int64  // bytes sent upstream: request body, or client->upstream in a tunnel
	own      int64  // of down, the bytes of egressd's own error answer
	reason   string // why egressd refused or failed the request, as the client was told
	refused  stats.Refusal
	failed   bool      // egressd answered an upstream failure itself (502, 503, 504)
	answered time.Time // the upstream's response head arrived, or the tunnel was established

	handedOff bool     // a tunnel records the request when it ends, not ServeHTTP
	fwd       fwdState // plain HTTP: what goproxy's handlers need (goproxy.go)
}

type requestKey struct{}

// withRequest returns ctx carrying x.
func withRequest(ctx context.Context, x *request) context.Context {
	return context.WithValue(ctx, requestKey{}, x)
}

// requestFrom returns the request ctx carries, if any.
func requestFrom(ctx context.Context) *request {
	x, _ := ctx.Value(requestKey{}).(*request)
	return x
}

// refusedWith records e as the request's outcome, as the client was told.
func (x *request) refusedWith(e *Error) {
	x.status, x.reason, x.refused = e.Status, e.Reason, e.refused
}

func (x *request) setEgress(a net.Addr) {
	var ip string
	switch a := a.(type) {
	case *net.TCPAddr:
		ip = a.AddrPort().Addr().Unmap().String()
	case nil:
	default:
		ip = a.String()
		if h, _, err := net.SplitHostPort(ip); err == nil {
			ip = h
		}
	}
	x.mu.Lock()
	x.egress = ip
	x.mu.Unlock()
}

func (x *request) getEgress() string {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.egress
}

// directIPv4 is implemented by an upstream connection that can tell whether
// it left from the host's own IPv4 address rather than a fresh IPv6 one, as
// egressd's dialer does for a host with no IPv6 address (-ipv4 direct).
type directIPv4 interface{ DirectIPv4() bool }

var _ directIPv4 = (*netutil.Conn)(nil)

// dialedFrom records the egress address of c, an upstream connection of x,
// and whether it left from the host's own IPv4 address.
func (x *request) dialedFrom(c net.Conn) bool {
	x.setEgress(c.LocalAddr())
	if d, ok := c.(directIPv4); ok && d.DirectIPv4() {
		x.ipv4.Store(true)
		return true
	}
	return false
}

// Whether a request counts a fresh egress address against its client
// (MaxAddrsPerClient).
const (
	addrNone    int32 = iota
	addrCounted       // its dial took a fresh address, counted until it ends
	addrEnded         // it ended: a dial still running counts nothing more
)

// countAddr counts the fresh egress address a dial of x is about to take
// against its client, unless x counts one already. A dial that outlives
// its request (the transport finishes a dial its request gave up on) gets
// an error, so that the count finish gave back is never taken again.
func (x *request) countAddr() error {
	if x.addrs.CompareAndSwap(addrNone, addrCounted) {
		if e := x.client.reserveAddr(); e != nil {
			x.addrs.Store(addrNone)
			return e
		}
		return nil
	}
	if x.addrs.Load() == addrEnded {
		return context.Canceled // the request is over: its client went away
	}
	return nil
}

// releaseAddr gives back the fresh egress address the request counted
// against its client, if it did; end says the request is over.
func (x *request) releaseAddr(end bool) {
	var released bool
	if end {
		released = x.addrs.Swap(addrEnded) == addrCounted
	} else {
		released = x.addrs.CompareAndSwap(addrCounted, addrNone)
	}
	if released {
		x.client.releaseAddr()
	}
}

// Step 3: pick the address.

// useSession begins the request's use of its session (RotateSession with a
// key): the session's address is the one its dials leave from, and the
// session does not idle out until the request (or its tunnel) ends. A
// request that asked for a new address (x.rotate) gets it here. It returns
// ctx carrying the session.
func (s *Server) useSession(ctx context.Context, x *request) (context.Context, *Error) {
	ctx, done, err := s.beginSession(ctx, x.sessionKey)
	if err != nil {
		e, ok := errors.AsType[*Error](err)
		if !ok {
			e = refusal(http.StatusServiceUnavailable, typeInternalError, "%s", err)
		}
		return ctx, e
	}
	x.done = done
	if sess := sessionOf(ctx); sess != nil && x.rotate != 0 {
		s.rotate(ctx, sess, nil, x.rotate) // before its dial: the request leaves from the new address
	}
	return ctx, nil
}

// Step 4: shape.

// statusClientClosed is what the access log says of a request whose client
// went away before it was answered (nginx's 499).
const statusClientClosed = 499

// shape accounts x to its upstream, host, and waits for its turn under the
// shaper. It returns nil if the request may go on. Otherwise it returns the
// refusal to answer (429, for the shaper's *shape.RejectError, counted as
// rejected), or nil with ok false if ctx was done first: the client went
// away, and x says so. Either way record finishes the request.
func (s *Server) shape(ctx context.Context, x *request, host string) (_ *Error, ok bool) {
	host = shape.NormHost(host)
	shaper := s.shaper.Load() // the same one for the whole request, across a reload
	rule := ""
	if shaper != nil {
		if ru, ok := shaper.RuleFor(host); ok {
			rule = ru.Host
		}
	}
	up := s.stats.Upstream(host, rule)
	x.upstreamHost, x.upstream = host, up
	up.Requests.Add(1)
	if shaper == nil {
		x.admitted = time.Now()
		up.InFlight.Add(1)
		return nil, true
	}

	start := time.Now()
	up.Waiting.Add(1)
	permit, err := shaper.Acquire(ctx, host)
	up.Waiting.Add(-1)
	now := time.Now()
	up.WaitNanos.Add(int64(now.Sub(start)))
	if err != nil {
		if rej, ok := errors.AsType[*shape.RejectError](err); ok {
			up.Rejected.Add(1)
			return shaped(rej), false
		}
		// The client hung up while waiting; there is nobody to answer.
		x.status = statusClientClosed
		return nil, false
	}
	x.admitted, x.permit = now, permit
	up.InFlight.Add(1)
	if rule != "" && s.log.Enabled(ctx, slog.LevelDebug) {
		// When a rule let the request go upstream: the pacing egressd
		// promises, apart from the network's delays after it.
		s.log.LogAttrs(ctx, slog.LevelDebug, "admitted", slog.String("host", host),
			slog.String("rule", rule), slog.Duration("waited", now.Sub(start)))
	}
	return nil, true
}

// Step 5: dial.

// dial is the only way the proxy opens upstream connections: from the
// address the request picked (the connection's or its session's held
// address), or from a fresh one (cfg.Dial), under DialTimeout, recording
// the egress address, and whether the connection went over the host's own
// IPv4 address, in the request ctx carries, if any.
func (s *Server) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	h, sess, err := s.heldFor(ctx)
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", addr, err)
	}
	if sess != nil {
		return s.dialSession(ctx, sess, network, addr)
	}
	return s.dialHeld(ctx, h, network, addr)
}

// dialHeld is dial from the held address h, or from a fresh one (cfg.Dial)
// when h is nil. A fresh address counts against its client's
// MaxAddrsPerClient until the request ends (see finish).
func (s *Server) dialHeld(ctx context.Context, h *heldAddr, network, addr string) (net.Conn, error) {
	x := requestFrom(ctx)
	if h == nil && x != nil {
		if err := x.countAddr(); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
	defer cancel()
	dial := s.cfg.Dial
	if h != nil {
		var err error
		if dial, err = h.dialer(ctx, s.cfg.Hold); err != nil {
			return nil, fmt.Errorf("dialing %s: %w", addr, err)
		}
	}
	conn, err := dial(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", addr, err)
	}
	if h != nil {
		h.dialed(conn)
	}
	if x != nil && x.dialedFrom(conn) {
		x.releaseAddr(false) // the host's own IPv4 address: no egress address held
	}
	return conn, nil
}

// fail is what the client of x is told when its dial or round trip to the
// upstream failed with err, for every protocol: the failure as classify
// says it, unless the client is to blame: its request body failed (plain
// HTTP), or it went away (ctx, the upstream work's, was canceled). An
// upstream's fault is logged, and counted as its error. name is the host
// the client asked for.
func (s *Server) fail(ctx context.Context, x *request, name string, err error) *Error {
	e := classify(name, err)
	gone := clientGone(ctx, err)
	var bodyErr *Error
	if b := x.fwd.clientBody; b != nil {
		// The client's body failed (stalled, malformed, cut short): that,
		// not the upstream, is why the round trip failed. Failing it may
		// also have ended the client's connection, so this comes first.
		if gone {
			b.settle() // its reader may not have seen its own error yet
		}
		bodyErr = b.err.Load()
	}
	switch {
	case bodyErr != nil:
		e = bodyErr
	case gone:
		e = errClientGone
	}
	if e.upstreamFault() {
		level := slog.LevelWarn
		if ctx.Err() != nil {
			level = slog.LevelDebug // the client went away; nothing to tell the operator
		}
		s.log.Log(ctx, level, "upstream failed", "client", x.remote, "method", x.method, "host", x.host,
			"status", e.Status, "err", e.Err)
	}
	x.failed = e.upstreamFault()
	return e
}

// Step 6: relay.

// testHookCopy, when set by a test, sees the destination and the source of
// every copy a tunnel makes (relay.Tunnel.OnCopy).
var testHookCopy func(dst io.Writer, src io.Reader)

// newTunnel returns the tunnel of a CONNECT or SOCKS5 request, once its
// upstream is dialed.
func (s *Server) newTunnel(client, upstream net.Conn) *relay.Tunnel {
	t := relay.New(client, upstream, s.cfg.TunnelIdleTimeout)
	t.OnCopy = testHookCopy
	return t
}

// runTunnel relays until the tunnel ends, and records its bytes.
func (s *Server) runTunnel(x *request, t *relay.Tunnel) {
	down, up, err := t.Run()
	x.down += down
	x.up += up
	if err != nil {
		s.log.Debug("tunnel ended", "client", x.remote, "host", x.host, "err", err)
	}
}

// Step 7: record.

// record ends the request: its use of its session, the held address of a
// hijacked client connection, its statistics and its access log line.
// extra attributes go at the end of the line. A request with no status
// (a SOCKS5 client that hung up without a byte: a port probe) is counted
// but not logged.
func (s *Server) record(x *request, extra ...slog.Attr) {
	if x.done != nil {
		x.done()
	}
	x.sessAddr.closeIdleIfRetired()
	if x.held != nil && x.held.hijacked.Load() {
		x.held.end()
	}
	s.finish(x)
	if x.status != 0 {
		s.logRequest(x, extra...)
	}
}

// finish ends the accounting of a request: the fresh egress address it
// held, the refusal it counts as, its bytes, and for one that shape let
// through (x.admitted is set only then) its permit, in-flight count,
// whether it went over IPv4, error and latency.
func (s *Server) finish(x *request) {
	x.releaseAddr(true)
	s.clientStats.Refuse(x.refused)
	s.clientStats.Refuse(x.fwd.refused)
	up := x.upstream
	if up == nil {
		return // refused before it was attributed to an upstream (400)
	}
	up.BytesUp.Add(uint64(max(x.up, 0)))
	up.BytesDown.Add(uint64(max(x.down-x.own, 0))) // only what came from upstream
	if x.admitted.IsZero() {
		return // refused with 429, or the client left while waiting
	}
	x.permit.Release()
	up.InFlight.Add(-1)
	if x.ipv4.Load() {
		up.IPv4.Add(1)
	}
	if x.failed || x.fwd.bodyErr != nil {
		up.Errors.Add(1)
	}
	if !x.answered.IsZero() {
		up.Latency.Observe(x.answered.Sub(x.admitted))
	}
}

// logRequest writes the access log line of x, the same for every protocol.
// extra attributes go at the end.
func (s *Server) logRequest(x *request, extra ...slog.Attr) {
	attrs := append([]slog.Attr{
		slog.String("client", x.remote),
		slog.String("method", x.method),
		slog.String("host", x.host),
		slog.Int("status", x.status),
		slog.Int64("bytes", x.down),
		slog.Int64("bytes_up", x.up),
		slog.Duration("duration", time.Since(x.start)),
		slog.String("egress", x.getEgress()),
	}, extra...)
	if x.user != "" {
		attrs = append(attrs, slog.String("user", x.user))
	}
	if x.reason != "" {
		attrs = append(attrs, slog.String("reason", x.reason))
	}
	s.log.LogAttrs(context.Background(), slog.LevelInfo, "request", attrs...)
}

// logRefused writes the access log line of a client refused before any
// request was read (a connection over a cap, a request head net/http
// refused): n bytes of e were written to it since start.
func (s *Server) logRefused(remote, method string, e *Error, n int, start time.Time, extra ...slog.Attr) {
	x := request{start: start, remote: remote, method: method, down: int64(n), own: int64(n)}
	x.refusedWith(e)
	s.logRequest(&x, extra...)
}
