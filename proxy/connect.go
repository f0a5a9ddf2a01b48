package proxy

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"
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

// serveConnect opens a CONNECT tunnel: steps 2 to 6 of request.go's list.
// Once the tunnel is up, it hands the relay, and the request with it, to a
// goroutine of its own and returns, so that the HTTP server lets go of the
// connection's buffers; the tunnel records the request when it ends.
func (s *Server) serveConnect(ctx context.Context, w http.ResponseWriter, r *http.Request, x *request) {
	// 2. Parse the target.
	host, addr, err := connectTarget(r)
	if err != nil {
		s.log.Debug("bad CONNECT target", "client", r.RemoteAddr, "target", r.RequestURI, "err", err)
		refuse(w, x, malformed(http.StatusBadRequest, "bad CONNECT target: want host:port"), true)
		return
	}
	x.host = addr
	if e := checkDest(host, portOf(addr), x.access.ConnectPorts, "tunnels", "connect-ports"); e != nil {
		refuse(w, x, e, true)
		return
	}
	if r.ProtoMajor != 1 {
		// Tunnels hijack the connection; the server speaks HTTP/1 only, but
		// ServeHTTP may be mounted elsewhere.
		refuse(w, x, refusal(http.StatusHTTPVersionNotSupported, typeProtocolError, "CONNECT needs HTTP/1.1"), true)
		return
	}

	// 3. Pick the address: the session's, if any, in use while the tunnel
	// is open.
	ctx, e := s.useSession(ctx, x)
	if e != nil {
		refuse(w, x, e, true)
		return
	}

	// 4. Shape: a tunnel counts as one request, when it opens.
	if !s.shapeHTTP(ctx, w, x, host, true) {
		return
	}

	// 5. Dial, before answering, so that a failure gets a real status.
	upstream, err := s.dial(ctx, "tcp", addr)
	if err != nil {
		refuse(w, x, s.fail(ctx, x, host, err), true)
		return
	}

	// 6. Relay.
	client, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		_ = upstream.Close()
		s.log.Warn("cannot hijack CONNECT connection", "client", r.RemoteAddr, "err", err)
		refuse(w, x, refusal(http.StatusInternalServerError, typeInternalError, "cannot open a tunnel on this connection"), true)
		return
	}
	t := s.newTunnel(client, upstream)
	if !s.track(t) { // Shutdown already force-closed everything
		x.status = http.StatusServiceUnavailable
		return
	}
	x.status = http.StatusOK
	x.answered = time.Now()
	if err := openTunnel(client, upstream, brw.Reader, x, s.cfg.ClientTimeout); err != nil {
		s.log.Debug("tunnel: answering client", "client", r.RemoteAddr, "host", addr, "err", err)
		s.untrack(t)
		t.Close()
		return
	}
	x.handedOff = true
	go func() {
		defer s.settle(x) // 7. Record, once the tunnel ended.
		defer s.untrack(t)
		s.runTunnel(x, t)
	}()
}

// connectEstablished is the answer to a CONNECT whose tunnel is up.
var connectEstablished = []byte("HTTP/1.1 200 Connection established\r\n\r\n")

// openTunnel answers the client that its tunnel is established (within
// timeout: a client that reads nothing does not hold it), and sends
// upstream the bytes the client sent after its CONNECT request that the HTTP
// server already read into br.
func openTunnel(client, upstream net.Conn, br *bufio.Reader, x *request, timeout time.Duration) error {
	_ = client.SetWriteDeadline(time.Now().Add(timeout))
	if _, err := client.Write(connectEstablished); err != nil {
		return err
	}
	_ = client.SetWriteDeadline(time.Time{}) // the tunnel's idle timeout bounds it now
	// The client may have sent its first bytes (a TLS ClientHello) in the
	// same write as the CONNECT request.
	if n := br.Buffered(); n > 0 {
		early, _ := br.Peek(n) // cannot fail: n bytes are buffered
		m, err := upstream.Write(early)
		x.up += int64(m)
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
