package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/stats"
)

// reqState is what the proxy learns about one request while serving it. It
// travels in the request's context, so that the dialer (which sees only a
// context) and goproxy's handlers (which see only the request) can reach it.
type reqState struct {
	// flush is set by the OnResponse handler when the upstream body has
	// unknown length or is an event stream; responseWriter then flushes
	// after every write. Set and read on the handler goroutine only.
	flush bool
	// bodyErr is the first error reading the upstream response body. Set
	// and read on the handler goroutine only (goproxy copies the body
	// there).
	bodyErr error
	// failed is set when egressd answered an upstream failure itself
	// (502, 503, 504), and reason to what it told the client. Handler
	// goroutine only.
	failed bool
	reason string
	// answered is when the upstream's response head arrived, or the
	// tunnel was established: the end of the latency that statistics
	// record. Handler goroutine only.
	answered time.Time
	// host and upstream are the normalized upstream host and its
	// statistics, set once the request was attributed to it.
	host     string
	upstream *stats.Upstream
	// ipv4 is set by the dial when the upstream connection left from the
	// host's own IPv4 address (the dial may run on the transport's
	// goroutine).
	ipv4 atomic.Bool

	// client is the client address the request came from (nil if it came
	// through no listener of ours); holdsAddr is set while the request
	// holds a fresh egress address counted against it (see dialHeld).
	client    *client
	holdsAddr atomic.Bool
	// clientBody is the request body as read from the client, whose
	// errors are the client's fault, not the upstream's. Handler
	// goroutine only.
	clientBody *clientBody
	// refused is the client refusal the request counts as, set where
	// rec is out of reach (onResponse). Handler goroutine only.
	refused stats.Refusal

	// body and sniffer are the request's upstreamBody and headSniffer,
	// kept here so that a plain HTTP request allocates neither.
	body    upstreamBody
	sniffer headSniffer
	// trace is the request's trace on a session's transport (RotateSession).
	trace httptrace.ClientTrace

	mu         sync.Mutex // for what the dial and transport goroutines set
	egress     string     // source IP of the upstream connection
	connection []string   // the upstream response's Connection header, raw
}

type stateKey struct{}

func stateFrom(ctx context.Context) *reqState {
	st, _ := ctx.Value(stateKey{}).(*reqState)
	return st
}

// releaseAddr gives back the fresh egress address the request counted
// against its client, if it did.
func (st *reqState) releaseAddr() {
	if st.holdsAddr.CompareAndSwap(true, false) {
		st.client.releaseAddr()
	}
}

func (st *reqState) setEgress(a net.Addr) {
	var ip string
	switch a := a.(type) {
	case *net.TCPAddr:
		ip = a.AddrPort().Addr().Unmap().String()
	case nil:
	default:
		ip = a.String()
		if h, _, err := net.SplitHostPort(ip); err == nil {
			ip = h
		}
	}
	st.mu.Lock()
	st.egress = ip
	st.mu.Unlock()
}

func (st *reqState) getEgress() string {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.egress
}

func (st *reqState) setConnection(v []string) {
	st.mu.Lock()
	st.connection = v
	st.mu.Unlock()
}

func (st *reqState) getConnection() []string {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.connection
}

// record is what the access log line and the statistics report about a
// request.
type record struct {
	host   string // host:port the client asked for
	status int
	down   int64  // bytes sent to the client: response body, or upstream->client in a tunnel
	up     int64  // bytes sent upstream: request body, or client->upstream in a tunnel
	own    int64  // of down, the bytes of egressd's own error answer
	user   string // the proxy user, when users authenticate; never a password
	reason string // why egressd refused or failed the request, as the client was told
	// refused is the client refusal the request counts as, if any.
	refused stats.Refusal

	upstream *stats.Upstream // set by admit
	admitted time.Time       // when the shaper let the request through
	permit   shape.Permit    // released when the request ends
}

// logAccess writes the access log line for r.
func (s *Server) logAccess(r *http.Request, rec *record, st *reqState, d time.Duration) {
	s.logRecord(r.RemoteAddr, r.Method, rec, st, d)
}

// logRecord writes an access log line, the same for every protocol: method
// is the HTTP method, or "SOCKS5". extra attributes go at the end.
func (s *Server) logRecord(client, method string, rec *record, st *reqState, d time.Duration, extra ...slog.Attr) {
	attrs := append([]slog.Attr{
		slog.String("client", client),
		slog.String("method", method),
		slog.String("host", rec.host),
		slog.Int("status", rec.status),
		slog.Int64("bytes", rec.down),
		slog.Int64("bytes_up", rec.up),
		slog.Duration("duration", d),
		slog.String("egress", st.getEgress()),
	}, extra...)
	if rec.user != "" {
		attrs = append(attrs, slog.String("user", rec.user))
	}
	if reason := rec.reason; reason != "" || st.reason != "" {
		if reason == "" {
			reason = st.reason
		}
		attrs = append(attrs, slog.String("reason", reason))
	}
	s.log.LogAttrs(context.Background(), slog.LevelInfo, "request", attrs...)
}

// goproxyLogger routes goproxy's printf logging to slog at debug level.
type goproxyLogger struct{ l *slog.Logger }

func (g goproxyLogger) Printf(format string, v ...any) {
	if !g.l.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	g.l.Debug(strings.TrimSpace(fmt.Sprintf(format, v...)), "component", "goproxy")
}
