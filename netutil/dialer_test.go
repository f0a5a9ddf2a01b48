package netutil

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/egressd/egressd/internal/nettest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// loopbackDialer returns a dialer whose pool draws from ::/127, whose only
// drawable address is ::1: real sockets bound to a leased address, without
// root. The fake manager stands in for netlink (::1 is already there).
func loopbackDialer(t *testing.T) (*Dialer, *Pool) {
	t.Helper()
	p := newTestPool(t, newFakeManager(), func(c *PoolConfig) {
		c.Prefix = netip.MustParsePrefix("::/127")
		c.Max = 1
		c.Linger = -1
	})
	return &Dialer{Pool: p, Timeout: 5 * time.Second}, p
}

func listenLoopback(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	}
	nettest.ServeEcho(t, ln)
	return ln
}

func TestDialerBindsLeasedAddress(t *testing.T) {
	d, p := loopbackDialer(t)
	ln := listenLoopback(t)
	ctx := context.Background()

	c, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	require.NoError(t, err)
	local := c.LocalAddr().(*net.TCPAddr)
	assert.Equal(t, "::1", local.IP.String())
	egress := c.(*Conn)
	assert.Equal(t, netip.MustParseAddr("::1"), egress.Egress())
	_, isTCP := egress.NetConn().(*net.TCPConn)
	assert.True(t, isTCP)

	// The only address is in use: a second connection must fail closed,
	// not leave from another source.
	_, err = d.DialContext(ctx, "tcp", ln.Addr().String())
	require.ErrorIs(t, err, ErrNoAddress)

	// Echo works, half-close passes through the embedded TCPConn.
	_, err = c.Write([]byte("ping"))
	require.NoError(t, err)
	require.NoError(t, egress.CloseWrite())
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.Equal(t, "ping", string(got))

	require.NoError(t, c.Close())
	assert.Zero(t, p.Stats().Live, "closing the connection gave the address back")
	c2, err := d.DialContext(ctx, "tcp6", ln.Addr().String())
	require.NoError(t, err)
	c2.Close()
}

func TestDialerErrors(t *testing.T) {
	d, p := loopbackDialer(t)
	// A port nothing listens on: grab one and close it.
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	}
	closedAddr := ln.Addr().String()
	ln.Close()

	tests := []struct {
		name    string
		network string
		addr    string
		check   func(t *testing.T, err error)
	}{
		{"refused", "tcp", closedAddr, func(t *testing.T, err error) {
			assert.NotErrorIs(t, err, ErrNoAddress)
		}},
		{"ipv4 literal", "tcp", "192.0.2.1:80", func(t *testing.T, err error) {
			// The dialer's IPv4 policy is unset: deny.
			assert.ErrorIs(t, err, ErrNoIPv6)
			assert.Contains(t, err.Error(), "no IPv6 address")
		}},
		{"tcp4", "tcp4", closedAddr, func(t *testing.T, err error) {
			assert.Contains(t, err.Error(), "not supported")
		}},
		{"no port", "tcp", "upstream.test", func(t *testing.T, err error) {
			assert.Contains(t, err.Error(), "missing port")
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := d.DialContext(context.Background(), tt.network, tt.addr)
			require.Error(t, err)
			tt.check(t, err)
			assert.Zero(t, p.Stats().Live, "a failed dial gives its address back")
		})
	}
}

