package proxy

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"net/http/httptrace"
	"time"
)

// Upstream keep-alive, for the plain HTTP requests that leave from a held
// address: a session's (RotateSession), or a client connection's
// (RotateConnection). Requests that rotate per request use the proxy's
// transport, which keeps no connection alive.
//
// With RotateConnection each client connection gets a transport of its own
// on its first plain HTTP request, dialing from the connection's held
// address, so that its upstream connections carry that one address and
// serve no other client connection. net/http serves a connection's requests
// one after the other, so the transport keeps at most one upstream
// connection idle per upstream host, and two in all: an idle client
// connection costs at most three descriptors. When the client
// connection closes, or is hijacked for a tunnel that then ends, the held
// address ends (heldAddr.end): the transport's idle connections are closed
// at once, those still carrying a response close when it ends, and the
// address is given back.
//
// An upstream may close a kept connection at any time (its own keep-alive
// timeout). net/http's transport sends a request again on a new connection
// when a reused one failed before any response byte and the request is
// idempotent (GET, HEAD, OPTIONS, TRACE, or with an Idempotency-Key header,
// and no body), or when nothing of it was written; otherwise the client is
// answered 502, as for any upstream failure.

// Bounds on a client connection's idle upstream connections
// (RotateConnection).
const (
	connIdlePerHost = 1
	connIdleMax     = 2
)

// connTransport returns the keep-alive transport of the client connection x
// came on (RotateConnection), made on its first plain HTTP request, or nil
// when x leaves from another address than its connection's.
func (s *Server) connTransport(x *request) (*http.Transport, error) {
	if x == nil || x.held == nil || s.cfg.Rotate != RotateConnection {
		return nil, nil
	}
	h := x.held
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ended {
		return nil, errHeldEnded
	}
	if h.tr == nil {
		// As long idle as the idle client connection may stay.
		h.tr = s.keptTransport(clientIdleTimeout, func(ctx context.Context, network, addr string) (net.Conn, error) {
			return s.dialHeld(ctx, h, network, addr)
		})
		h.tr.MaxIdleConnsPerHost = connIdlePerHost
		h.tr.MaxIdleConns = connIdleMax
	}
	return h.tr, nil
}

// keptTransport is the proxy's transport with upstream keep-alive: it
// keeps connections idle for idle at most, and dials with dial. Each
// connection records the Connection header of each response it carries,
// for the request that got it (see roundTripKept).
func (s *Server) keptTransport(idle time.Duration, dial DialFunc) *http.Transport {
	tr := s.newTransport()
	tr.DisableKeepAlives = false
	tr.IdleConnTimeout = idle
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		return kept(dial(ctx, network, addr))
	}
	return tr
}

// kept is a connection dialed for a keep-alive transport, c unless err,
// made to record the Connection header of each response it carries.
func kept(c net.Conn, err error) (net.Conn, error) {
	if err != nil {
		return nil, err
	}
	return &headSniffer{Conn: c, done: true}, nil
}

// roundTripKept sends req over tr, a keep-alive transport, and tells the
// connection it got, new or reused, that the next response head is req's,
// and records its egress address.
func roundTripKept(tr *http.Transport, req *http.Request) (*http.Response, error) {
	if x := requestFrom(req.Context()); x != nil {
		trace := &x.fwd.trace // one round trip per request: no allocation
		*trace = httptrace.ClientTrace{GotConn: x.gotConn}
		req = req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
	}
	return tr.RoundTrip(req)
}

// gotConn is the trace of a round trip on a keep-alive transport: c, new
// or reused, carries x's request.
func (x *request) gotConn(info httptrace.GotConnInfo) {
	c := info.Conn
	if tc, ok := c.(*tls.Conn); ok { // an https:// URL
		c = tc.NetConn()
	}
	if h, ok := c.(*headSniffer); ok {
		h.arm(&x.fwd)
		c = h.Conn
	}
	x.dialedFrom(c)
}
