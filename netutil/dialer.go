package netutil

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Dialer opens upstream TCP connections, each bound to a fresh address
// leased from Pool. It never connects from any other IPv6 source: when no
// address can be had it fails with an error wrapping ErrNoAddress. A host
// with no IPv6 address is dialed over IPv4 from the host's own address, or
// refused, as IPv4 says.
type Dialer struct {
	Pool *Pool
	// Timeout bounds each connection attempt; zero means no limit beyond
	// the context's.
	Timeout time.Duration
	// Resolver looks up names; net.DefaultResolver when nil.
	Resolver *net.Resolver
	// FreeBind binds with IPV6_FREEBIND, to addresses that are not on any
	// interface: routed mode, where the prefix is routed to the host and a
	// local route for it makes every address of it the host's own.
	FreeBind bool
	// IPv4 says what to do with a host that has no IPv6 address but has
	// IPv4 ones: IPv4Direct dials it from the host's own IPv4 address,
	// anything else (the zero value included) refuses it with an error
	// wrapping ErrNoIPv6.
	IPv4 IPv4Policy
	// Guard refuses the destinations a client must not reach (the proxy
	// host itself, its link, private ranges; see Guard), whatever name leads
	// to them: a name that resolves only to such addresses fails with a
	// *DeniedError (wrapping ErrDenied), and the refused ones among several
	// are skipped. Nil admits every destination but zoned addresses, which
	// are always refused.
	Guard *Guard
}

// IPv4Policy says what a Dialer does with a host that has IPv4 addresses
// only (no AAAA record), or is an IPv4 literal.
type IPv4Policy string

const (
	// IPv4Deny fails such a dial with an error wrapping ErrNoIPv6. The zero
	// value, and any value other than IPv4Direct, means the same, so that a
	// Dialer left unset fails closed.
	IPv4Deny IPv4Policy = "deny"
	// IPv4Direct connects to such a host over IPv4 from the host's own
	// address (the kernel's choice; no lease, no bind). The connection's
	// DirectIPv4 reports true. A host with any IPv6 address is never dialed
	// over IPv4, not even when every IPv6 attempt fails.
	IPv4Direct IPv4Policy = "direct"
)

// Conn is an upstream connection bound to a leased egress address, or a
// direct IPv4 connection from the host's own address (see IPv4Direct), which
// has no lease. Closing it releases the address. It embeds *net.TCPConn so
// that io.Copy still reaches the kernel's splice path (ReadFrom, WriteTo) and
// half-close (CloseWrite, CloseRead) passes through; NetConn gives the proxy's
// tunnels the *net.TCPConn itself.
type Conn struct {
	*net.TCPConn
	lease  *Lease // nil for a direct IPv4 connection
	shared bool   // lease belongs to a holder (DialFrom), not to this connection
	closed sync.Once
	subnet *subnetEntry // its count among the pool's connections per /64
}

// Close closes the connection and releases its address, if it has one. A
// connection from DialFrom only stops counting against its lease, which its
// holder releases.
func (c *Conn) Close() error {
	err := c.TCPConn.Close()
	if c.lease != nil {
		c.closed.Do(func() {
			c.lease.pool.subnets.closed(c.subnet)
			if c.shared {
				c.unref()
			}
		})
		if !c.shared {
			c.lease.Release()
		}
	}
	return err
}

// NetConn returns the underlying TCP connection, as tls.Conn.NetConn does.
func (c *Conn) NetConn() net.Conn { return c.TCPConn }

