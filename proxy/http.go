package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/egressd/egressd/proxy/stats"
	"github.com/elazarl/goproxy"
	"golang.org/x/net/http/httpguts"
)

// errNotProxy answers requests that are not in absolute form (GET /x).
var errNotProxy = malformed(http.StatusBadRequest, "egressd is a forward proxy: send absolute-form requests or CONNECT")

var (
	errConnectViaGoproxy = errors.New("CONNECT must be served by egressd, not goproxy")
	errShutdown          = errors.New("proxy is shutting down")
)

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
	if resp == nil {
		err := ctx.Error
		if err == nil {
			err = errors.New("no response from upstream")
		}
		e := upstreamError(r.URL.Hostname(), err)
		st := stateFrom(r.Context())
		if clientGone(r.Context(), err) {
			e = errClientGone
		} else if st != nil && st.clientBody != nil {
			// The client's body failed (stalled, malformed, cut short):
			// that, not the upstream, is why the round trip failed.
			if ce := st.clientBody.err.Load(); ce != nil {
				e = ce
			}
		}
		if e.upstreamFault() {
			s.logUpstreamError(r, withPort(r.URL.Host, defaultPorts[r.URL.Scheme]), e)
		}
		if st != nil {
			st.failed = e.upstreamFault()
			st.reason = e.Reason
			st.refused = e.refused
		}
		// Our own response, so that goproxy's 500 with the error text (and
		// the egress address in it) is never used.
		out := goproxy.NewResponse(r, "text/plain; charset=utf-8", e.Status, e.body())
		out.Header.Set("X-Content-Type-Options", "nosniff")
		out.Header.Set("Proxy-Status", e.proxyStatus())
		if st != nil && st.clientBody != nil && e.refused != 0 {
			// What is left of the client's body cannot be read: the
			// connection ends with this answer.
			out.Header.Set("Connection", "close")
		}
		return out
	}

	st := stateFrom(r.Context())
	var named []string // the upstream's Connection header, which Go's client drops if it says "close"
	if st != nil {
		named = st.getConnection()
	}
	// Among others, this removes the upstream's "Connection: close" (it
	// sends one, because the transport asks for it), which would otherwise
	// close the client's keep-alive connection to the proxy.
	removeHopByHop(resp.Header, named, resp.StatusCode == http.StatusSwitchingProtocols && isWebsocketUpgrade(resp.Header))

	if st != nil {
		st.flush = resp.ContentLength < 0 || isEventStream(resp.Header)
		st.answered = time.Now()
		s.pushback(st, resp)
	}
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
	if sess := sessionOf(req.Context()); sess != nil {
		resp, err = s.sessionRoundTrip(sess, req)
	} else {
		resp, err = s.tr.RoundTrip(req)
	}
	if err != nil {
		return nil, err
	}
	// A 101's body is the upgraded connection, which goproxy needs as an
	// io.ReadWriter.
	if st := stateFrom(req.Context()); st != nil && resp.StatusCode != http.StatusSwitchingProtocols {
		b := &st.body // one round trip per request: no allocation
		if b.ReadCloser != nil {
			b = new(upstreamBody)
		}
		*b = upstreamBody{ReadCloser: resp.Body, st: st}
		resp.Body = b
	}
	return resp, nil
}

// upstreamBody records the first error reading an upstream response body.
type upstreamBody struct {
	io.ReadCloser
	st *reqState
}

func (b *upstreamBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF && b.st.bodyErr == nil {
		b.st.bodyErr = err
	}
	return n, err
}

