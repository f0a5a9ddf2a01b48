package proxy

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// CONNECT is served here rather than by goproxy, because goproxy v1.9.3:
//   - drops, with its ConnectHijack action, the bytes the HTTP server
//     buffered after the CONNECT request (a TLS ClientHello a client sends in
//     the same write, for instance);
//   - answers every failed dial 502 with err.Error() as the body, so it can
//     say neither 503 nor 504, and a *net.OpError from a bound dial prints
//     the egress address to the client;
//   - has no idle timeout on tunnels;
//   - hijacks connections that nobody tracks, so a graceful shutdown could
//     neither wait for its tunnels nor close them when time runs out.

// errTunnelIdle ends a tunnel that carried no byte for TunnelIdleTimeout.
var errTunnelIdle = errors.New("tunnel idle timeout")

// serveConnect dials the CONNECT target and answers. Once the tunnel is up,
// it hands the relay, and the exchange with it, to a goroutine of its own
// and returns, so that the HTTP server lets go of the connection's buffers.
func (s *Server) serveConnect(w http.ResponseWriter, r *http.Request, x *exchange) {
	rec := &x.rec
	rec.host = r.Host
	host, addr, err := connectTarget(r)
	if err != nil {
		s.log.Debug("bad CONNECT target", "client", r.RemoteAddr, "target", r.RequestURI, "err", err)
		refuse(w, rec, malformed(http.StatusBadRequest, "bad CONNECT target: want host:port"), true)
		return
	}
	rec.host = addr
	if e := checkDest(host, portOf(addr), x.access.ConnectPorts, "tunnels", "connect-ports"); e != nil {
		refuse(w, rec, e, true)
		return
	}
	if r.ProtoMajor != 1 {
		// Tunnels hijack the connection; the server speaks HTTP/1 only, but
		// ServeHTTP may be mounted elsewhere.
		refuse(w, rec, refusal(http.StatusHTTPVersionNotSupported, typeProtocolError, "CONNECT needs HTTP/1.1"), true)
		return
	}

	// A tunnel counts as one request for the shaper, when it opens.
	if !s.admit(w, r, host, rec, true) {
		return
	}
	st := stateFrom(r.Context())

	// Dial before answering, so that a failure gets a real status.
	upstream, err := s.dial(r.Context(), "tcp", addr)
	if err != nil {
		e := upstreamError(host, err)
		if clientGone(r.Context(), err) {
			e = errClientGone
		}
		if e.upstreamFault() {
			s.logUpstreamError(r, addr, e)
		}
		st.failed = e.upstreamFault()
		refuse(w, rec, e, true)
		return
	}

	client, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		_ = upstream.Close()
		s.log.Warn("cannot hijack CONNECT connection", "client", r.RemoteAddr, "err", err)
		refuse(w, rec, refusal(http.StatusInternalServerError, typeInternalError, "cannot open a tunnel on this connection"), true)
		return
	}
	t := newTunnel(client, upstream, s.cfg.TunnelIdleTimeout)
	if !s.track(t) { // Shutdown already force-closed everything
		rec.status = http.StatusServiceUnavailable
		return
	}
	rec.status = http.StatusOK
	st.answered = time.Now()
	if err := s.openTunnel(t, brw.Reader, rec, s.cfg.ClientTimeout); err != nil {
		s.log.Debug("tunnel: answering client", "client", r.RemoteAddr, "host", addr, "err", err)
		s.untrack(t)
		t.Close()
		return
	}
	x.handedOff = true
	go func() {
		defer s.settle(x)
		defer s.untrack(t)
		down, up, err := t.run()
		rec.down += down
		rec.up += up
		if err != nil {
			s.log.Debug("tunnel ended", "client", x.r.RemoteAddr, "host", addr, "err", err)
		}
	}()
}

// connectEstablished is the answer to a CONNECT whose tunnel is up.
var connectEstablished = []byte("HTTP/1.1 200 Connection established\r\n\r\n")

