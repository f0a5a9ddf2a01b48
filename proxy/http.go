package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"github.com/egressd/egressd/proxy/shape"
	"golang.org/x/net/http/httpguts"
)

// errNotProxy answers requests that are not in absolute form (GET /x).
var errNotProxy = malformed(http.StatusBadRequest, "egressd is a forward proxy: send absolute-form requests or CONNECT")

var errShutdown = errors.New("proxy is shutting down")

// ServeHTTP serves one proxy request: CONNECT opens a tunnel (which goes on
// after ServeHTTP returns), any other method must be in absolute form and is
// forwarded. It admits the client (step 1 of request.go's list), and
// serveConnect or serveForward take the steps after.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.begin()
	x := &request{start: time.Now(), method: r.Method, remote: r.RemoteAddr}
	if cc := clientConnOf(r); cc != nil {
		cc.startRequest()
		x.client = cc.client
		defer s.boundDiscard(cc, r, x)
	}
	// A client that half-closed after its request is still served: see
	// halfclose.go.
	ctx, release := upstreamContext(r)
	ctx = withRequest(ctx, x)
	defer release()
	defer func() {
		if !x.handedOff {
			s.settle(x)
		}
	}()

	if !s.admitHTTP(w, r, x) {
		return
	}
	if r.Method == http.MethodConnect {
		// goproxy is bypassed for CONNECT; see connect.go.
		s.serveConnect(ctx, w, r, x)
		return
	}
	s.serveForward(ctx, w, r, x)
}

// admitHTTP is step 1 for HTTP and CONNECT: a request head within what
// net/http does not check (too many fields, HTTP/2's preface, which
// net/http hands to handlers), a client address and credentials the access
// rules admit, and the session key the request asks for. When it returns
// false it has answered the client.
func (s *Server) admitHTTP(w http.ResponseWriter, r *http.Request, x *request) bool {
	switch {
	case headerFields(r) > maxHeaderFields:
		x.host = r.Host
		refuse(w, x, errTooManyFields, true)
		return false
	case r.ProtoMajor >= 2:
		refuse(w, x, errHTTP2, true)
		return false
	}
	x.host = r.Host

	// RotateConnection: a hijacked client connection (a tunnel) gives its
	// address back once the tunnel is done with it.
	x.held, _ = r.Context().Value(connHeldKey{}).(*heldAddr)
	x.access = s.access.Load() // the same rules for the whole request, across a reload
	userKey, ok := s.authorize(w, r, x)
	if !ok {
		return false
	}
	// The session key and the ask for a new address are egressd's own:
	// they never go upstream. The header wins over the proxy user name,
	// whose -rotate goes with its key.
	if s.cfg.Rotate == RotateSession {
		userKey, userRotate := cutRotate(userKey)
		if x.sessionKey = r.Header.Get(SessionHeader); x.sessionKey != "" {
			userRotate = false
		} else {
			x.sessionKey = userKey
		}
		var e *Error
		if x.rotate, e = askedRotation(r.Header, x.sessionKey, userRotate); e != nil {
			refuse(w, x, e, r.Method == http.MethodConnect)
			return false
		}
	}
	r.Header.Del(SessionHeader)
	r.Header.Del(RotateHeader)
	return true
}

// serveForward forwards a plain HTTP request through goproxy: steps 2 to 6
// of request.go's list.
func (s *Server) serveForward(ctx context.Context, w http.ResponseWriter, r *http.Request, x *request) {
	// 2. Parse the target.
	if !r.URL.IsAbs() || r.URL.Host == "" {
		refuse(w, x, errNotProxy, false)
		return
	}
	port := defaultPorts[r.URL.Scheme]
	if port == "" {
		refuse(w, x, malformed(http.StatusBadRequest, "egressd forwards http and https URLs only"), false)
		return
	}
	x.host = withPort(r.URL.Host, port)
	if p := r.URL.Port(); p != "" {
		if n, err := strconv.ParseUint(p, 10, 16); err != nil || n == 0 {
			refuse(w, x, malformed(http.StatusBadRequest, "bad port %s in the URL", p), false)
			return
		}
	}
	if e := checkDest(r.URL.Hostname(), portOf(x.host), x.access.HTTPPorts, "plain HTTP", "http-ports"); e != nil {
		refuse(w, x, e, false)
		return
	}

	// 3. Pick the address: the session's, if any.
	ctx, e := s.useSession(ctx, x)
	if e != nil {
		refuse(w, x, e, false)
		return
	}
	r = r.WithContext(ctx)

	// A small body is read whole before anything is spent on the request:
	// a client that stalls or sends a malformed one costs no upstream
	// connection and no address.
	if !s.readBody(w, r, x) {
		return
	}

	// 4. Shape.
	if !s.shapeHTTP(ctx, w, x, r.URL.Hostname(), false) {
		if b := x.fwd.clientBody; b != nil {
			x.up = b.n.Load()
		}
		return
	}

	// 5 and 6. Dial and relay: goproxy does both, through us.
	s.forward(w, r, x)
}

