package proxy

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/egressd/egressd/proxy/stats"
)

// Every client connection, HTTP or SOCKS5, comes through a clientListener:
// it is counted against Limits (a connection over a cap is answered 503 and
// closed), accepting backs off when file descriptors run out instead of
// spinning, and the connection is a clientConn, which gives each write to
// an HTTP client a deadline and takes over the answers net/http writes by
// itself to requests it cannot parse (see takeOver).

// Accept's backoff when accepting fails (file descriptors exhausted, say),
// as http.Server's own.
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)

// maxRefusing bounds the refusals of connections over a cap being answered
// at once; past it, such connections are closed without a word, so that a
// flood of them costs no more than the cap allows.
const maxRefusing = 64

// refuseTimeout bounds answering a connection refused over a cap.
const refuseTimeout = 2 * time.Second

// clientListener is a listener of client connections (see above).
type clientListener struct {
	net.Listener
	s     *Server
	socks bool // SOCKS5, not HTTP: refusals speak SOCKS5

	done      chan struct{} // closed by Close
	closeOnce sync.Once

	mu      sync.Mutex
	reserve *os.File // a spare descriptor, to accept and refuse a connection when none are left
}

// listen wraps ln as a listener of client connections.
func (s *Server) listen(ln net.Listener, socks bool) *clientListener {
	return &clientListener{Listener: ln, s: s, socks: socks, done: make(chan struct{}), reserve: openReserve()}
}

// openReserve opens the spare descriptor, or returns nil if it cannot.
func openReserve() *os.File {
	f, err := os.Open(os.DevNull)
	if err != nil {
		return nil
	}
	return f
}

// Close closes the listener first, which ends an Accept in progress, also
// the spare descriptor's.
func (l *clientListener) Close() error {
	err := l.Listener.Close()
	l.closeOnce.Do(func() {
		close(l.done)
		l.mu.Lock()
		if l.reserve != nil {
			_ = l.reserve.Close()
			l.reserve = nil
		}
		l.mu.Unlock()
	})
	return err
}

// Accept returns the next client connection within the limits. A
// connection over a cap is refused here (503, or the SOCKS5 general
// failure) and never returned. When accepting fails for a reason that
// passes (EMFILE, ENFILE, ...), it waits, from 5 ms doubling up to 1 s,
// and tries again: one log line per episode, every failure counted. When
// file descriptors ran out, the spare one is given up to accept one waiting
// connection and answer it 503, rather than leave every client hanging.
func (l *clientListener) Accept() (net.Conn, error) {
	var delay time.Duration
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			if !temporary(err) || l.isClosed() {
				return nil, err
			}
			l.s.clientStats.AcceptErrors.Add(1)
			if delay == 0 {
				l.s.log.Warn("accepting client connections failed: backing off until it works again",
					"listener", l.Addr().String(), "err", err)
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				l.refuseWithReserve()
			}
			delay = min(max(2*delay, acceptBackoffMin), acceptBackoffMax)
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-l.done:
				t.Stop()
			}
			continue
		}
		delay = 0
		cl, e := l.s.clients.enter(clientAddr(c.RemoteAddr()))
		if e != nil {
			l.s.refuseConn(c, e, l.socks)
			continue
		}
		return &clientConn{Conn: c, s: l.s, client: cl, http: !l.socks}, nil
	}
}

func (l *clientListener) isClosed() bool {
	select {
	case <-l.done:
		return true
	default:
		return false
	}
}

// temporary reports whether an accept error passes with time (file
// descriptors or memory running out), as http.Server judges it.
func temporary(err error) bool {
	ne, ok := err.(net.Error)
	//lint:ignore SA1019 what http.Server checks, for EMFILE, ENFILE, ...
	return ok && ne.Temporary()
}

// errFDsExhausted answers the connection accepted with the spare
// descriptor.
var errFDsExhausted = clientRefusal(stats.RefusedFDsExhausted, http.StatusServiceUnavailable, typeConnLimit,
	"egressd has run out of file descriptors: try again later")

// refuseWithReserve closes the spare descriptor, accepts one connection
// with it, answers it 503 (HTTP; SOCKS5 is closed) and closes it, and opens
// the spare again. The answer is written at once into the new socket's
// buffer; what the client already sent is read first, so that the close
// sends FIN rather than a reset that would lose the answer.
func (l *clientListener) refuseWithReserve() {
	l.mu.Lock()
	if l.reserve != nil {
		_ = l.reserve.Close()
		l.reserve = nil
	}
	l.mu.Unlock()
	// EMFILE comes only with a connection waiting, so this does not block
	// (or Close ends it).
	if c, err := l.Listener.Accept(); err == nil {
		l.s.clientStats.Refuse(errFDsExhausted.refused)
		start := time.Now()
		var n int
		if !l.socks {
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
			_, _ = c.Read(make([]byte, 4096))
			_ = c.SetWriteDeadline(time.Now().Add(10 * time.Millisecond))
			n, _ = c.Write(rawResponse(errFDsExhausted))
		}
		_ = c.Close()
		l.s.logRefusedConn(c, l.socks, errFDsExhausted, n, start)
	}
	l.mu.Lock()
	if !l.isClosed() {
		l.reserve = openReserve()
	}
	l.mu.Unlock()
}