// Egress returns the source address of the connection: the leased address,
// or for a direct IPv4 connection the host's own.
func (c *Conn) Egress() netip.Addr {
	if c.lease != nil {
		return c.lease.Addr()
	}
	if a, ok := c.TCPConn.LocalAddr().(*net.TCPAddr); ok {
		return a.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}

// DirectIPv4 reports whether the connection went over IPv4 from the host's
// own address (IPv4Direct) rather than from a leased IPv6 address.
func (c *Conn) DirectIPv4() bool { return c.lease == nil }

// DialContext connects to address ("host:port") over IPv6 from an address
// leased for the connection (see Pool.Acquire: a never-used one within the
// pool's Budget, else a warm one). Names are resolved first, so that a name
// that does not resolve costs no address; each AAAA record is tried in turn
// from the same source. A host without AAAA records (or an IPv4 literal) is
// handled as d.IPv4 says; with IPv4Direct each of its A records is tried in
// turn. The network "tcp6" never goes over IPv4.
//
// A connection from a never-used address, while warm addresses are there,
// gets FirstTry; if it gets no answer in that time it is made again from a
// warm address within the rest of the timeout, and if that one is answered
// the pool takes it as the router's neighbour table overflowing (see
// Budget). A ready address that left the interface (somebody deleted it)
// before the pool heard of it costs one more try from another address, not
// the client's request.
func (d *Dialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	ips, port, v4, err := d.resolve(ctx, network, address)
	if err != nil {
		return nil, err
	}
	if v4 {
		return d.dialIPv4(ctx, ips, port)
	}
	lease, err := d.Pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	conn, err := d.dialLease(ctx, ips, port, lease, false, true)
	if err == nil {
		return conn, nil
	}
	lease.Release()
	switch {
	case errors.Is(err, errNoAnswer):
		// The router may have dropped the answer for lack of a neighbour
		// entry: the same connection from a warm address tells.
		d.Pool.retried()
		warm, werr := d.Pool.acquireWarm(ctx)
		if werr != nil {
			return nil, err
		}
		if conn, err = d.dialLease(ctx, ips, port, warm, false, false); err != nil {
			warm.Release()
			return nil, err
		}
		d.Pool.overflowed()
		return conn, nil
	case addrGone(err):
		if lease, err = d.Pool.Acquire(ctx); err != nil {
			return nil, err
		}
		if conn, err = d.dialLease(ctx, ips, port, lease, false, false); err != nil {
			lease.Release()
			return nil, err
		}
		return conn, nil
	}
	return nil, err
}

// errNoAnswer is wrapped by the error of a first try (FirstTry) from a
// never-used address that got no answer: the caller may try again from a
// warm address.
var errNoAnswer = errors.New("no answer to a new address")

// dialLease connects from lease's address: a connection of its own
// (shared false), or one of many bound to a held lease. With adapt, a
// never-used address while warm ones are there gets FirstTry only, and a
// timeout in that time is an error wrapping errNoAnswer, after which the
// lease is marked to be removed on release rather than kept warm.
func (d *Dialer) dialLease(ctx context.Context, ips []netip.Addr, port uint16, lease *Lease, shared, adapt bool) (*Conn, error) {
	dctx, short := ctx, false
	if adapt && lease.Fresh() && d.Pool.warmFree() {
		if deadline, ok := ctx.Deadline(); !ok || time.Until(deadline) > FirstTry {
			var cancel context.CancelFunc
			dctx, cancel = context.WithTimeout(ctx, FirstTry)
			defer cancel()
			short = true
		}
	}
	c, err := d.dialBound(dctx, ips, port, lease.Addr())
	if err != nil {
		if addrGone(err) {
			lease.vanished()
		} else if short && ctx.Err() == nil && timedOut(err) {
			// The first try's deadline passed (the socket's deadline may
			// fire before dctx's timer: dctx.Err() can still be nil).
			lease.unanswered()
			err = fmt.Errorf("%w: %w", errNoAnswer, err)
		}
		return nil, err
	}
	lease.answered()
	conn := &Conn{TCPConn: c, lease: lease, shared: shared}
	if !lease.attach(conn) {
		conn.abort()
		lease.vanished()
		return nil, errLost
	}
	conn.subnet = d.Pool.subnets.opened(lease.Addr())
	return conn, nil
}

// DialFrom connects to address as DialContext does, but from the address of
// lease, which the caller holds for many connections (a proxy session, say)
// instead of a fresh one. Closing the connection does not release the lease;
// a lease released while connections from it are open stays in use until
// the last of them closes. A released lease, or one whose address left the
// interface, cannot be dialed from, nor can any while the pool is suspended
// (the uplink is down): that fails with an error wrapping ErrNoAddress. A
// host with no IPv6 address is handled as d.IPv4 says, without using the
// lease.
func (d *Dialer) DialFrom(ctx context.Context, network, address string, lease *Lease) (net.Conn, error) {
	return d.dialFrom(ctx, network, address, lease, false)
}

// dialFrom is DialFrom, with adapt as dialLease takes it.
func (d *Dialer) dialFrom(ctx context.Context, network, address string, lease *Lease, adapt bool) (net.Conn, error) {
	ips, port, v4, err := d.resolve(ctx, network, address)
	if err != nil {
		return nil, err
	}
	if v4 {
		return d.dialIPv4(ctx, ips, port)
	}
	if err := d.Pool.Usable(); err != nil {
		return nil, err
	}
	if err := lease.ref(); err != nil {
		return nil, err
	}
	conn, err := d.dialLease(ctx, ips, port, lease, true, adapt)
	if err != nil {
		lease.unref(nil)
		return nil, err
	}
	return conn, nil
}

// Hold leases one address from d.Pool for many connections, as a proxy
// session or a client connection holds one: dial connects from it
// (DialFrom), and release gives it back once the connections still open
// from it have closed. If the address leaves the interface, the connections
// from it end and the next dial leases another to hold instead; if the
// first connection from a never-used address gets no answer (see
// DialContext), the holder takes a warm address instead. It has the shape of
// proxy.HoldFunc.
func (d *Dialer) Hold(ctx context.Context) (dial func(ctx context.Context, network, address string) (net.Conn, error), release func(), err error) {
	lease, err := d.Pool.Acquire(ctx)
	if err != nil {
		return nil, nil, err
	}
	h := &holder{d: d, lease: lease}
	return h.dial, h.release, nil
}

// resolve checks network and looks address up: the IPv6 addresses to dial,
// or with v4 set the IPv4 addresses of a host that has no IPv6 one, when
// d.IPv4 allows dialing it.
func (d *Dialer) resolve(ctx context.Context, network, address string) (ips []netip.Addr, port uint16, v4 bool, err error) {
	if network != "tcp" && network != "tcp6" {
		return nil, 0, false, fmt.Errorf("dialing %s: network %q is not supported", address, network)
	}
	host, portStr, err := net.SplitHostPort(address)
	if err != nil {
		return nil, 0, false, fmt.Errorf("dialing %s: %w", address, err)
	}
	p, err := d.resolver().LookupPort(ctx, "tcp", portStr)
	if err != nil {
		return nil, 0, false, fmt.Errorf("dialing %s: %w", address, err)
	}
	ips, v4, err = d.lookup(ctx, host)
	if err != nil {
		return nil, 0, false, fmt.Errorf("dialing %s: %w", address, err)
	}
	if ips, err = d.admit(ips); err != nil {
		return nil, 0, false, fmt.Errorf("dialing %s: %w", address, err)
	}
	if v4 && (d.IPv4 != IPv4Direct || network != "tcp") {
		return nil, 0, false, fmt.Errorf("dialing %s: %w", address, ErrNoIPv6)
	}
	return ips, uint16(p), v4, nil
}

// admit returns ips without the addresses d.Guard refuses, in place, or the
// refusal of the first if it refuses them all.
func (d *Dialer) admit(ips []netip.Addr) ([]netip.Addr, error) {
	if d.Guard == nil {
		return ips, nil
	}
	var first error
	ips = slices.DeleteFunc(ips, func(ip netip.Addr) bool {
		err := d.Guard.Check(ip)
		if err != nil && first == nil {
			first = err
		}
		return err != nil
	})
	if len(ips) == 0 {
		return nil, first
	}
	return ips, nil
}

// dialBound connects to the first of ips that answers, over IPv6 from src.
func (d *Dialer) dialBound(ctx context.Context, ips []netip.Addr, port uint16, src netip.Addr) (*net.TCPConn, error) {
	nd := &net.Dialer{
		LocalAddr: &net.TCPAddr{IP: src.AsSlice()},
		Timeout:   d.Timeout,
	}
	if d.FreeBind {
		nd.Control = freeBind
	}
	return dialFirst(ctx, nd, "tcp6", ips, port, func(err error) error {
		if errors.Is(err, syscall.EADDRNOTAVAIL) {
			// The address is gone from the interface (somebody removed
			// it, or it expired): fail closed rather than bind another.
			return fmt.Errorf("%w: binding %s: %w", ErrNoAddress, src, err)
		}
		return nil
	})
}

// dialFirst connects with nd over network to the first of ips that
// answers, trying each in turn until ctx is done, and otherwise returns the
// first failure. fatal, if not nil, may turn a failure into the error that
// ends the tries at once.
func dialFirst(ctx context.Context, nd *net.Dialer, network string, ips []netip.Addr, port uint16, fatal func(error) error) (*net.TCPConn, error) {
	var first error
	for _, ip := range ips {
		c, err := nd.DialContext(ctx, network, netip.AddrPortFrom(ip, port).String())
		if err == nil {
			return c.(*net.TCPConn), nil
		}
		if fatal != nil {
			if err := fatal(err); err != nil {
				return nil, err
			}
		}
		if first == nil {
			first = err
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, first
}

func (d *Dialer) resolver() *net.Resolver {
	if d.Resolver != nil {
		return d.Resolver
	}
	return net.DefaultResolver
}

// dialIPv4 connects to the first of ips that answers, over IPv4 from the
// host's own address: no lease, no bind.
func (d *Dialer) dialIPv4(ctx context.Context, ips []netip.Addr, port uint16) (net.Conn, error) {
	c, err := dialFirst(ctx, &net.Dialer{Timeout: d.Timeout}, "tcp4", ips, port, nil)
	if err != nil {
		return nil, err
	}
	return &Conn{TCPConn: c}, nil
}

// lookup returns the addresses to dial for host: its IPv6 addresses if it
// has any, otherwise its IPv4 addresses with v4 set. A name is looked up for
// AAAA records first; only an answer that there are none (not a failure to
// get one) leads to the lookup for A records, so that a name with AAAA
// records never goes over IPv4. A name with neither gets the resolver's
// *net.DNSError, IsNotFound set when the name does not exist.
func (d *Dialer) lookup(ctx context.Context, host string) (ips []netip.Addr, v4 bool, err error) {
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			return nil, false, zoned(ip)
		}
		if ip.Is6() && !ip.Is4In6() {
			return []netip.Addr{ip}, false, nil
		}
		return []netip.Addr{ip.Unmap()}, true, nil
	}
	ips6, err := d.resolver().LookupNetIP(ctx, "ip6", host)
	if err != nil && !noSuchAddress(err) {
		return nil, false, err
	}
	ips = ips6[:0]
	for _, ip := range ips6 {
		if ip.Is6() && !ip.Is4In6() {
			ips = append(ips, ip)
		}
	}
	if len(ips) > 0 {
		return ips, false, nil
	}
	ips4, err4 := d.resolver().LookupNetIP(ctx, "ip4", host)
	if err4 != nil {
		if noSuchAddress(err4) {
			return nil, false, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
		}
		return nil, false, err4
	}
	ips = ips4[:0]
	for _, ip := range ips4 {
		if ip.Unmap().Is4() {
			ips = append(ips, ip.Unmap())
		}
	}
	if len(ips) == 0 {
		return nil, false, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return ips, true, nil
}

// noSuchAddress reports whether a lookup failed because the name has no
// address of the family asked for, or does not exist: an answer, unlike a
// timeout or a server failure. The resolver says "no suitable address" for a
// name in /etc/hosts with addresses of the other family only.
func noSuchAddress(err error) bool {
	if dnsErr, ok := errors.AsType[*net.DNSError](err); ok {
		return dnsErr.IsNotFound
	}
	addrErr, ok := errors.AsType[*net.AddrError](err)
	return ok && addrErr.Err == "no suitable address found"
}

// timedOut reports whether a dial failed for lack of time: its deadline or
// its context's passed.
func timedOut(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	ne, ok := errors.AsType[net.Error](err)
	return ok && ne.Timeout()
}

// freeBind sets IPV6_FREEBIND on a socket before it binds.
func freeBind(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_FREEBIND, 1)
	})
	if err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("setting IPV6_FREEBIND: %w", serr)
	}
	return nil
}
