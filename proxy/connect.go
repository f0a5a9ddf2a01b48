package proxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
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

// errTunnelIdle ends a tunnel that carried no byte for TunnelIdleTimeout.
var errTunnelIdle = errors.New("tunnel idle timeout")

// serveConnect dials the CONNECT target, answers, and relays bytes until the
// tunnel ends.
func (s *Server) serveConnect(w http.ResponseWriter, r *http.Request, rec *record) {
	rec.host = r.Host
	host, addr, err := connectTarget(r)
	if err != nil {
		s.log.Debug("bad CONNECT target", "client", r.RemoteAddr, "target", r.RequestURI, "err", err)
		refuse(w, rec, http.StatusBadRequest, "bad CONNECT target: want host:port", true)
		return
	}
	rec.host = addr
	if r.ProtoMajor != 1 {
		// Tunnels hijack the connection; the server speaks HTTP/1 only, but
		// ServeHTTP may be mounted elsewhere.
		refuse(w, rec, http.StatusHTTPVersionNotSupported, "CONNECT needs HTTP/1.1", true)
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
		s.logUpstreamError(r, addr, e)
		st.failed = true
		refuse(w, rec, e.Status, e.Reason, true)
		return
	}

	client, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		_ = upstream.Close()
		s.log.Warn("cannot hijack CONNECT connection", "client", r.RemoteAddr, "err", err)
		refuse(w, rec, http.StatusInternalServerError, "cannot open a tunnel on this connection", true)
		return
	}
	t := newTunnel(client, upstream, s.cfg.TunnelIdleTimeout)
	if !s.track(t) { // Shutdown already force-closed everything
		rec.status = http.StatusServiceUnavailable
		return
	}
	defer s.untrack(t)
	defer t.Close()

	rec.status = http.StatusOK
	st.answered = time.Now()
	if _, err := io.WriteString(client, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		s.log.Debug("tunnel: answering client", "client", r.RemoteAddr, "err", err)
		return
	}
	// The client may have sent its first bytes (a TLS ClientHello) in the
	// same write as the CONNECT request: the HTTP server read them into its
	// buffer while parsing, so they go upstream before anything else.
	if n := brw.Reader.Buffered(); n > 0 {
		early, _ := brw.Reader.Peek(n) // cannot fail: n bytes are buffered
		m, err := upstream.Write(early)
		rec.up += int64(m)
		if err != nil {
			s.log.Debug("tunnel: replaying early bytes", "client", r.RemoteAddr, "host", addr, "err", err)
			return
		}
	}

	down, up, err := t.run()
	rec.down += down
	rec.up += up
	if err != nil {
		s.log.Debug("tunnel ended", "client", r.RemoteAddr, "host", addr, "err", err)
	}
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
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			return "", "", fmt.Errorf("CONNECT target %q: zoned address", u.Host)
		}
	} else if !validHostname(host) {
		return "", "", fmt.Errorf("CONNECT target %q: bad host name", u.Host)
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
// Copies go through io.Copy between the connections themselves, so that
// between two *net.TCPConn (or types embedding one) the kernel splices
// the bytes without copying them to user space. Bytes cannot be observed
// mid-splice, so idleness is checked from outside: each direction reads under
// a deadline one tick (a quarter of the idle timeout) away. A deadline on the
// read side loses nothing (splice moves what it drained into its pipe to the
// destination before returning); write deadlines, which could strand bytes
// in that pipe, are never set. When a copy returns with a timeout, bytes it
// moved count as activity; if the tunnel as a whole, both directions
// together, was silent for the idle timeout, it is closed, otherwise the
// deadline is moved on.
type tunnel struct {
	client, upstream net.Conn
	idle             time.Duration
	start            time.Time
	last             atomic.Int64 // last byte either way, as time.Duration since start
	closeOnce        sync.Once
}

func newTunnel(client, upstream net.Conn, idle time.Duration) *tunnel {
	return &tunnel{client: client, upstream: upstream, idle: idle, start: time.Now()}
}

// Close closes both connections, ending both directions.
func (t *tunnel) Close() error {
	t.closeOnce.Do(func() {
		_ = t.client.Close()
		_ = t.upstream.Close()
	})
	return nil
}

// run relays until both directions are done and returns the bytes copied
// upstream->client (down) and client->upstream (up), and what ended the
// tunnel if it was not a normal close.
func (t *tunnel) run() (down, up int64, err error) {
	var wg sync.WaitGroup
	var upErr error
	wg.Go(func() { up, upErr = t.pipe(t.upstream, t.client) })
	down, err = t.pipe(t.client, t.upstream)
	wg.Wait()
	t.Close()
	return down, up, errors.Join(err, upErr)
}

type closeWriter interface{ CloseWrite() error }

// pipe copies src to dst until src reaches EOF, which it passes on to dst as
// a half-close, or until the tunnel fails, idles out or is closed.
func (t *tunnel) pipe(dst, src net.Conn) (int64, error) {
	tick := max(t.idle/4, time.Millisecond)
	var total int64
	for {
		if err := src.SetReadDeadline(time.Now().Add(tick)); err != nil {
			t.Close()
			return total, quiet(err)
		}
		n, err := io.Copy(dst, src)
		total += n
		if n > 0 {
			t.last.Store(int64(time.Since(t.start)))
		}
		switch {
		case err == nil: // EOF from src
			if cw, ok := dst.(closeWriter); ok && cw.CloseWrite() == nil {
				return total, nil // the other direction goes on
			}
			t.Close() // cannot half-close dst: end the tunnel
			return total, nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			if time.Since(t.start)-time.Duration(t.last.Load()) < t.idle {
				continue
			}
			t.Close()
			return total, errTunnelIdle
		default:
			t.Close()
			return total, quiet(err)
		}
	}
}

// quiet drops errors that only say the connection was closed or reset.
func quiet(err error) error {
	if isClosedConn(err) {
		return nil
	}
	return err
}