// refuseConn answers a connection refused over a cap and closes it: 503 for
// HTTP (without reading the request), the general failure reply for SOCKS5,
// after the method negotiation the protocol needs. At most maxRefusing are
// answered at once; others are closed at once.
func (s *Server) refuseConn(c net.Conn, e *Error, socks bool) {
	s.clientStats.Refuse(e.refused)
	select {
	case s.refusing <- struct{}{}:
	default:
		_ = c.Close()
		s.logRefusedConn(c, socks, e, 0, time.Now())
		return
	}
	go func() {
		defer func() { <-s.refusing }()
		start := time.Now()
		_ = c.SetDeadline(start.Add(min(refuseTimeout, s.cfg.ClientTimeout)))
		var n int
		if socks {
			if methods, err := socksGreeting(c); err == nil {
				_ = socksRefuse(c, methods, e.socksReply())
			}
		} else {
			n, _ = c.Write(rawResponse(e))
		}
		lingerClose(c)
		_ = c.Close()
		s.logRefusedConn(c, socks, e, n, start)
	}()
}

// logRefusedConn writes the access log line of a connection refused before
// any request was read.
func (s *Server) logRefusedConn(c net.Conn, socks bool, e *Error, n int, start time.Time) {
	if socks {
		s.logRefused(c.RemoteAddr().String(), "SOCKS5", e, n, start, slog.Int("socks_reply", int(e.socksReply())))
		return
	}
	s.logRefused(c.RemoteAddr().String(), "-", e, n, start)
}