// readBody takes over the request body of r, if it has one, as a
// clientBody, and reads it whole if it is small (bufferBody). It returns
// false if that failed: it has answered the client.
func (s *Server) readBody(w http.ResponseWriter, r *http.Request, x *request) bool {
	if r.Body == nil || r.Body == http.NoBody {
		return true
	}
	body := &clientBody{ReadCloser: r.Body, conn: clientConnOf(r), timeout: s.cfg.ClientTimeout}
	r.Body = body
	x.fwd.clientBody = body
	if e := bufferBody(r, body); e != nil {
		refuse(w, x, e, true)
		x.up = body.n.Load()
		return false
	}
	// By default net/http, on the first write of the response, discards
	// and closes what is left of the request body. The transport may
	// still be sending it (it has not seen EOF yet, or the upstream
	// answers early), and a closed body makes it drop the upstream
	// connection, response and all. A proxy is full duplex.
	_ = http.NewResponseController(w).EnableFullDuplex()
	return true
}

// shapeHTTP is step 4 for HTTP and CONNECT: shape, and answer the client
// if the shaper refused it. It reports whether the request may go on.
func (s *Server) shapeHTTP(ctx context.Context, w http.ResponseWriter, x *request, host string, closeConn bool) bool {
	e, ok := s.shape(ctx, x, host)
	if e != nil {
		refuse(w, x, e, closeConn)
	}
	return ok
}

// settle is step 7 for HTTP and CONNECT: it records the request, and counts
// it done. It runs when ServeHTTP returns or, for a tunnel handed off to
// goroutines of its own (so that an open tunnel keeps none of the HTTP
// server's buffers), when the tunnel ends.
func (s *Server) settle(x *request) {
	s.record(x)
	s.end()
}

// boundDiscard bounds by ClientTimeout what net/http does after ServeHTTP
// returns with a request body not read to its end (a refusal, an early
// answer): it reads the rest, up to 256 KiB, to reuse the connection, with
// no deadline of its own, which a client that stalls would hold forever.
func (s *Server) boundDiscard(cc *clientConn, r *http.Request, x *request) {
	if r.Body == nil || r.Body == http.NoBody || cc.hijacked.Load() {
		return
	}
	if b := x.fwd.clientBody; b != nil && b.done.Load() {
		return
	}
	_ = cc.SetReadDeadline(time.Now().Add(s.cfg.ClientTimeout))
}

// writeError answers with e's status, its Proxy-Status header (and
// Retry-After, if e has one) and its reason as a one-line text/plain body.
// closeConn ends the client connection after the response.
func writeError(w http.ResponseWriter, e *Error, closeConn bool) int {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Proxy-Status", e.proxyStatus())
	if e.retryAfter > 0 {
		h.Set("Retry-After", strconv.Itoa(shape.RetryAfterSeconds(e.retryAfter)))
	}
	if closeConn {
		h.Set("Connection", "close")
	}
	w.WriteHeader(e.Status)
	n, _ := io.WriteString(w, e.body())
	return n
}

// refuse answers the client with egressd's own error, and records it for the
// access log and the statistics.
func refuse(w http.ResponseWriter, x *request, e *Error, closeConn bool) {
	n := int64(writeError(w, e, closeConn))
	x.refusedWith(e)
	x.down += n
	x.own += n
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
