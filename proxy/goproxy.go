package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/egressd/egressd/proxy/stats"
	"github.com/elazarl/goproxy"
)

// The adapter between egressd and goproxy, which forwards plain HTTP
// requests: goproxy's server with our transport (newTransport, newGoproxy),
// its request and response handlers (onResponse), the round trip and dial
// it makes through us (roundTrip, dialHTTP), and the response writer it
// writes to. What they tell each other of a request is in its fwdState,
// which they find in the request's context (requestFrom).

var errConnectViaGoproxy = errors.New("CONNECT must be served by egressd, not goproxy")

// fwdState is what the goproxy adapter keeps of one plain HTTP request. It
// is part of the request, so that a request allocates none of it.
type fwdState struct {
	// clientBody is the request body as read from the client, whose errors
	// are the client's fault, not the upstream's.
	clientBody *clientBody
	// flush is set by onResponse when the upstream body has unknown length
	// or is an event stream; responseWriter then flushes after every
	// write.
	flush bool
	// bodyErr is the first error reading the upstream response body
	// (goproxy copies the body on the handler goroutine).
	bodyErr error
	// refused is the client refusal a failed round trip counts as
	// (onResponse).
	refused stats.Refusal

	// The request's upstreamBody, headSniffer, responseWriter, and trace
	// on a session's transport (RotateSession).
	body    upstreamBody
	sniffer headSniffer
	rw      responseWriter
	trace   httptrace.ClientTrace

	mu         sync.Mutex // connection is set on the transport's goroutine
	connection []string   // the upstream response's Connection header, raw
}

func (f *fwdState) setConnection(v []string) {
	f.mu.Lock()
	f.connection = v
	f.mu.Unlock()
}

func (f *fwdState) getConnection() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.connection
}

// newTransport returns the transport goproxy forwards plain HTTP requests
// with. It replaces goproxy's default, which skips TLS verification and
// takes a proxy from the environment.
func (s *Server) newTransport() *http.Transport {
	return &http.Transport{
		Proxy:       nil, // never chain to another proxy
		DialContext: s.dialHTTP,
		// No upstream keep-alive: every request opens a new connection and so
		// leaves from a fresh address, even a keep-alive client's second one.
		DisableKeepAlives: true,
		// Pass Accept-Encoding and encoded bodies through untouched.
		DisableCompression: true,
		// HTTP/1.1 upstream only. TLSClientConfig stays nil: certificates are
		// verified.
		ForceAttemptHTTP2:     false,
		TLSHandshakeTimeout:   tlsHandshakeTimeout,
		ResponseHeaderTimeout: s.cfg.ResponseHeaderTimeout,
		ExpectContinueTimeout: time.Second,
	}
}

// newGoproxy returns the goproxy server that forwards plain HTTP requests.
func (s *Server) newGoproxy() *goproxy.ProxyHttpServer {
	gp := goproxy.NewProxyHttpServer()
	gp.Verbose = false
	gp.Logger = goproxyLogger{s.log}
	gp.Tr = s.tr
	gp.KeepAcceptEncoding = true
	gp.AllowHTTP2 = false

	// ServeHTTP handles CONNECT itself, so goproxy never dials for a tunnel.
	// Should it ever, refuse: NewProxyHttpServer's ConnectDial would chain
	// to $HTTPS_PROXY, and goproxy would send the error text to the client.
	gp.ConnectDialWithReq = func(*http.Request, string, string) (net.Conn, error) {
		return nil, errConnectViaGoproxy
	}
	gp.ConnectDial = func(string, string) (net.Conn, error) { return nil, errConnectViaGoproxy }
	gp.NonproxyHandler = http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_ = writeError(w, errNotProxy, false)
	})

	roundTripper := goproxy.RoundTripperFunc(s.roundTrip)
	gp.OnRequest().DoFunc(func(req *http.Request, ctx *goproxy.ProxyCtx) (*http.Request, *http.Response) {
		removeHopByHop(req.Header, nil, isWebsocketUpgrade(req.Header))
		ctx.RoundTripper = roundTripper
		return req, nil
	})
	gp.OnResponse().DoFunc(s.onResponse)
	return gp
}

