package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy/socks5"
	"github.com/egressd/egressd/proxy/stats"
)

// Error is a refusal or an upstream failure as a client should see it, in
// every protocol: an HTTP status, a one-line reason that names only what
// the client asked for (never an egress address), the error type of RFC
// 9209 that the Proxy-Status header carries, and the SOCKS5 reply that says
// the same. Err keeps the full cause, addresses included, for the
// operator's log; it is never sent to the client. classify makes one of an
// upstream failure; refusal and clientRefusal make egressd's own.
type Error struct {
	Status int    // HTTP status for the client, e.g. http.StatusBadGateway
	Reason string // one line, no trailing newline, safe to send to the client
	// Type is the Proxy-Status error type (RFC 9209 section 2.3), e.g.
	// "destination_ip_prohibited"; empty means "proxy_internal_error".
	Type string
	// Reply is the SOCKS5 reply code, e.g. socks5.ReplyConnectionRefused;
	// 0 means the one Status says: "connection not allowed by ruleset"
	// for 403, the general failure for any other (see socksReply).
	Reply byte
	Err   error // the underlying cause; may name the egress address

	// retryAfter, when not zero, goes into an HTTP answer's Retry-After
	// header (a refusal by the shaper or the login throttle).
	retryAfter time.Duration

	// refused is the client refusal this answer counts as in the client
	// statistics, if any (a cap, a timeout, a malformed request, a login).
	refused stats.Refusal
}

// Proxy-Status error types (RFC 9209 section 2.3) that egressd sends.
const (
	typeRequestDenied     = "http_request_denied"
	typeRequestError      = "http_request_error"
	typeDestProhibited    = "destination_ip_prohibited"
	typeDestNotFound      = "destination_not_found"
	typeDestUnavailable   = "destination_unavailable"
	typeDestUnroutable    = "destination_ip_unroutable"
	typeDNSError          = "dns_error"
	typeConnRefused       = "connection_refused"
	typeConnTimeout       = "connection_timeout"
	typeConnLimit         = "connection_limit_reached"
	typeProtocolError     = "http_protocol_error"
	typeInternalError     = "proxy_internal_error"
	typeResponseTimeout   = "http_response_timeout"
	typeResponseIncomplet = "http_response_incomplete"
)

// refusal returns egressd's own answer to a request it will not serve.
func refusal(status int, typ, format string, args ...any) *Error {
	return &Error{Status: status, Type: typ, Reason: fmt.Sprintf(format, args...)}
}

// clientRefusal is refusal for a client that broke a limit or the protocol:
// it counts as r in the client statistics.
func clientRefusal(r stats.Refusal, status int, typ, format string, args ...any) *Error {
	e := refusal(status, typ, format, args...)
	e.refused = r
	return e
}

// upstreamFault reports whether e is an upstream failure (it has a cause),
// rather than egressd's own refusal of the client, which may keep its cause
// for the log too.
func (e *Error) upstreamFault() bool { return e.Err != nil && e.refused == 0 }

func (e *Error) Error() string {
	if e.Err == nil {
		return e.Reason
	}
	return e.Reason + ": " + e.Err.Error()
}

func (e *Error) Unwrap() error { return e.Err }

// body is the response body sent to the client.
func (e *Error) body() string { return e.Reason + "\n" }

// proxyStatus is the value of the Proxy-Status response header (RFC 9209):
// egressd's name, the error type and the reason as details, which curl -v
// and git's GIT_CURL_VERBOSE show even where the body is not (a refused
// CONNECT).
func (e *Error) proxyStatus() string {
	typ := e.Type
	if typ == "" {
		typ = typeInternalError
	}
	return "egressd; error=" + typ + "; details=" + sfString(e.Reason)
}

// socksReply is the SOCKS5 reply that says what e says.
func (e *Error) socksReply() byte {
	switch {
	case e.Reply != 0:
		return e.Reply
	case e.Status == http.StatusForbidden:
		return socks5.ReplyNotAllowed
	}
	return socks5.ReplyGeneralFailure
}

