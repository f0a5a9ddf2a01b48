package proxy

import (
	"context"
	"errors"
	"net"
	"net/http"
	"syscall"

	"golang.org/x/sys/unix"
)

// A client may half-close its connection once it has sent its request:
// `printf 'GET http://h/ HTTP/1.0\r\n\r\n' | nc -N proxy 3128`, socat, or a
// CONNECT whose client has nothing more to send. net/http then cancels the
// request's context (its background read saw EOF) although the client still
// reads. As Squid's half_closed_clients does, egressd serves such a request
// to the end: its upstream work runs under a context that a half-close does
// not cancel, and that ends only when the client connection is really gone
// (reset or closed), the handler returns, or the server shuts down.

type clientConnKey struct{}

// connContext is the http.Server's ConnContext: it gives each request the
// client connection it came on, and with RotateConnection the
// connection's held address.
func (s *Server) connContext(ctx context.Context, c net.Conn) context.Context {
	ctx = context.WithValue(ctx, clientConnKey{}, c)
	if s.cfg.Rotate == RotateConnection {
		ctx = s.holdForConn(ctx, c)
	}
	return ctx
}

// upstreamContext returns the context the upstream work of r runs under: a
// child of r.Context() that outlives the client's half-close (see above).
// The caller must call release when the request no longer needs it.
func upstreamContext(r *http.Request) (ctx context.Context, release func()) {
	parent := r.Context()
	ctx, cancel := context.WithCancel(context.WithoutCancel(parent))
	c, _ := parent.Value(clientConnKey{}).(net.Conn)
	stop := context.AfterFunc(parent, func() {
		if c == nil || !halfClosed(c) {
			cancel()
		}
	})
	return ctx, func() {
		stop()
		cancel()
	}
}

// errClientGone is the outcome of a request whose client reset or closed its
// connection before the answer: nobody reads it, and the upstream is not to
// blame (the access log says 499, as nginx does).
var errClientGone = refusal(statusClientClosed, typeRequestError, "the client went away")

// clientGone reports whether err is the cancellation of a request's
// upstream work because its client went away (see upstreamContext).
func clientGone(ctx context.Context, err error) bool {
	return ctx.Err() != nil && errors.Is(err, context.Canceled)
}

// halfClosed reports whether the client of c sent FIN and nothing worse:
// TCP's CLOSE_WAIT state. A reset connection is CLOSED, one that the server
// closed is no longer a socket at all.
func halfClosed(c net.Conn) bool {
	sc, ok := netConnOf(c).(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var state uint8
	if err := rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			state = info.State
		}
	}); err != nil {
		return false
	}
	return state == tcpCloseWait
}

// tcpCloseWait is TCP_CLOSE_WAIT of the kernel's include/net/tcp_states.h:
// the peer sent FIN, this side has not closed.
const tcpCloseWait = 8

// netConnOf returns the connection c wraps, if it says (NetConn), else c.
func netConnOf(c net.Conn) net.Conn {
	for range 4 {
		w, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = w.NetConn()
	}
	return c
}