// onResponse runs on every upstream response before goproxy copies it to
// the client, and with resp == nil when the round trip failed.
func (s *Server) onResponse(resp *http.Response, ctx *goproxy.ProxyCtx) *http.Response {
	r := ctx.Req
	x := requestFrom(r.Context())
	if resp == nil {
		err := ctx.Error
		if err == nil {
			err = errors.New("no response from upstream")
		}
		e := s.fail(r.Context(), x, r.URL.Hostname(), err)
		x.reason = e.Reason
		x.fwd.refused = e.refused
		// Our own response, so that goproxy's 500 with the error text (and
		// the egress address in it) is never used.
		out := goproxy.NewResponse(r, "text/plain; charset=utf-8", e.Status, e.body())
		out.Header.Set("X-Content-Type-Options", "nosniff")
		out.Header.Set("Proxy-Status", e.proxyStatus())
		if x.fwd.clientBody != nil && e.refused != 0 {
			// What is left of the client's body cannot be read: the
			// connection ends with this answer.
			out.Header.Set("Connection", "close")
		}
		return out
	}

	// Among others, this removes the upstream's "Connection: close" (it
	// sends one, because the transport asks for it), which would otherwise
	// close the client's keep-alive connection to the proxy. The
	// upstream's Connection header names more, which Go's client drops if
	// it says "close" (see headSniffer).
	removeHopByHop(resp.Header, x.fwd.getConnection(), resp.StatusCode == http.StatusSwitchingProtocols && isWebsocketUpgrade(resp.Header))

	x.fwd.flush = resp.ContentLength < 0 || isEventStream(resp.Header)
	x.answered = time.Now()
	s.pushback(x, resp)
	s.rotateOn(r.Context(), x, resp.StatusCode)
	return resp
}

// roundTrip sends req with the transport, and watches the response body for
// a read error: goproxy ignores one (it stops copying and returns), which
// would end the client's response as if it were complete. The body is
// wrapped here rather than in onResponse because goproxy drops the
// Content-Length header of a response whose body a handler replaced.
func (s *Server) roundTrip(req *http.Request, _ *goproxy.ProxyCtx) (*http.Response, error) {
	var resp *http.Response
	var err error
	x := requestFrom(req.Context())
	if sess := sessionOf(req.Context()); sess != nil {
		resp, err = s.sessionRoundTrip(sess, req)
	} else if tr, terr := s.connTransport(x); terr != nil {
		err = terr
	} else if tr != nil {
		resp, err = roundTripKept(tr, req)
	} else {
		resp, err = s.tr.RoundTrip(req)
	}
	if err != nil {
		return nil, err
	}
	// A 101's body is the upgraded connection, which goproxy needs as an
	// io.ReadWriter.
	if resp.StatusCode != http.StatusSwitchingProtocols {
		fwd := &x.fwd
		b := &fwd.body // one round trip per request: no allocation
		if b.ReadCloser != nil {
			b = new(upstreamBody)
		}
		*b = upstreamBody{ReadCloser: resp.Body, fwd: fwd}
		resp.Body = b
	}
	return resp, nil
}

// upstreamBody records the first error reading an upstream response body.
type upstreamBody struct {
	io.ReadCloser
	fwd *fwdState
}

func (b *upstreamBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF && b.fwd.bodyErr == nil {
		b.fwd.bodyErr = err
	}
	return n, err
}

// forward is steps 5 and 6 for plain HTTP: goproxy sends r upstream,
// through roundTrip, which dials with dialHTTP, and copies the response
// back. It records what was sent either way, and aborts the response when
// the upstream's body failed.
func (s *Server) forward(w http.ResponseWriter, r *http.Request, x *request) {
	rw := &x.fwd.rw
	*rw = responseWriter{ResponseWriter: w, s: s, fwd: &x.fwd}

	s.gp.ServeHTTP(rw, r)

	x.status = rw.status
	if x.status == 0 {
		x.status = http.StatusOK // what net/http sends for a handler that wrote nothing
	}
	x.down = rw.bytes
	if b := x.fwd.clientBody; b != nil {
		x.up = b.n.Load()
	}
	if cc := clientConnOf(r); cc != nil && cc.writeTimedOut.Load() {
		// The client read nothing for ClientTimeout: its connection is
		// broken, goproxy stopped copying and closed the upstream body,
		// which gave the upstream connection and its address back.
		x.reason = "client read nothing for " + s.cfg.ClientTimeout.String() + " (-client-timeout): response aborted"
		x.refused = stats.RefusedWriteTimeout
	}
	if c := rw.hijacked; c != nil {
		// A WebSocket upgrade: goproxy relayed until one side closed, and
		// leaves the client connection to us.
		_ = c.Close()
		s.untrack(c)
		x.down += c.written.Load()
		x.up += c.read.Load()
	}

	if err := x.fwd.bodyErr; err != nil {
		level := slog.LevelWarn
		if r.Context().Err() != nil {
			level = slog.LevelDebug // the client went away
		}
		s.log.Log(r.Context(), level, "upstream response body failed: aborting the response",
			"client", r.RemoteAddr, "method", r.Method, "host", x.host, "bytes", x.down, "err", err)
		// Send what we have, then close the client connection without ending
		// the response, so that the client sees it incomplete rather than
		// short. (ServeHTTP's deferred call writes the access log line.)
		_ = http.NewResponseController(w).Flush()
		panic(http.ErrAbortHandler)
	}
}