// openTunnel answers the client that its tunnel is established (within
// timeout: a client that reads nothing does not hold it), and sends
// upstream the bytes the client sent after its CONNECT request that the HTTP
// server already read into br.
func (s *Server) openTunnel(t *tunnel, br *bufio.Reader, rec *record, timeout time.Duration) error {
	_ = t.client.SetWriteDeadline(time.Now().Add(timeout))
	if _, err := t.client.Write(connectEstablished); err != nil {
		return err
	}
	_ = t.client.SetWriteDeadline(time.Time{}) // the tunnel's idle timeout bounds it now
	// The client may have sent its first bytes (a TLS ClientHello) in the
	// same write as the CONNECT request.
	if n := br.Buffered(); n > 0 {
		early, _ := br.Peek(n) // cannot fail: n bytes are buffered
		m, err := t.upstream.Write(early)
		rec.up += int64(m)
		if err != nil {
			return fmt.Errorf("replaying early bytes: %w", err)
		}
	}
	return nil
}

// connectTarget returns the host and the host:port to dial for a CONNECT
// request. The port defaults to 443.
func connectTarget(r *http.Request) (host, addr string, err error) {
	u := r.URL
	if u.Host == "" || u.Path != "" || u.RawQuery != "" || u.User != nil || u.Scheme != "" {
		return "", "", fmt.Errorf("CONNECT target %q is not in authority form", r.RequestURI)
	}
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil {
		var err2 error
		if host, port, err2 = net.SplitHostPort(u.Host + ":443"); err2 != nil {
			return "", "", fmt.Errorf("CONNECT target %q: %w", u.Host, err)
		}
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return "", "", fmt.Errorf("CONNECT target %q: bad port %q", u.Host, port)
	}
	// Only an IPv6 address has a colon; an IPv4 one passes as a host name
	// (and costs no failed parse, which allocates, for a name). A zoned
	// address is refused by checkDest, as a destination.
	if strings.Contains(host, ":") {
		if _, err := netip.ParseAddr(host); err != nil {
			return "", "", fmt.Errorf("CONNECT target %q: bad IPv6 address", u.Host)
		}
	} else if !validHostname(host) {
		return "", "", fmt.Errorf("CONNECT target %q: bad host name", u.Host)
	}
	if len(u.Host) == len(host)+len(":")+len(port) && !strings.Contains(host, ":") {
		return host, u.Host, nil // already host:port: no allocation
	}
	return host, net.JoinHostPort(host, port), nil
}

// validHostname reports whether h looks like a DNS name (IDNs in their
// ASCII form): letters, digits, '-', '_' and '.'.
func validHostname(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	for _, c := range []byte(h) {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9',
			c == '-', c == '_', c == '.':
		default:
			return false
		}
	}
	return true
}

// tunnel relays bytes between a hijacked client connection and an upstream
// connection, passing half-closes through and closing both after
// TunnelIdleTimeout without a byte either way.
//
// Between two TCP connections (see tcpConnOf), each direction waits until
// its source has bytes queued, without holding anything but the goroutine,
// and then has the kernel splice exactly those bytes to the destination
// (*net.TCPConn.ReadFrom of an io.LimitedReader of the source), without
// copying them to user space. It never calls ReadFrom on an empty socket:
// Go's splice takes a pipe (two descriptors and its kernel buffer) before
// it waits for the source, so an idle tunnel relayed by a plain io.Copy
// holds two pipes besides its two sockets. Other connections are relayed by
// io.Copy.
//
// Idleness is checked from outside: each direction waits under a read
// deadline one tick (a quarter of the idle timeout) away. A deadline on the
// read side loses nothing (splice moves what it drained into its pipe to the
// destination before returning); write deadlines, which could strand bytes
// in that pipe, are never set. When the deadline passes, bytes moved since
// count as activity; if the tunnel as a whole, both directions together,
// was silent for the idle timeout, it is closed, otherwise the deadline is
// moved on. A direction blocked writing to a peer that reads nothing
// (splice waits for room) never reaches its deadline: while the other
// direction waits on its own, that one notices the silence; once the other
// has ended (a half-close), the direction that ended watches for it (see
// finished).
type tunnel struct {
	client, upstream net.Conn
	idle             time.Duration
	start            time.Time
	last             atomic.Int64 // last byte either way, as time.Duration since start
	closeOnce        sync.Once
	closed           chan struct{} // closed by Close
	running          atomic.Int32  // directions still relaying

	// Each direction's splice state, and client->upstream's result (it
	// runs on a goroutine of its own), kept here to save allocations.
	downQ, upQ queued
	wg         sync.WaitGroup
	up         int64
	upErr      error
}

