package proxy

import (
	"encoding/base64"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy/auth"
	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/stats"
)

// Access says who may use the proxy. It applies to HTTP, CONNECT and SOCKS5
// alike, and can be replaced while the proxy runs (Server.SetAccess).
type Access struct {
	// Allow lists the networks clients may connect from. Others get 403, or
	// the SOCKS5 reply "not allowed by ruleset". Empty: DefaultAllow.
	Allow []netip.Prefix

	// Users, when not nil, requires proxy authentication: Basic
	// Proxy-Authorization for HTTP and CONNECT (407 with Proxy-Authenticate
	// otherwise), the user name/password method for SOCKS5. A session key
	// then rides in the user name as USER-session-KEY.
	Users *auth.Users

	// ConnectPorts are the upstream ports CONNECT and SOCKS5 tunnels may
	// reach; nil means DefaultConnectPorts. HTTPPorts are those of plain
	// HTTP requests; nil means DefaultHTTPPorts. Others get 403, or the
	// SOCKS5 reply "not allowed by ruleset".
	ConnectPorts, HTTPPorts *Ports
}

// The default port lists, parsed once.
var (
	defaultConnectPorts = MustParsePorts(DefaultConnectPorts)
	defaultHTTPPorts    = MustParsePorts(DefaultHTTPPorts)
)

// DefaultAllow is the loopback networks: the clients admitted when
// Access.Allow is empty.
var DefaultAllow = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}

// Realm is the realm of the Proxy-Authenticate challenge.
const Realm = "egressd"

// The refusals of clients that may not use the proxy.
var (
	errNotAllowed   = refusal(http.StatusForbidden, typeRequestDenied, "client address not allowed by egressd")
	errAuthRequired = refusal(http.StatusProxyAuthRequired, typeRequestDenied, "proxy authentication required")
	errLoginFailed  = clientRefusal(stats.RefusedLoginFailed, http.StatusProxyAuthRequired, typeRequestDenied,
		"proxy authentication failed: wrong user name or password")
)

// withDefaults returns a copy of a that owns its list, with the default list
// when it has none, IPv4-mapped networks unmapped.
func (a Access) withDefaults() *Access {
	if len(a.Allow) == 0 {
		a.Allow = DefaultAllow
	}
	if a.ConnectPorts == nil {
		a.ConnectPorts = defaultConnectPorts
	}
	if a.HTTPPorts == nil {
		a.HTTPPorts = defaultHTTPPorts
	}
	a.Allow = slices.Clone(a.Allow)
	for i, p := range a.Allow {
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		a.Allow[i] = p.Masked()
	}
	return &a
}

// SetAccess replaces who may use the proxy. Requests and tunnels already
// admitted go on; the next request, on any connection, is checked against a.
func (s *Server) SetAccess(a Access) { s.access.Store(a.withDefaults()) }

// SetShaper replaces the shaper (nil: no shaping). Requests already waiting
// in the old one's line, and the permits it gave, finish under it; new
// requests go to the new one.
func (s *Server) SetShaper(sh *shape.Shaper) { s.shaper.Store(sh) }

// admits reports whether a client at addr may use the proxy.
func (a *Access) admits(addr netip.Addr) bool {
	addr = addr.Unmap()
	for _, p := range a.Allow {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// admitsConn is admits for a client connection's remote address.
func (a *Access) admitsConn(remote net.Addr) bool {
	ta, ok := remote.(*net.TCPAddr)
	return ok && a.admits(ta.AddrPort().Addr())
}

// authorize checks an HTTP or CONNECT request against the access rules of
// x. It records the authenticated user in x (only when users authenticate),
// and returns the session key the proxy user name carries, if any, and ok.
// When not ok it has answered the client: 403, 407 with a Basic challenge,
// or 429 with Retry-After for an address that failed to log in too often
// (see loginGuard).
func (s *Server) authorize(w http.ResponseWriter, r *http.Request, x *request) (key string, ok bool) {
	a := x.access
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil || !a.admits(ap.Addr()) {
		refuse(w, x, errNotAllowed, true)
		return "", false
	}
	name, pass, hasCreds := proxyCredentials(r.Header)
	// Whatever the answer, the credentials go no further than this.
	r.Header.Del("Proxy-Authorization")
	if a.Users == nil {
		if hasCreds {
			key, _ = sessionFromUser(name)
		}
		return key, true
	}
	e := errAuthRequired
	if hasCreds {
		x.user, key = splitSessionUser(name)
		res, retry := s.login(r.Context(), ap.Addr(), a.Users, x.user, pass)
		switch res {
		case loginOK:
			return key, true
		case loginThrottled:
			refuse(w, x, errLoginThrottled(retry), r.Method == http.MethodConnect)
			return "", false
		case loginGone:
			x.status = statusClientClosed
			return "", false
		}
		e = errLoginFailed
	}
	w.Header().Set("Proxy-Authenticate", `Basic realm="`+Realm+`"`)
	refuse(w, x, e, r.Method == http.MethodConnect)
	return "", false
}

// checkDest refuses a destination host and port before anything is spent on
// it: a port outside ports (the list named flag, for the reason), or an
// address literal with a zone, which names an interface of the proxy host.
// The dialer checks every address a name resolves to (netutil.Guard); this
// only keeps what can never be dialed out of the shaper and the statistics.
// what and flag name the kind of request and the setting, for the reason.
func checkDest(host string, port uint16, ports *Ports, what, flag string) *Error {
	if strings.Contains(host, "%") {
		if ip, err := netip.ParseAddr(host); err == nil {
			return classify(host, &netutil.DeniedError{Addr: ip, Reason: "a zoned address (a zone names an interface of the proxy host)"})
		}
	}
	if !ports.Contains(port) {
		return refusal(http.StatusForbidden, typeRequestDenied, "port %d not allowed for %s (-%s %s)", port, what, flag, ports)
	}
	return nil
}

// splitSessionUser splits a proxy user name USER-session-KEY, as clients send
// it when users authenticate, into the user and the session key ("" if it
// carries none). User names never contain "-session-" nor end in
// "-session" (auth.Parse refuses them), so the first one starts the key.
func splitSessionUser(name string) (user, key string) {
	user, key, _ = strings.Cut(name, auth.ReservedInfix)
	return user, key
}

// proxyCredentials returns the Basic credentials of a request's
// Proxy-Authorization header.
func proxyCredentials(h http.Header) (user, pass string, ok bool) {
	v := h.Get("Proxy-Authorization")
	const prefix = "Basic "
	if len(v) < len(prefix) || !strings.EqualFold(v[:len(prefix)], prefix) {
		return "", "", false
	}
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(v[len(prefix):]))
	if err != nil {
		return "", "", false
	}
	return strings.Cut(string(b), ":")
}
