package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"syscall"

	"github.com/egressd/egressd/netutil"
)

// Error is an upstream failure as a client should see it: an HTTP status and
// a one-line reason that names only the host from the request. Err keeps the
// full cause, addresses included, for the operator's log; it is never sent to
// the client.
type Error struct {
	Status int    // HTTP status for the client, e.g. http.StatusBadGateway
	Reason string // one line, no trailing newline, safe to send to the client
	Err    error  // the underlying cause; may name the egress address
}

func (e *Error) Error() string {
	if e.Err == nil {
		return e.Reason
	}
	return e.Reason + ": " + e.Err.Error()
}

func (e *Error) Unwrap() error { return e.Err }

// body is the response body sent to the client.
func (e *Error) body() string { return e.Reason + "\n" }

// upstreamError maps a failure to reach or read from host to the status and
// text a client sees. host is the host name (or literal) from the request;
// nothing from err goes into the Reason, because a *net.OpError from a bound
// dial prints the egress source address.
func upstreamError(host string, err error) *Error {
	if e, ok := errors.AsType[*Error](err); ok {
		return e
	}
	mk := func(status int, format string, args ...any) *Error {
		return &Error{Status: status, Reason: fmt.Sprintf(format, args...), Err: err}
	}
	switch {
	case errors.Is(err, netutil.ErrNoAddress):
		return mk(http.StatusServiceUnavailable, "no fresh egress address available")
	case errors.Is(err, netutil.ErrDenied):
		return mk(http.StatusForbidden, "destination %s not allowed (the proxy host itself, its own prefix, link-local or multicast)", host)
	case errors.Is(err, netutil.ErrNoIPv6):
		// A host with A records only, and -ipv4 deny.
		return mk(http.StatusBadGateway, "%s has no IPv6 address", host)
	case isTimeout(err):
		return mk(http.StatusGatewayTimeout, "upstream %s timed out", host)
	}
	if dnsErr, ok := errors.AsType[*net.DNSError](err); ok {
		if dnsErr.IsNotFound {
			return mk(http.StatusBadGateway, "cannot resolve %s: no such host", host)
		}
		return mk(http.StatusBadGateway, "cannot resolve %s", host)
	}
	// A dialer that asks for tcp6 only says this of an IPv4 address.
	if addrErr, ok := errors.AsType[*net.AddrError](err); ok && addrErr.Err == "no suitable address found" {
		return mk(http.StatusBadGateway, "%s has no IPv6 address", host)
	}
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return mk(http.StatusBadGateway, "upstream %s refused the connection", host)
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return mk(http.StatusBadGateway, "upstream %s is unreachable", host)
	default:
		return mk(http.StatusBadGateway, "upstream %s failed", host)
	}
}

// isTimeout reports whether err is a timeout of any kind: a dial or read
// deadline, a context deadline, or the transport's response header timeout
// (which is a net.Error whose Timeout method reports true).
func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	ne, ok := errors.AsType[net.Error](err)
	return ok && ne.Timeout()
}

// isClosedConn reports whether err only says that a connection was closed or
// reset, which ends a tunnel normally enough not to be worth a warning.
func isClosedConn(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