// rawResponse is e as a whole HTTP/1.1 response that closes the
// connection, for answers written straight to a connection.
func rawResponse(e *Error) []byte {
	body := e.body()
	return []byte("HTTP/1.1 " + strconv.Itoa(e.Status) + " " + http.StatusText(e.Status) + "\r\n" +
		"Content-Type: text/plain; charset=utf-8\r\n" +
		"X-Content-Type-Options: nosniff\r\n" +
		"Proxy-Status: " + e.proxyStatus() + "\r\n" +
		"Connection: close\r\n" +
		"Content-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body)
}

// clientConn is a client connection accepted by a clientListener. Closing it
// counts it closed for its client. It carries the accepted connection
// unchanged (NetConn), so that tunnels splice between TCP sockets and the
// half-close check finds the socket.
//
// On an HTTP connection (not once hijacked by a tunnel, whose deadlines
// are its own) every write has a deadline ClientTimeout away, so that a
// client that stops reading its response is cut off; and a write while no
// handler ran for the request being read is net/http answering a request it
// could not parse by itself, which egressd takes over (see takeOver).
type clientConn struct {
	net.Conn
	s      *Server
	client *client
	http   bool
	closed atomic.Bool

	hijacked      atomic.Bool // a tunnel or WebSocket relay owns the connection
	served        atomic.Bool // ServeHTTP runs or ran for the request being answered
	writeTimedOut atomic.Bool // a write to the client missed its deadline

	// What net/http's connection goroutine (and ServeHTTP, which runs on
	// it) sees of the request head being read, until ServeHTTP is called:
	// for the log line of a request net/http refuses by itself, or that
	// times out.
	head      []byte
	headStart time.Time
	requests  int  // requests ServeHTTP was called for
	logged    bool // the connection's timeout was logged
}

var (
	_ io.ReaderFrom = (*clientConn)(nil)
	_ closeWriter   = (*clientConn)(nil)
)

// maxHead bounds the head bytes kept: net/http reads at most
// MaxHeaderBytes plus 4096 for a head. keepHead is the buffer kept across
// requests; a bigger one is dropped after its request.
const (
	maxHead  = maxHeaderBytes + 4096
	keepHead = 4 << 10
)

// NetConn returns the accepted connection.
func (c *clientConn) NetConn() net.Conn { return c.Conn }

func (c *clientConn) Close() error {
	err := c.Conn.Close()
	if c.closed.CompareAndSwap(false, true) {
		c.client.leave()
	}
	return err
}

// CloseWrite half-closes the connection, if it can.
func (c *clientConn) CloseWrite() error {
	if cw, ok := c.Conn.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

// CloseRead shuts the reading side, if it can.
func (c *clientConn) CloseRead() error {
	if cr, ok := c.Conn.(interface{ CloseRead() error }); ok {
		return cr.CloseRead()
	}
	return errors.ErrUnsupported
}

// inHead reports whether the connection is reading a request head for
// net/http, before any handler: only net/http's connection goroutine reads
// then.
func (c *clientConn) inHead() bool {
	return c.http && !c.served.Load() && !c.hijacked.Load()
}

func (c *clientConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if !c.inHead() {
		return n, err
	}
	if n > 0 {
		if len(c.head) == 0 {
			c.headStart = time.Now()
			if c.head == nil {
				c.head = make([]byte, 0, min(max(n, 512), keepHead))
			}
		}
		if room := maxHead - len(c.head); room > 0 {
			c.head = append(c.head, p[:min(n, room)]...)
		}
	}
	// Waiting for a request head timed out: net/http closes the connection
	// without a word. A keep-alive connection that waited for its next
	// request in vain (no byte of it) merely idled out.
	if err != nil && isTimeout(err) && !c.logged && (len(c.head) > 0 || c.requests == 0) {
		c.logged = true
		reason := "request head not complete within " + c.s.cfg.ClientTimeout.String() + " (-client-timeout)"
		if len(c.head) == 0 {
			reason = "no request within " + c.s.cfg.ClientTimeout.String() + " (-client-timeout)"
			c.headStart = time.Now().Add(-c.s.cfg.ClientTimeout)
		}
		e := clientRefusal(stats.RefusedHeaderTimeout, http.StatusRequestTimeout, typeRequestError, "%s", reason)
		c.logHead(e, 0)
	}
	return n, err
}

// logHead writes the access line of a request that never reached ServeHTTP
// (its method, if a token could be read), and counts its refusal.
func (c *clientConn) logHead(e *Error, n int) {
	c.s.clientStats.Refuse(e.refused)
	c.s.logRefused(c.RemoteAddr().String(), headMethod(c.head), e, n, c.headStart)
}

func (c *clientConn) Write(p []byte) (int, error) {
	if !c.http || c.hijacked.Load() {
		return c.Conn.Write(p)
	}
	if !c.served.Load() {
		return c.takeOver(p)
	}
	return c.writeTimed(p)
}

// writeTimed writes p under a deadline ClientTimeout away.
func (c *clientConn) writeTimed(p []byte) (int, error) {
	_ = c.Conn.SetWriteDeadline(time.Now().Add(c.s.cfg.ClientTimeout))
	n, err := c.Conn.Write(p)
	if err != nil && isTimeout(err) {
		c.writeTimedOut.Store(true)
	}
	return n, err
}

// ReadFrom copies a response body to an HTTP client write by write, each
// under its deadline, with a pooled buffer; other connections copy as the
// accepted connection does (splice, for a TCP source).
func (c *clientConn) ReadFrom(r io.Reader) (int64, error) {
	if !c.http || c.hijacked.Load() {
		return io.Copy(c.Conn, r)
	}
	buf := copyBufs.Get().(*[32 << 10]byte)
	defer copyBufs.Put(buf)
	return io.CopyBuffer(writeOnly{c}, r, buf[:])
}

// takeOver is a write that net/http makes by itself, before any handler:
// its answer to a request it refused (a malformed head, a head over
// MaxHeaderBytes, an Expect it does not support, ...). egressd writes its
// own answer instead, with the same status, a one-line reason and
// Proxy-Status, logs the request like any other and counts it. net/http
// closes the connection afterwards.
func (c *clientConn) takeOver(p []byte) (int, error) {
	e := netHTTPRefusal(p, c.head)
	resp := rawResponse(e)
	n, err := c.writeTimed(resp)
	c.logHead(e, n)
	c.head = c.head[:0]
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// startRequest marks the request whose head was read as served by
// ServeHTTP. It runs on the connection's goroutine.
func (c *clientConn) startRequest() {
	c.served.Store(true)
	c.requests++
	c.resetHead()
}

// nextRequest readies the connection for its next request head, once the
// last response was written (http.StateIdle).
func (c *clientConn) nextRequest() {
	c.served.Store(false)
	c.resetHead()
}

// hijack marks the connection as handed to a tunnel (http.StateHijacked):
// its deadlines are the tunnel's from now on.
func (c *clientConn) hijack() {
	c.hijacked.Store(true)
	c.head = nil
}

func (c *clientConn) resetHead() {
	if cap(c.head) > keepHead {
		c.head = nil
	}
	c.head = c.head[:0]
}

// clientConnOf returns the client connection a request came on, if it came
// through a clientListener.
func clientConnOf(r *http.Request) *clientConn {
	cc, _ := r.Context().Value(clientConnKey{}).(*clientConn)
	return cc
}