func newTunnel(client, upstream net.Conn, idle time.Duration) *tunnel {
	return &tunnel{client: client, upstream: upstream, idle: idle, start: time.Now(), closed: make(chan struct{})}
}

// Close closes both connections, ending both directions.
func (t *tunnel) Close() error {
	t.closeOnce.Do(func() {
		close(t.closed)
		_ = t.client.Close()
		_ = t.upstream.Close()
	})
	return nil
}

// run relays until both directions are done and returns the bytes copied
// upstream->client (down) and client->upstream (up), and what ended the
// tunnel if it was not a normal close.
func (t *tunnel) run() (down, up int64, err error) {
	t.running.Store(2)
	t.wg.Add(1)
	go t.runUp()
	down, err = t.pipe(t.client, t.upstream, &t.downQ)
	t.finished()
	t.wg.Wait()
	t.Close()
	return down, t.up, errors.Join(err, t.upErr)
}

func (t *tunnel) runUp() {
	defer t.wg.Done()
	t.up, t.upErr = t.pipe(t.upstream, t.client, &t.upQ)
	t.finished()
}

// finished is called by each direction when it has ended. The last one
// closes the tunnel. The first one, when the tunnel stays open (it ended
// with a half-close), watches it until then: the other direction may be
// blocked writing to a peer that reads nothing, and is then closed after
// the idle timeout like any silent tunnel.
func (t *tunnel) finished() {
	if t.running.Add(-1) == 0 {
		t.Close()
		return
	}
	tick := time.NewTicker(max(t.idle/4, time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-t.closed:
			return
		case <-tick.C:
			if time.Since(t.start)-time.Duration(t.last.Load()) >= t.idle {
				t.Close()
				return
			}
		}
	}
}

type closeWriter interface{ CloseWrite() error }

// testHookCopy, when set by a test, sees the destination and the source of
// every copy a tunnel makes, as passed to ReadFrom or io.Copy.
var testHookCopy func(dst io.Writer, src io.Reader)

// pipe copies src to dst until src reaches EOF, which it passes on to dst as
// a half-close, or until the tunnel fails, idles out or is closed. Between
// two TCP connections it splices with q.
func (t *tunnel) pipe(dst, src net.Conn, q *queued) (int64, error) {
	tick := max(t.idle/4, time.Millisecond)
	d, s := tcpConnOf(dst), tcpConnOf(src)
	var w *queued
	if d != nil && s != nil {
		if err := q.init(s); err != nil {
			t.Close()
			return 0, err
		}
		w = q
	}
	var total int64
	if err := src.SetReadDeadline(time.Now().Add(tick)); err != nil {
		t.Close()
		return total, quiet(err)
	}
	for {
		var n int64
		var err error
		if w != nil {
			n, err = w.spliceTo(d)
		} else {
			if testHookCopy != nil {
				testHookCopy(dst, src)
			}
			n, err = io.Copy(dst, src)
		}
		total += n
		if n > 0 {
			t.last.Store(int64(time.Since(t.start)))
		}
		switch {
		case err == nil && (w == nil || w.eof): // EOF from src
			if cw, ok := dst.(closeWriter); ok && cw.CloseWrite() == nil {
				return total, nil // the other direction goes on
			}
			t.Close() // cannot half-close dst: end the tunnel
			return total, nil
		case err == nil: // more to wait for
		case errors.Is(err, os.ErrDeadlineExceeded):
			if time.Since(t.start)-time.Duration(t.last.Load()) >= t.idle {
				t.Close()
				return total, errTunnelIdle
			}
			if err := src.SetReadDeadline(time.Now().Add(tick)); err != nil {
				t.Close()
				return total, quiet(err)
			}
		default:
			t.Close()
			return total, quiet(err)
		}
	}
}