// serveHTTP forwards a plain HTTP request through goproxy.
func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request, x *exchange) {
	rec := &x.rec
	rec.host = r.Host
	if !r.URL.IsAbs() || r.URL.Host == "" {
		refuse(w, rec, errNotProxy, false)
		return
	}
	port := defaultPorts[r.URL.Scheme]
	if port == "" {
		refuse(w, rec, malformed(http.StatusBadRequest, "egressd forwards http and https URLs only"), false)
		return
	}
	rec.host = withPort(r.URL.Host, port)
	if p := r.URL.Port(); p != "" {
		if n, err := strconv.ParseUint(p, 10, 16); err != nil || n == 0 {
			refuse(w, rec, malformed(http.StatusBadRequest, "bad port %s in the URL", p), false)
			return
		}
	}
	if e := checkDest(r.URL.Hostname(), portOf(rec.host), x.access.HTTPPorts, "plain HTTP", "http-ports"); e != nil {
		refuse(w, rec, e, false)
		return
	}
	st := &x.st
	var body *clientBody
	if r.Body != nil && r.Body != http.NoBody {
		body = &clientBody{ReadCloser: r.Body, conn: clientConnOf(r), timeout: s.cfg.ClientTimeout}
		r.Body = body
		st.clientBody = body
		// A small body is read whole before anything is spent on the
		// request: a client that stalls or sends a malformed one costs
		// no upstream connection and no address.
		if e := bufferBody(r, body); e != nil {
			refuse(w, rec, e, true)
			rec.up = body.n.Load()
			return
		}
		// By default net/http, on the first write of the response, discards
		// and closes what is left of the request body. The transport may
		// still be sending it (it has not seen EOF yet, or the upstream
		// answers early), and a closed body makes it drop the upstream
		// connection, response and all. A proxy is full duplex.
		_ = http.NewResponseController(w).EnableFullDuplex()
	}
	if !s.admit(w, r, r.URL.Hostname(), rec, false) {
		if body != nil {
			rec.up = body.n.Load()
		}
		return
	}

	rw := &x.rw
	*rw = responseWriter{ResponseWriter: w, s: s, st: st}

	s.gp.ServeHTTP(rw, r)

	rec.status = rw.status
	if rec.status == 0 {
		rec.status = http.StatusOK // what net/http sends for a handler that wrote nothing
	}
	rec.down = rw.bytes
	if body != nil {
		rec.up = body.n.Load()
	}
	if cc := clientConnOf(r); cc != nil && cc.writeTimedOut.Load() {
		// The client read nothing for ClientTimeout: its connection is
		// broken, goproxy stopped copying and closed the upstream body,
		// which gave the upstream connection and its address back.
		rec.reason = "client read nothing for " + s.cfg.ClientTimeout.String() + " (-client-timeout): response aborted"
		rec.refused = stats.RefusedWriteTimeout
	}
	if c := rw.hijacked; c != nil {
		// A WebSocket upgrade: goproxy relayed until one side closed, and
		// leaves the client connection to us.
		_ = c.Close()
		s.untrack(c)
		rec.down += c.written.Load()
		rec.up += c.read.Load()
	}

	if err := st.bodyErr; err != nil {
		level := slog.LevelWarn
		if r.Context().Err() != nil {
			level = slog.LevelDebug // the client went away
		}
		s.log.Log(r.Context(), level, "upstream response body failed: aborting the response",
			"client", r.RemoteAddr, "method", r.Method, "host", rec.host, "bytes", rec.down, "err", err)
		// Send what we have, then close the client connection without ending
		// the response, so that the client sees it incomplete rather than
		// short. (ServeHTTP's deferred call writes the access log line.)
		_ = http.NewResponseController(w).Flush()
		panic(http.ErrAbortHandler)
	}
}

func (s *Server) logUpstreamError(r *http.Request, host string, e *Error) {
	level := slog.LevelWarn
	if r.Context().Err() != nil {
		level = slog.LevelDebug // the client went away; nothing to tell the operator
	}
	s.log.Log(r.Context(), level, "upstream failed",
		"client", r.RemoteAddr, "method", r.Method, "host", host,
		"status", e.Status, "err", e.Err)
}

// writeError answers with e's status, its Proxy-Status header and its
// reason as a one-line text/plain body. closeConn ends the client
// connection after the response.
func writeError(w http.ResponseWriter, e *Error, closeConn bool) int {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Proxy-Status", e.proxyStatus())
	if closeConn {
		h.Set("Connection", "close")
	}
	w.WriteHeader(e.Status)
	n, _ := io.WriteString(w, e.body())
	return n
}

// refuse answers the client with egressd's own error, and records it for the
// access log and the statistics.
func refuse(w http.ResponseWriter, rec *record, e *Error, closeConn bool) {
	n := int64(writeError(w, e, closeConn))
	rec.status = e.Status
	rec.reason = e.Reason
	rec.refused = e.refused
	rec.down += n
	rec.own += n
}