// sfString quotes s as a structured-field string (RFC 8941 section 3.3.3):
// printable ASCII only, with '"' and '\' escaped; anything else becomes '?'.
func sfString(s string) string {
	var b strings.Builder
	b.Grow(len(s) + 2)
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"' || c == '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case c < 0x20 || c > 0x7e:
			b.WriteByte('?')
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// classify is the one place a failure to reach or read from host becomes
// what a client sees, for plain HTTP, CONNECT and SOCKS5 alike: the HTTP
// status, the reason (the body, Proxy-Status and the access log's reason),
// and the SOCKS5 reply code. An *Error in err's chain is the answer as it
// is. host is the host name (or literal) from the request; nothing from err
// goes into the Reason but the destination address of a refusal, because a
// *net.OpError from a bound dial prints the egress source address.
func classify(host string, err error) *Error {
	if e, ok := errors.AsType[*Error](err); ok {
		return e
	}
	mk := func(status int, typ string, socks byte, format string, args ...any) *Error {
		return &Error{Status: status, Type: typ, Reply: socks, Reason: fmt.Sprintf(format, args...), Err: err}
	}
	if de, ok := errors.AsType[*netutil.DeniedError](err); ok {
		return mk(http.StatusForbidden, typeDestProhibited, socks5.ReplyNotAllowed, "%s", deniedReason(host, de))
	}
	if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
		// No descriptor for the upstream socket: egressd's limit, which
		// bounds open connections in routed mode, not the upstream's fault.
		e := *errFDsExhausted
		e.Err = err
		return &e
	}
	switch {
	case errors.Is(err, netutil.ErrNoAddress):
		if u, ok := errors.AsType[*netutil.Unavailable](err); ok {
			return mk(http.StatusServiceUnavailable, typeInternalError, socks5.ReplyGeneralFailure, "no fresh egress address available: %s", u.Reason)
		}
		return mk(http.StatusServiceUnavailable, typeInternalError, socks5.ReplyGeneralFailure, "no fresh egress address available")
	case errors.Is(err, netutil.ErrDenied):
		return mk(http.StatusForbidden, typeDestProhibited, socks5.ReplyNotAllowed, "destination %s not allowed", host)
	case errors.Is(err, netutil.ErrNoIPv6):
		// A host with A records only, and -ipv4 deny.
		return mk(http.StatusBadGateway, typeDestProhibited, socks5.ReplyHostUnreachable, "%s has no IPv6 address", host)
	case isTimeout(err):
		return mk(http.StatusGatewayTimeout, typeConnTimeout, socks5.ReplyTTLExpired, "upstream %s timed out", host)
	}
	if dnsErr, ok := errors.AsType[*net.DNSError](err); ok {
		if dnsErr.IsNotFound {
			return mk(http.StatusBadGateway, typeDNSError, socks5.ReplyHostUnreachable, "cannot resolve %s: no such host", host)
		}
		return mk(http.StatusBadGateway, typeDNSError, socks5.ReplyHostUnreachable, "cannot resolve %s", host)
	}
	// A dialer that asks for tcp6 only says this of an IPv4 address.
	if addrErr, ok := errors.AsType[*net.AddrError](err); ok && addrErr.Err == "no suitable address found" {
		return mk(http.StatusBadGateway, typeDestProhibited, socks5.ReplyHostUnreachable, "%s has no IPv6 address", host)
	}
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return mk(http.StatusBadGateway, typeConnRefused, socks5.ReplyConnectionRefused, "upstream %s refused the connection", host)
	case errors.Is(err, syscall.ENETUNREACH):
		return mk(http.StatusBadGateway, typeDestUnroutable, socks5.ReplyNetworkUnreachable, "upstream %s is unreachable", host)
	case errors.Is(err, syscall.EHOSTUNREACH):
		return mk(http.StatusBadGateway, typeDestUnroutable, socks5.ReplyHostUnreachable, "upstream %s is unreachable", host)
	default:
		return mk(http.StatusBadGateway, typeDestUnavailable, socks5.ReplyGeneralFailure, "upstream %s failed", host)
	}
}

// deniedReason says why the guard refused host: which address it is (when
// host is a name) and what that address is. The address is the
// destination's, never the egress one.
func deniedReason(host string, de *netutil.DeniedError) string {
	dest := host
	if a := de.Addr.String(); strings.Trim(host, "[]") != a {
		dest = host + " (" + a + ")"
	}
	s := "destination " + dest + " not allowed: " + de.Reason
	if de.Special {
		s += "; -allow-dest re-admits it"
	}
	return s
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