func TestDialerContextCanceled(t *testing.T) {
	d, _ := loopbackDialer(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := d.DialContext(ctx, "tcp", "[::1]:80")
	require.Error(t, err)
	assert.True(t, errors.Is(err, context.Canceled))
}

// TestDialFromSharesLease: many connections from one held address, none of
// which gives it back when it closes; the holder's Release does, once the
// last connection bound to it is closed.
func TestDialFromSharesLease(t *testing.T) {
	d, p := loopbackDialer(t)
	ln := listenLoopback(t)
	ctx := context.Background()

	lease, err := p.Acquire(ctx)
	require.NoError(t, err)
	var conns []net.Conn
	for range 3 {
		c, err := d.DialFrom(ctx, "tcp", ln.Addr().String(), lease)
		require.NoError(t, err)
		assert.Equal(t, "::1", c.LocalAddr().(*net.TCPAddr).IP.String())
		assert.Equal(t, lease.Addr(), c.(*Conn).Egress())
		assert.False(t, c.(*Conn).DirectIPv4())
		conns = append(conns, c)
	}
	require.NoError(t, conns[0].Close())
	_ = conns[0].Close() // closing twice counts once
	assert.Equal(t, 1, p.Stats().InUse, "a connection's close keeps the held address")

	// A failed dial does not count against the lease either.
	_, err = d.DialFrom(ctx, "tcp", "192.0.2.1:80", lease)
	require.ErrorIs(t, err, ErrNoIPv6)

	lease.Release()
	assert.Equal(t, 1, p.Stats().InUse, "open connections keep a released lease")
	_, err = d.DialFrom(ctx, "tcp", ln.Addr().String(), lease)
	require.ErrorIs(t, err, ErrNoAddress, "a released lease cannot be dialed from")
	require.NoError(t, conns[1].Close())
	assert.Equal(t, 1, p.Stats().InUse)
	require.NoError(t, conns[2].Close())
	assert.Zero(t, p.Stats().Live, "the last connection gave the address back")
}

// TestDialerHold: Hold's dial connects from one leased address, and its
// release gives the address back once the connections from it closed.
func TestDialerHold(t *testing.T) {
	d, p := loopbackDialer(t)
	ln := listenLoopback(t)
	ctx := context.Background()

	dial, release, err := d.Hold(ctx)
	require.NoError(t, err)
	a, err := dial(ctx, "tcp", ln.Addr().String())
	require.NoError(t, err)
	b, err := dial(ctx, "tcp", ln.Addr().String())
	require.NoError(t, err)
	assert.Equal(t, a.(*Conn).Egress(), b.(*Conn).Egress(), "one address for both")
	assert.Equal(t, 1, p.Stats().InUse)

	_, _, err = d.Hold(ctx)
	require.ErrorIs(t, err, ErrNoAddress, "the pool's only address is held")

	release()
	require.NoError(t, a.Close())
	require.NoError(t, b.Close())
	assert.Zero(t, p.Stats().Live, "released, and the last connection gave it back")
}

// TestDialerGuard: destinations the Guard refuses are never connected to,
// whether named by a literal in any spelling or by a name that resolves to
// them, and take no address; a name with other addresses too is dialed at
// those only. A zoned literal is refused even without a Guard.
func TestDialerGuard(t *testing.T) {
	d, p := loopbackDialer(t)
	ln := listenLoopback(t)
	_, port, err := net.SplitHostPort(ln.Addr().String())
	require.NoError(t, err)
	d.Guard = NewGuard(nil, nil)
	d.IPv4 = IPv4Direct
	ctx := context.Background()
	for _, host := range []string{"::1", "127.0.0.1", "::ffff:127.0.0.1", "0.0.0.0", "::", "169.254.169.254",
		"fe80::1", "fe80::1%lo", "::1%lo", "::%lo", "::0%0", "localhost", "64:ff9b::7f00:1", "10.1.2.3"} {
		_, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, port))
		require.ErrorIs(t, err, ErrDenied, host)
		var de *DeniedError
		require.ErrorAs(t, err, &de, host)
		assert.Contains(t, err.Error(), "not allowed", host)
	}
	assert.Zero(t, p.Stats().Live, "a denied dial takes no address")

	// Only the admitted one of several addresses is tried.
	ips, err := d.admit([]netip.Addr{netip.MustParseAddr("::1"), netip.MustParseAddr("2001:db8::1")})
	require.NoError(t, err)
	assert.Equal(t, []netip.Addr{netip.MustParseAddr("2001:db8::1")}, ips)

	// Without a Guard, the loopback is an upstream like any other (the
	// tests of this package rely on that), but a zone is still refused.
	d.Guard = nil
	c, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	require.NoError(t, err)
	c.Close()
	_, err = d.DialContext(ctx, "tcp", net.JoinHostPort("::1%lo", port))
	require.ErrorIs(t, err, ErrDenied)
}