// tcpConnOf returns the TCP connection c is or carries unchanged: c itself,
// or what its NetConn method returns (netutil.Conn). It returns nil for
// anything else, TLS included, whose bytes are not the socket's.
func tcpConnOf(c net.Conn) *net.TCPConn {
	for range 4 { // wrappers of wrappers, but not forever
		switch v := c.(type) {
		case *net.TCPConn:
			return v
		case *tls.Conn:
			return nil
		case interface{ NetConn() net.Conn }:
			c = v.NetConn()
		default:
			return nil
		}
	}
	return nil
}

// queued waits until a TCP connection has bytes to read, or has reached
// EOF, without reading them, and then lets the kernel splice exactly the
// bytes queued to a destination. It allocates nothing per wait or splice.
type queued struct {
	rc    syscall.RawConn
	ready func(fd uintptr) bool // q.check, bound once
	lr    io.LimitedReader      // of src, for ReadFrom

	n     int32         // bytes queued (SIOCINQ)
	peek  [1]byte       // MSG_PEEK target
	eof   bool          // src sent FIN and every byte before it was moved
	errno syscall.Errno // the socket's error, if any
}

// init readies q to wait on src.
func (q *queued) init(src *net.TCPConn) error {
	rc, err := src.SyscallConn()
	if err != nil {
		return err
	}
	*q = queued{rc: rc, lr: io.LimitedReader{R: src}}
	q.ready = q.check
	return nil
}

// spliceTo waits until src has bytes queued and moves them to dst, or
// sets q.eof. It returns the bytes moved and the error that ended the wait
// or the splice (os.ErrDeadlineExceeded for src's read deadline).
func (q *queued) spliceTo(dst *net.TCPConn) (int64, error) {
	q.n, q.errno = 0, 0
	if err := q.rc.Read(q.ready); err != nil {
		return 0, err
	}
	if q.errno != 0 {
		return 0, q.errno
	}
	if q.n == 0 {
		q.eof = true
		return 0, nil
	}
	q.lr.N = int64(q.n)
	if testHookCopy != nil {
		testHookCopy(dst, &q.lr)
	}
	return dst.ReadFrom(&q.lr)
}

// check is the RawConn.Read callback: it returns false, to wait for the
// socket to become readable, while nothing is queued and no EOF or error
// arrived.
func (q *queued) check(fd uintptr) bool {
	for {
		if _, _, e := unix.RawSyscall(unix.SYS_IOCTL, fd, unix.SIOCINQ, uintptr(unsafe.Pointer(&q.n))); e != 0 {
			q.errno = e
			return true
		}
		if q.n > 0 {
			return true
		}
		// Nothing queued: either nothing came yet, or EOF, which only a
		// read tells apart.
		n, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&q.peek[0])), 1,
			unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
		switch {
		case e == unix.EAGAIN:
			return false
		case e == unix.EINTR:
		case e != 0:
			q.errno = e
			return true
		case n == 0:
			return true // EOF, with q.n == 0
		}
		// A byte arrived between the two calls: count again.
	}
}

// quiet drops errors that only say the connection was closed or reset.
func quiet(err error) error {
	if isClosedConn(err) {
		return nil
	}
	return err
}