// responseWriter is the http.ResponseWriter goproxy writes a response to. It
// records the status and body size for the access log and, when the request
// state asks for it, flushes after every write so that a streamed response
// reaches the client as it comes. (goproxy flushes only when it sees a
// Transfer-Encoding header, which Go's client has already removed, or an
// event stream.) Flush and Hijack are delegated; Hijack is what goproxy's
// WebSocket relay uses.
type responseWriter struct {
	http.ResponseWriter
	s        *Server
	fwd      *fwdState
	status   int
	bytes    int64
	hijacked *countingConn
}

var (
	_ http.Flusher  = (*responseWriter)(nil)
	_ http.Hijacker = (*responseWriter)(nil)
	_ io.ReaderFrom = (*responseWriter)(nil)
)

func (w *responseWriter) WriteHeader(code int) {
	if w.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *responseWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	w.bytes += int64(n)
	if err == nil && w.fwd.flush {
		err = http.NewResponseController(w.ResponseWriter).Flush()
	}
	return n, err
}

// ReadFrom is what goproxy's io.Copy of the response body finds. Without
// it io.Copy allocates a 32 KiB buffer for every response, more than half
// of all the bytes a plain HTTP request allocates; net/http's own ReadFrom
// copies with a pooled buffer. A streamed response (fwd.flush) goes through
// Write, which flushes, with a pooled buffer of ours.
func (w *responseWriter) ReadFrom(src io.Reader) (int64, error) {
	rf, ok := w.ResponseWriter.(io.ReaderFrom)
	if !ok || w.fwd.flush {
		buf := copyBufs.Get().(*[32 << 10]byte)
		defer copyBufs.Put(buf)
		return io.CopyBuffer(writeOnly{w}, src, buf[:])
	}
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := rf.ReadFrom(src)
	w.bytes += n
	return n, err
}

// copyBufs holds the buffers of streamed responses' copies.
var copyBufs = sync.Pool{New: func() any { return new([32 << 10]byte) }}

// writeOnly hides everything of a writer but Write, so that io.CopyBuffer
// uses the buffer it is given instead of calling ReadFrom again.
type writeOnly struct{ io.Writer }

func (w *responseWriter) Flush() {
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *responseWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	cc := &countingConn{Conn: c}
	if !w.s.track(cc) {
		return nil, nil, errShutdown
	}
	w.hijacked = cc
	return cc, brw, nil
}

// Unwrap lets http.ResponseController reach the server's ResponseWriter.
func (w *responseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// countingConn counts the bytes of a hijacked WebSocket connection, which
// goproxy relays from two goroutines.
type countingConn struct {
	net.Conn
	read, written atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.read.Add(int64(n))
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.written.Add(int64(n))
	return n, err
}

// dialHTTP dials for the transport. The connection records the Connection
// header of the response it carries (see headSniffer).
func (s *Server) dialHTTP(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := s.dial(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	if x := requestFrom(ctx); x != nil {
		h := &x.fwd.sniffer // one dial per request: no allocation
		if h.st != nil {
			h = new(headSniffer)
		}
		*h = headSniffer{Conn: c, st: &x.fwd}
		return h, nil
	}
	return c, nil
}

// maxSniff bounds the bytes headSniffer keeps: the transport's default limit
// on response headers.
const maxSniff = 1 << 20

// headSniffer records in the request's fwdState the Connection header of the
// final response head read from an upstream connection, before the
// transport parses it. Go's client deletes a response's Connection header
// when it contains "close", which every response to our transport's
// "Connection: close" may: without this, a header the upstream named there
// (Connection: close, X-Hop) would reach the client. The proxy's transport
// dials one connection per request (no keep-alive), so there is exactly one
// final head to find. A keep-alive transport's connection carries one
// request after the other: each, when it gets the connection, arms the
// sniffer for the next head (roundTripKept). It gives up on anything that
// is not plain HTTP/1 (TLS to an https:// upstream, for instance).
type headSniffer struct {
	net.Conn
	st   *fwdState // the reading goroutine's, as buf and done
	buf  []byte
	done bool

	// next is the request a keep-alive connection carries next, set on the
	// transport's goroutine before the request is written.
	next atomic.Pointer[fwdState]
}

// arm makes the next head read from the connection st's.
func (c *headSniffer) arm(st *fwdState) { c.next.Store(st) }

func (c *headSniffer) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.sniff(p[:n])
	}
	return n, err
}