// hopHeaders are hop-by-hop headers (RFC 9110 section 7.6.1, plus
// Keep-Alive from RFC 2068). removeHopByHop also removes every header named
// in Connection and every Proxy-* header.
var hopHeaders = []string{"Connection", "Keep-Alive", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// removeHopByHop removes the hop-by-hop headers from h, including those
// named in connection, more values of the Connection header. With
// keepWebsocket, the "Connection: Upgrade" and "Upgrade: websocket" pair
// survives, because goproxy relays WebSocket upgrades and needs both.
func removeHopByHop(h http.Header, connection []string, keepWebsocket bool) {
	upgrade := h.Get("Upgrade")
	for _, values := range [...][]string{h["Connection"], connection} {
		for _, v := range values {
			for name := range strings.SplitSeq(v, ",") {
				switch name = textproto.TrimString(name); {
				case name == "":
				case strings.EqualFold(name, "close"):
					h.Del("Close") // already canonical: no allocation
				default:
					h.Del(name)
				}
			}
		}
	}
	for _, name := range hopHeaders {
		h.Del(name)
	}
	for name := range h {
		if len(name) >= len("Proxy-") && strings.EqualFold(name[:len("Proxy-")], "Proxy-") {
			delete(h, name)
		}
	}
	if keepWebsocket {
		h.Set("Connection", "Upgrade")
		h.Set("Upgrade", upgrade)
	}
}

func isWebsocketUpgrade(h http.Header) bool {
	return httpguts.HeaderValuesContainsToken(h["Connection"], "Upgrade") &&
		httpguts.HeaderValuesContainsToken(h["Upgrade"], "websocket")
}

func isEventStream(h http.Header) bool {
	ct := strings.TrimSpace(h.Get("Content-Type"))
	return len(ct) >= len("text/event-stream") && strings.EqualFold(ct[:len("text/event-stream")], "text/event-stream")
}

// defaultPorts are the schemes the proxy forwards, with their default ports.
var defaultPorts = map[string]string{"http": "80", "https": "443"}

// withPort returns hostport with port added if it has none.
func withPort(hostport, port string) string {
	if _, _, err := net.SplitHostPort(hostport); err == nil {
		return hostport
	}
	return net.JoinHostPort(strings.TrimSuffix(strings.TrimPrefix(hostport, "["), "]"), port)
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
	st       *reqState
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
	if err == nil && w.st != nil && w.st.flush {
		err = http.NewResponseController(w.ResponseWriter).Flush()
	}
	return n, err
}

// ReadFrom is what goproxy's io.Copy of the response body finds. Without
// it io.Copy allocates a 32 KiB buffer for every response, more than half
// of all the bytes a plain HTTP request allocates; net/http's own ReadFrom
// copies with a pooled buffer. A streamed response (st.flush) goes through
// Write, which flushes, with a pooled buffer of ours.
func (w *responseWriter) ReadFrom(src io.Reader) (int64, error) {
	rf, ok := w.ResponseWriter.(io.ReaderFrom)
	if !ok || (w.st != nil && w.st.flush) {
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
	if st := stateFrom(ctx); st != nil {
		h := &st.sniffer // one dial per request: no allocation
		if h.st != nil {
			h = new(headSniffer)
		}
		*h = headSniffer{Conn: c, st: st}
		return h, nil
	}
	return c, nil
}

// maxSniff bounds the bytes headSniffer keeps: the transport's default limit
// on response headers.
const maxSniff = 1 << 20

// headSniffer records in the request state the Connection header of the
// final response head read from an upstream connection, before the
// transport parses it. Go's client deletes a response's Connection header
// when it contains "close", which every response to our transport's
// "Connection: close" may: without this, a header the upstream named there
// (Connection: close, X-Hop) would reach the client. The transport dials one
// connection per request (no keep-alive), so there is exactly one final head
// to find. It gives up on anything that is not plain HTTP/1 (TLS to an
// https:// upstream, for instance).
type headSniffer struct {
	net.Conn
	st   *reqState
	buf  []byte
	done bool
}

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
