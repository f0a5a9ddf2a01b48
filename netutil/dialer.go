package netutil

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Dialer opens upstream TCP connections, each bound to a fresh address
// leased from Pool. It never connects from any other source: when no address
// can be had it fails with an error wrapping ErrNoAddress.
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
}

// Conn is an upstream connection bound to a leased egress address. Closing
// it releases the address. It embeds *net.TCPConn so that io.Copy still
// reaches the kernel's splice path (ReadFrom, WriteTo) and half-close
// (CloseWrite, CloseRead) passes through.
type Conn struct {
	*net.TCPConn
	lease *Lease
}

// Close closes the connection and releases its address.
func (c *Conn) Close() error {
	err := c.TCPConn.Close()
	c.lease.Release()
	return err
}

// NetConn returns the underlying TCP connection, as tls.Conn.NetConn does.
func (c *Conn) NetConn() net.Conn { return c.TCPConn }

// Egress returns the source address of the connection.
func (c *Conn) Egress() netip.Addr { return c.lease.Addr() }

// DialContext connects to address ("host:port") over IPv6 from a fresh
// address. Names are resolved first, so that a name that does not resolve
// costs no address; each AAAA record is tried in turn from the same source.
func (d *Dialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	if network != "tcp" && network != "tcp6" {
		return nil, fmt.Errorf("dialing %s: network %q is not supported", address, network)
	}
	host, portStr, err := net.SplitHostPort(address)
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", address, err)
	}
	port, err := d.resolver().LookupPort(ctx, "tcp", portStr)
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", address, err)
	}
	ips, err := d.lookup(ctx, host)
	if err != nil {
		return nil, err
	}
	lease, err := d.Pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	nd := net.Dialer{
		LocalAddr: &net.TCPAddr{IP: lease.Addr().AsSlice()},
		Timeout:   d.Timeout,
	}
	if d.FreeBind {
		nd.Control = freeBind
	}
	var first error
	for _, ip := range ips {
		c, err := nd.DialContext(ctx, "tcp6", netip.AddrPortFrom(ip, uint16(port)).String())
		if err == nil {
			return &Conn{TCPConn: c.(*net.TCPConn), lease: lease}, nil
		}
		if errors.Is(err, syscall.EADDRNOTAVAIL) {
			// The address is gone from the interface (somebody removed
			// it, or it expired): fail closed rather than bind another.
			lease.Release()
			return nil, fmt.Errorf("%w: binding %s: %w", ErrNoAddress, lease.Addr(), err)
		}
		if first == nil {
			first = err
		}
		if ctx.Err() != nil {
			break
		}
	}
	lease.Release()
	return nil, first
}

func (d *Dialer) resolver() *net.Resolver {
	if d.Resolver != nil {
		return d.Resolver
	}
	return net.DefaultResolver
}

// lookup returns the IPv6 addresses of host. A host with none gets a
// *net.DNSError with IsNotFound set and the text "no IPv6 address".
func (d *Dialer) lookup(ctx context.Context, host string) ([]netip.Addr, error) {
	noIPv6 := &net.DNSError{Err: "no IPv6 address", Name: host, IsNotFound: true}
	if ip, err := netip.ParseAddr(host); err == nil {
		if !ip.Is6() || ip.Is4In6() {
			return nil, noIPv6
		}
		return []netip.Addr{ip}, nil
	}
	ips, err := d.resolver().LookupNetIP(ctx, "ip6", host)
	if err != nil {
		var dnsErr *net.DNSError
		if errors.As(err, &dnsErr) && !dnsErr.IsTimeout && !dnsErr.IsNotFound {
			// The resolver says "no suitable address" when the name has
			// only A records.
			if _, err4 := d.resolver().LookupNetIP(ctx, "ip4", host); err4 == nil {
				return nil, noIPv6
			}
		}
		return nil, err
	}
	out := ips[:0]
	for _, ip := range ips {
		if ip.Is6() && !ip.Is4In6() {
			out = append(out, ip)
		}
	}
	if len(out) == 0 {
		return nil, noIPv6
	}
	return out, nil
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