// sniff takes the next bytes read from the connection. It copies them only
// while a head is incomplete, so that the usual head, read whole in the
// first read, costs no allocation.
func (c *headSniffer) sniff(b []byte) {
	if c.next.Load() != nil {
		if st := c.next.Swap(nil); st != nil {
			c.st, c.buf, c.done = st, nil, false
		}
	}
	if c.done {
		return
	}
	if len(c.buf) > 0 {
		c.buf = append(c.buf, b...)
		b = c.buf
	}
	for !c.done {
		if len(b) >= len("HTTP/") && !bytes.HasPrefix(b, []byte("HTTP/")) {
			c.stop()
			return
		}
		end := headEnd(b)
		if end < 0 {
			if len(b) > maxSniff {
				c.stop()
				return
			}
			c.buf = append(c.buf[:0], b...) // may overlap: append moves, forward
			return
		}
		head := b[:end]
		b = b[end:]
		status, _, _ := bytes.Cut(head, []byte("\n"))
		// Skip interim responses (100 Continue, 103 Early Hints); 101 is final.
		// The code may follow more than one space, as http.ReadResponse allows.
		_, code, _ := bytes.Cut(status, []byte(" "))
		if code = bytes.TrimLeft(code, " "); len(code) >= 3 && code[0] == '1' && string(code[:3]) != "101" {
			continue
		}
		c.st.setConnection(connectionValues(head[len(status)+1:]))
		c.stop()
	}
}

// closeOnly is the Connection header most upstreams answer egressd's
// "Connection: close" with, shared rather than allocated per response.
var closeOnly = []string{"close"}

// connectionValues returns the values of the Connection header fields among
// the header lines of a message head (a continuation line, obs-fold,
// continues the previous one), as textproto would read them.
func connectionValues(lines []byte) []string {
	var vals []string
	inConnection := false
	for len(lines) > 0 {
		var line []byte
		line, lines, _ = bytes.Cut(lines, []byte("\n"))
		line = bytes.TrimSuffix(line, []byte("\r"))
		if len(line) > 0 && (line[0] == ' ' || line[0] == '\t') {
			if inConnection && len(vals) > 0 {
				// As textproto: joined by a space, leading ones trimmed.
				v := &vals[len(vals)-1]
				*v = strings.TrimLeft(*v+" "+string(bytes.Trim(line, " \t")), " ")
			}
			continue
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		inConnection = ok && bytes.EqualFold(name, []byte("Connection"))
		if !inConnection {
			continue
		}
		value = bytes.Trim(value, " \t") // textproto trims no other space (U+00A0 is a value byte)
		if vals == nil && string(value) == "close" && !moreConnection(lines) {
			return closeOnly
		}
		vals = append(vals, string(value))
	}
	return vals
}

// moreConnection reports whether header lines hold another Connection
// field, or a continuation line right away.
func moreConnection(lines []byte) bool {
	if len(lines) > 0 && (lines[0] == ' ' || lines[0] == '\t') {
		return true
	}
	for len(lines) > 0 {
		var line []byte
		line, lines, _ = bytes.Cut(lines, []byte("\n"))
		if name, _, ok := bytes.Cut(line, []byte(":")); ok && bytes.EqualFold(name, []byte("Connection")) {
			return true
		}
	}
	return false
}

func (c *headSniffer) stop() {
	c.done = true
	c.buf = nil
}

// headEnd returns the length of the message head at the start of b, through
// the empty line that ends it, or -1 if b does not hold a whole head yet.
func headEnd(b []byte) int {
	for i := 0; ; {
		j := bytes.IndexByte(b[i:], '\n')
		if j < 0 {
			return -1
		}
		line := b[i : i+j]
		i += j + 1
		if len(line) == 0 || (len(line) == 1 && line[0] == '\r') {
			return i
		}
	}
}

// goproxyLogger routes goproxy's printf logging to slog at debug level.
type goproxyLogger struct{ l *slog.Logger }

func (g goproxyLogger) Printf(format string, v ...any) {
	if !g.l.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	g.l.Debug(strings.TrimSpace(fmt.Sprintf(format, v...)), "component", "goproxy")
}
