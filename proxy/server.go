package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/stats"
	"github.com/elazarl/goproxy"
)

// DialFunc opens an upstream connection. It has the signature of
// net.Dialer.DialContext; egressd's dialer binds each connection to a fresh
// egress address.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// Config configures a Server. Zero durations take the defaults documented on
// each field.
type Config struct {
	// Dial opens every upstream connection, for plain HTTP and CONNECT alike;
	// the proxy never dials any other way. Required.
	//
	// For CONNECT tunnels to move bytes with Linux splice(2), the returned
	// connection should be a *net.TCPConn, or carry one unchanged and return
	// it from a NetConn method, as netutil.Conn does. Others are copied
	// through user space.
	Dial DialFunc

	// Logger receives the access log (one Info line "request" per request or
	// tunnel) and warnings about upstream failures, with full error text.
	// Default slog.Default().
	Logger *slog.Logger

	// DialTimeout bounds connecting to an upstream, DNS included. A timeout
	// is answered 504. Default 10s.
	DialTimeout time.Duration

	// ResponseHeaderTimeout bounds the wait for an upstream's response
	// headers after a plain HTTP request was sent. A timeout is answered 504.
	// Default 60s.
	ResponseHeaderTimeout time.Duration

	// TunnelIdleTimeout closes a CONNECT tunnel after no byte went either way
	// for this long. Default 5m.
	TunnelIdleTimeout time.Duration

	// Shaper paces requests per upstream host before they are dialed: a
	// plain HTTP request counts once, a CONNECT tunnel once when it opens.
	// Nil: no shaping. Server.SetShaper replaces it.
	Shaper *shape.Shaper

	// Access says which clients may use the proxy: by source network, and
	// with a user name and password if it has users. The zero value admits
	// loopback clients only. Server.SetAccess replaces it.
	Access Access

	// Stats receives the per-upstream accounting. Default: a registry of
	// its own, read with Server.Upstreams.
	Stats *stats.Registry

	// Rotate says how often the egress address changes: RotateRequest (the
	// default), RotateConnection or RotateSession. The last two need Hold.
	Rotate Rotate

	// Hold leases one egress address for many upstream connections, for
	// RotateConnection and RotateSession. Requests that rotate per request
	// still dial with Dial.
	Hold HoldFunc

	// SessionIdle ends a session (RotateSession) that carried no request
	// and no tunnel for this long: its address is given back, and the
	// next request with its key gets a fresh one. Default 10m.
	SessionIdle time.Duration

	// MaxSessions bounds the sessions open at once; a request for a new
	// session past it is answered 503. Default netutil.DefaultMaxAddrs.
	MaxSessions int

	// RotateOn lists upstream statuses (403, 429, ...) that end the address
	// of a session (RotateSession only) when one answers a plain HTTP
	// request of it: its next request leaves from a new address (see
	// rotation.go). Empty: none.
	RotateOn []int

	// ClientTimeout bounds how long a client may take to send its request
	// head (or SOCKS5 handshake, within 10s), and how long it may stall,
	// with no byte moving, while sending a request body (then 408) or
	// while egressd writes it a response (then the response is aborted).
	// Either way its upstream connection and egress address are given back
	// at once. Tunnels are bounded by TunnelIdleTimeout instead. Default
	// 30s.
	ClientTimeout time.Duration

	// Limits cap client connections, in total and per client address, and
	// the egress addresses one client address holds. Server.SetLimits
	// replaces them.
	Limits Limits
}

// Defaults for zero Config fields.
const (
	DefaultDialTimeout           = 10 * time.Second
	DefaultResponseHeaderTimeout = 60 * time.Second
	DefaultTunnelIdleTimeout     = 5 * time.Minute
	DefaultSessionIdle           = 10 * time.Minute
	DefaultClientTimeout         = 30 * time.Second
)

// Fixed settings.
const (
	clientIdleTimeout   = 120 * time.Second // idle client keep-alive connections are closed after this
	tlsHandshakeTimeout = 10 * time.Second  // for plain-HTTP requests to https:// URLs

	// forceCloseGrace bounds how long Shutdown waits, after force-closing
	// every connection, for handlers to return. They return promptly once
	// their connections are closed, unless Config.Dial ignores its context.
	forceCloseGrace = time.Second
)

