package proxy

import (
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy/stats"
)

// Limits bound what clients may hold at once, so that one client cannot
// starve the others: open connections in total and per client address, and
// egress addresses per client address. A client address is the full IP
// address a connection comes from: every container on a bridge is a client
// of its own, while all the host's loopback clients share 127.0.0.1's
// budget. Server.SetLimits replaces them while the proxy runs; zero fields
// take the defaults.
type Limits struct {
	// MaxConns bounds the open client connections, HTTP and SOCKS5
	// together, tunnels included. Past it a new connection is answered 503
	// (SOCKS5: general failure) and closed. Default DefaultMaxConns.
	MaxConns int
	// MaxConnsPerClient bounds the open connections of one client
	// address. Default DefaultMaxConnsPerClient.
	MaxConnsPerClient int
	// MaxAddrsPerClient bounds the egress addresses one client address
	// holds at once: its requests and tunnels in flight from a fresh
	// address, the sessions it opened (RotateSession) and the addresses
	// held for its connections (RotateConnection). Past it a request is
	// answered 503. Default DefaultMaxAddrsPerClient.
	MaxAddrsPerClient int
}

// Default limits. DefaultMaxConnsPerClient and DefaultMaxAddrsPerClient
// are a quarter of DefaultMaxConns and netutil.DefaultMaxAddrs: one client
// holding every connection or address would deny every other.
const (
	DefaultMaxConns          = 16384
	DefaultMaxConnsPerClient = DefaultMaxConns / 4
	DefaultMaxAddrsPerClient = netutil.DefaultMaxAddrs / 4
)

func (l Limits) withDefaults() Limits {
	if l.MaxConns <= 0 {
		l.MaxConns = DefaultMaxConns
	}
	if l.MaxConnsPerClient <= 0 {
		l.MaxConnsPerClient = DefaultMaxConnsPerClient
	}
	if l.MaxAddrsPerClient <= 0 {
		l.MaxAddrsPerClient = DefaultMaxAddrsPerClient
	}
	return l
}

// SetLimits replaces the client limits. What clients already hold past new,
// lower limits stays theirs; only new connections and addresses are
// refused.
func (s *Server) SetLimits(l Limits) {
	l = l.withDefaults()
	s.clients.limits.Store(&l)
}

// Limits returns the client limits in force, defaults filled in.
func (s *Server) Limits() Limits { return *s.clients.limits.Load() }

// ClientStats returns the counters about client connections: how many are
// open, and how many were refused, by reason.
func (s *Server) ClientStats() stats.ClientStats { return s.clientStats.Snapshot() }

// client is one client address: its open connections and the egress
// addresses it holds. The entry lives while it has either.
type client struct {
	addr  netip.Addr
	t     *clientTable
	conns int // clientTable.mu
	addrs int // clientTable.mu
}

// clientTable counts what every client address holds, against Limits.
type clientTable struct {
	limits atomic.Pointer[Limits]
	stats  *stats.Clients

	mu    sync.Mutex
	m     map[netip.Addr]*client
	total int // open connections
}

func newClientTable(l Limits, st *stats.Clients) *clientTable {
	t := &clientTable{stats: st, m: make(map[netip.Addr]*client)}
	l = l.withDefaults()
	t.limits.Store(&l)
	return t
}

// The refusals of a client over its caps.
var (
	errMaxConns = clientRefusal(stats.RefusedMaxConns, http.StatusServiceUnavailable, typeConnLimit,
		"egressd has too many client connections open (-max-conns)")
	errMaxConnsPerClient = clientRefusal(stats.RefusedMaxConnsPerClient, http.StatusServiceUnavailable, typeConnLimit,
		"this client has too many connections open (-max-conns-per-client)")
)

// enter counts a new connection from addr, or refuses it over a cap.
func (t *clientTable) enter(addr netip.Addr) (*client, *Error) {
	l := t.limits.Load()
	addr = addr.Unmap()
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.total >= l.MaxConns {
		return nil, errMaxConns
	}
	c := t.m[addr]
	if c != nil && c.conns >= l.MaxConnsPerClient {
		return nil, errMaxConnsPerClient
	}
	if c == nil {
		c = &client{addr: addr, t: t}
		t.m[addr] = c
	}
	c.conns++
	t.total++
	t.stats.Connections.Add(1)
	return c, nil
}

// leave counts a connection of c closed.
func (c *client) leave() {
	t := c.t
	t.mu.Lock()
	defer t.mu.Unlock()
	c.conns--
	t.total--
	t.stats.Connections.Add(-1)
	t.dropLocked(c)
}

func (t *clientTable) dropLocked(c *client) {
	if c.conns == 0 && c.addrs == 0 {
		delete(t.m, c.addr)
	}
}

// reserveAddr counts one more egress address held by c, or refuses it over
// -max-addrs-per-client. A nil client (a request that came through no
// listener of ours) is never refused.
func (c *client) reserveAddr() *Error {
	if c == nil {
		return nil
	}
	t := c.t
	max := t.limits.Load().MaxAddrsPerClient
	t.mu.Lock()
	defer t.mu.Unlock()
	if c.addrs >= max {
		return clientRefusal(stats.RefusedMaxAddrsPerClient, http.StatusServiceUnavailable, typeConnLimit,
			"this client holds %d egress addresses (-max-addrs-per-client)", max)
	}
	c.addrs++
	return nil
}

// releaseAddr counts one egress address of c given back.
func (c *client) releaseAddr() {
	if c == nil {
		return
	}
	t := c.t
	t.mu.Lock()
	defer t.mu.Unlock()
	c.addrs--
	t.dropLocked(c)
}

// clientAddr is the IP address of a connection's remote end.
func clientAddr(a net.Addr) netip.Addr {
	switch a := a.(type) {
	case *net.TCPAddr:
		return a.AddrPort().Addr().Unmap()
	case nil:
		return netip.Addr{}
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}