// Validate reports the first invalid field of c. Zero durations are valid:
// they mean the default.
func (c Config) Validate() error {
	if c.Dial == nil {
		return errors.New("proxy config: Dial is required")
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"DialTimeout", c.DialTimeout},
		{"ResponseHeaderTimeout", c.ResponseHeaderTimeout},
		{"TunnelIdleTimeout", c.TunnelIdleTimeout},
		{"SessionIdle", c.SessionIdle},
		{"ClientTimeout", c.ClientTimeout},
	} {
		if d.v < 0 {
			return fmt.Errorf("proxy config: %s is negative (%v)", d.name, d.v)
		}
	}
	switch c.Rotate {
	case "", RotateRequest:
	case RotateConnection, RotateSession:
		if c.Hold == nil {
			return fmt.Errorf("proxy config: Rotate %q needs Hold", c.Rotate)
		}
	default:
		return fmt.Errorf("proxy config: Rotate %q is not one of request, connection, session", c.Rotate)
	}
	for _, st := range c.RotateOn {
		switch {
		case st < 100 || st > 599:
			return fmt.Errorf("proxy config: RotateOn %d is not an HTTP status (100-599)", st)
		case c.Rotate != RotateSession:
			return fmt.Errorf("proxy config: RotateOn needs Rotate %q, not %q", RotateSession, c.Rotate)
		}
	}
	for _, n := range []struct {
		name string
		v    int
	}{
		{"MaxSessions", c.MaxSessions},
		{"Limits.MaxConns", c.Limits.MaxConns},
		{"Limits.MaxConnsPerClient", c.Limits.MaxConnsPerClient},
		{"Limits.MaxAddrsPerClient", c.Limits.MaxAddrsPerClient},
	} {
		if n.v < 0 {
			return fmt.Errorf("proxy config: %s is negative (%d)", n.name, n.v)
		}
	}
	return nil
}

// withDefaults returns c with every zero field set to its default. It is the
// only place defaults are applied.
func (c Config) withDefaults() Config {
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.ResponseHeaderTimeout == 0 {
		c.ResponseHeaderTimeout = DefaultResponseHeaderTimeout
	}
	if c.TunnelIdleTimeout == 0 {
		c.TunnelIdleTimeout = DefaultTunnelIdleTimeout
	}
	if c.Stats == nil {
		c.Stats = stats.NewRegistry(maxUpstreams)
	}
	if c.Rotate == "" {
		c.Rotate = RotateRequest
	}
	if c.SessionIdle == 0 {
		c.SessionIdle = DefaultSessionIdle
	}
	if c.MaxSessions == 0 {
		c.MaxSessions = netutil.DefaultMaxAddrs
	}
	if c.ClientTimeout == 0 {
		c.ClientTimeout = DefaultClientTimeout
	}
	c.Limits = c.Limits.withDefaults()
	return c
}

// Server is the forward proxy. It is an http.Handler, and serves its own
// HTTP/1.1 server on any number of listeners with Serve.
type Server struct {
	cfg   Config
	log   *slog.Logger
	gp    *goproxy.ProxyHttpServer // plain HTTP
	tr    *http.Transport          // gp's transport, dialing through cfg.Dial
	srv   *http.Server             // shared by every listener passed to Serve
	stats *stats.Registry

	// What a reload may replace; each request reads them once.
	access atomic.Pointer[Access]
	shaper atomic.Pointer[shape.Shaper]

	mu     sync.Mutex
	active int                    // handlers running; a tunnel runs in its handler
	idle   chan struct{}          // closed when active drops to 0; nil if nobody waits
	conns  map[io.Closer]struct{} // hijacked connections, closed on forced shutdown
	forced bool                   // Shutdown ran out of time: close hijacked conns at once

	socks socksListeners // listeners passed to ServeSOCKS5; see socks5.go

	sessions     *sessionTable  // RotateSession
	sessionStats stats.Sessions // rotations, for the admin API
	heldMu       sync.Mutex
	held         map[net.Conn]*heldAddr // RotateConnection: by client connection, until it closes or is hijacked

	clients     *clientTable  // what each client address holds, against the limits
	clientStats stats.Clients // open connections and refusals, for the admin API
	logins      *loginGuard   // failed logins per client address
	refusing    chan struct{} // connections over a cap being answered; see refuseConn
}

var _ http.Handler = (*Server)(nil)

// New returns a Server for cfg. It fails only if cfg is invalid.
func New(cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	s := &Server{
		cfg:   cfg,
		log:   cfg.Logger,
		stats: cfg.Stats,
		conns: make(map[io.Closer]struct{}),

		logins:   newLoginGuard(),
		refusing: make(chan struct{}, maxRefusing),
	}
	s.clients = newClientTable(cfg.Limits, &s.clientStats)
	s.SetAccess(cfg.Access)
	s.SetShaper(cfg.Shaper)
	s.tr = s.newTransport()
	s.gp = s.newGoproxy()

	var protocols http.Protocols
	protocols.SetHTTP1(true) // no HTTP/2, not even unencrypted: tunnels need Hijack
	s.srv = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: cfg.ClientTimeout,
		IdleTimeout:       clientIdleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		Protocols:         &protocols,
		ErrorLog:          slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelWarn),
		ConnContext:       s.connContext,
		ConnState:         s.connState,
	}
	switch cfg.Rotate {
	case RotateConnection:
		s.held = make(map[net.Conn]*heldAddr)
	case RotateSession:
		s.sessions = newSessionTable(cfg.SessionIdle, cfg.MaxSessions, cfg.Hold, s.newSessionAddr)
	}
	return s, nil
}

// Serve accepts client connections on ln until Shutdown is called. It may be
// called for several listeners at once; they share one http.Server, and
// with ServeSOCKS5's listeners the client limits (see Limits). It returns
// nil after Shutdown, or the error that stopped accepting.
func (s *Server) Serve(ln net.Listener) error {
	err := s.srv.Serve(s.listen(ln, false))
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Active returns the number of requests in flight, open CONNECT tunnels
// included.
func (s *Server) Active() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.active
}

// Shutdown stops accepting on every listener and closes idle client
// connections, then waits for in-flight requests and open tunnels to finish.
// It returns nil if they all finished before ctx was done. Otherwise it
// force-closes every connection left, client and upstream, and returns
// ctx.Err().
func (s *Server) Shutdown(ctx context.Context) error {
	// http.Server.Shutdown waits for requests it still owns, but not for
	// hijacked connections: every tunnel is one, hence waitIdle.
	s.socks.close() // SOCKS5 connections are waited for like tunnels, below
	err := s.srv.Shutdown(ctx)
	if ctx.Err() == nil {
		err = errors.Join(err, s.waitIdle(ctx))
	}
	s.tr.CloseIdleConnections()
	if ctx.Err() == nil {
		s.closeSessions()
		return err
	}
	defer s.closeSessions()

	s.log.Warn("shutdown timed out: closing remaining connections", "active", s.Active())
	_ = s.srv.Close() // client connections not hijacked, and listeners
	s.mu.Lock()
	s.forced = true
	for c := range s.conns {
		_ = c.Close()
	}
	clear(s.conns)
	s.mu.Unlock()

	// Let handlers unwind (and log), now that their connections are gone.
	grace, cancel := context.WithTimeout(context.Background(), forceCloseGrace)
	defer cancel()
	if s.waitIdle(grace) != nil {
		s.log.Warn("shutdown: handlers still running after forced close", "active", s.Active())
	}
	return ctx.Err()
}

func (s *Server) begin() {
	s.mu.Lock()
	s.active++
	s.mu.Unlock()
}

func (s *Server) end() {
	s.mu.Lock()
	s.active--
	if s.active == 0 && s.idle != nil {
		close(s.idle)
		s.idle = nil
	}
	s.mu.Unlock()
}

// waitIdle waits until no handler runs, or ctx is done.
func (s *Server) waitIdle(ctx context.Context) error {
	for {
		s.mu.Lock()
		if s.active == 0 {
			s.mu.Unlock()
			return nil
		}
		if s.idle == nil {
			s.idle = make(chan struct{})
		}
		idle := s.idle
		s.mu.Unlock()

		select {
		case <-idle:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// track registers a hijacked connection (or a tunnel's closer) to be closed
// if Shutdown runs out of time. It returns false, having closed c, if that
// already happened. untrack must be called once c is closed.
func (s *Server) track(c io.Closer) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.forced {
		_ = c.Close()
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c io.Closer) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}
