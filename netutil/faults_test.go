package netutil

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/egressd/egressd/internal/nettest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// drop takes a off the pretend interface, as somebody else deleting it does.
func (m *fakeManager) drop(a netip.Addr) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.addrs, a)
}

func (m *fakeManager) setFailAdd(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.failAdd = err
}

func (m *fakeManager) removed(a netip.Addr) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, r := range m.removes {
		if r == a {
			return true
		}
	}
	return false
}

func addrStates(p *Pool) map[netip.Addr]AddrState {
	out := map[netip.Addr]AddrState{}
	for _, a := range p.Addrs() {
		out[a.Addr] = a.State
	}
	return out
}

// TestPoolLostAddress: an address that left the interface without the pool
// removing it is forgotten in whatever state it was, never removed by the
// pool again, and counted; a lease on it is lost.
func TestPoolLostAddress(t *testing.T) {
	for _, state := range []AddrState{StateReady, StateInUse, StateWarm} {
		t.Run(state.String(), func(t *testing.T) {
			m := newFakeManager()
			p := newTestPool(t, m, func(c *PoolConfig) { c.Ready = 2; c.Linger = time.Hour })
			ctx := context.Background()
			require.NoError(t, p.fill(ctx))
			var a netip.Addr
			var lease *Lease
			switch state {
			case StateReady:
				a = p.Addrs()[0].Addr
			case StateInUse, StateWarm:
				var err error
				lease, err = p.Acquire(ctx)
				require.NoError(t, err)
				a = lease.Addr()
				if state == StateWarm {
					lease.Release()
				}
			}
			require.Equal(t, state, addrStates(p)[a])

			m.drop(a)
			require.True(t, p.lost(a, nil))
			assert.NotContains(t, addrStates(p), a, "forgotten")
			assert.Equal(t, uint64(1), p.Stats().Lost)
			assert.False(t, p.lost(a, nil), "once")
			if state == StateInUse {
				assert.True(t, lease.isLost())
				lease.Release() // harmless
			}

			// Requests go on from the other addresses.
			next, err := p.Acquire(ctx)
			require.NoError(t, err)
			assert.NotEqual(t, a, next.Addr())
			_, err = p.Close()
			require.NoError(t, err)
			assert.False(t, m.removed(a), "the pool never removes a lost address")
		})
	}
}

// TestPoolLostAddressDrawnAgain: a lease whose address was lost and then
// drawn again for another lease gives back nothing when released: the
// address is the other lease's now.
func TestPoolLostAddressDrawnAgain(t *testing.T) {
	m := newFakeManager()
	// One drawable address: 2001:db8::1.
	p := newTestPool(t, m, func(c *PoolConfig) { c.Prefix = netip.MustParsePrefix("2001:db8::/127"); c.Linger = -1 })
	ctx := context.Background()
	old, err := p.Acquire(ctx)
	require.NoError(t, err)
	m.drop(old.Addr())
	require.True(t, p.lost(old.Addr(), nil))

	fresh, err := p.Acquire(ctx)
	require.NoError(t, err)
	require.Equal(t, old.Addr(), fresh.Addr())
	old.Release()
	assert.Equal(t, 1, p.Stats().InUse, "the old lease released nothing")
	assert.True(t, m.has(fresh.Addr()))
	assert.False(t, p.lost(fresh.Addr(), old), "the old lease does not hold it")
	fresh.Release()
	assert.Zero(t, p.Stats().Live)
}

// TestPoolAddFailures: netlink refusing adds fails every request closed,
// counted, with one warning for the whole run of failures; once adds work
// again the pool recovers by itself, refiller included, and says so once.
func TestPoolAddFailures(t *testing.T) {
	for _, errno := range []unix.Errno{unix.EPERM, unix.ENOSPC} {
		t.Run(errno.Error(), func(t *testing.T) {
			m := newFakeManager()
			var logs nettest.LogBuffer
			p := newTestPool(t, m, func(c *PoolConfig) { c.Ready = 2; c.Logger = logs.Logger() })
			m.setFailAdd(fmt.Errorf("adding an address to eth0: %w", errno))
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { p.Run(ctx); close(done) }()
			t.Cleanup(func() { cancel(); <-done })

			for range 5 {
				_, err := p.Acquire(ctx)
				require.ErrorIs(t, err, ErrNoAddress)
				require.ErrorIs(t, err, errno)
				assert.Contains(t, err.Error(), errno.Error())
			}
			// The refiller fails too, at least once a second.
			require.Eventually(t, func() bool { return p.Stats().AddFailures >= 6 }, 10*time.Second, 10*time.Millisecond)
			s := p.Stats()
			assert.Zero(t, s.Live)
			assert.Zero(t, s.Added)
			assert.Equal(t, 1, logs.Count("adding egress addresses fails"), "one warning for the episode:\n%s", logs.String())
			assert.Equal(t, 1, logs.Count(errno.Error()))

			m.setFailAdd(nil)
			require.Eventually(t, func() bool { return p.Stats().Ready == 2 }, 10*time.Second, 10*time.Millisecond,
				"the refiller recovers by itself")
			l, err := p.Acquire(ctx)
			require.NoError(t, err)
			l.Release()
			assert.Equal(t, 1, logs.Count("adding egress addresses works again"), logs.String())

			// A second episode is told again.
			m.setFailAdd(fmt.Errorf("adding: %w", errno))
			for range 3 {
				_, err := p.Acquire(ctx)
				if err != nil { // the ready addresses go first
					require.ErrorIs(t, err, ErrNoAddress)
				}
			}
			require.Eventually(t, func() bool { return logs.Count("adding egress addresses fails") == 2 }, 10*time.Second, 10*time.Millisecond)
		})
	}
}

// TestPoolSuspend: while a fault suspends the pool, Acquire fails at once
// saying why and the refiller adds nothing; addresses in use are left
// alone; when the last fault ends the pool works again.
func TestPoolSuspend(t *testing.T) {
	m := newFakeManager()
	p := newTestPool(t, m, func(c *PoolConfig) { c.Ready = 2 })
	ctx := context.Background()
	inUse, err := p.Acquire(ctx)
	require.NoError(t, err)

	assert.True(t, p.Suspend("uplink", errors.New("uplink eth0 is down")))
	assert.False(t, p.Suspend("uplink", errors.New("uplink eth0 is down")), "already")
	assert.True(t, p.Suspend("route", errors.New("route local 2001:db8::/64 dev lo table local is missing")))
	_, err = p.Acquire(ctx)
	require.ErrorIs(t, err, ErrNoAddress)
	assert.EqualError(t, err, "no fresh egress address: uplink eth0 is down", "the first fault is told")
	adds := m.addCount()
	require.NoError(t, p.fill(ctx))
	assert.Equal(t, adds, m.addCount(), "the refiller waits")
	assert.Equal(t, 1, p.Stats().InUse, "the address in use stays")

	assert.True(t, p.Resume("uplink"))
	assert.False(t, p.Resume("uplink"))
	_, err = p.Acquire(ctx)
	assert.EqualError(t, err, "no fresh egress address: route local 2001:db8::/64 dev lo table local is missing")
	assert.True(t, p.Resume("route"))
	l, err := p.Acquire(ctx)
	require.NoError(t, err)
	require.NoError(t, p.fill(ctx))
	assert.Equal(t, 2, p.Stats().Ready)
	l.Release()
	inUse.Release()
}

// TestDialerEndsConnectionsOfLostAddress: when a leased address is lost, the
// connections bound to it end at once (the kernel would leave them open),
// the upstream sees them end, and the next connection gets a fresh lease.
func TestDialerEndsConnectionsOfLostAddress(t *testing.T) {
	d, p := loopbackDialer(t)
	m := p.mgr.(*fakeManager)
	ln := listenLoopback(t)
	ctx := context.Background()

	c, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	a := c.(*Conn).Egress()
	m.drop(a)
	require.True(t, p.lost(a, nil))
	_, err = c.Read(make([]byte, 1))
	require.ErrorIs(t, err, net.ErrClosed, "the connection is ended")
	assert.Zero(t, p.Stats().Live)

	c2, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	require.NoError(t, err, "the next connection leases a fresh address")
	nettest.Echo(t, c2)
	require.NoError(t, c2.Close())
	_ = c.Close() // already ended: net.ErrClosed
	assert.Zero(t, p.Stats().Live)
}

// TestDialerHoldLostAddress: the connections from a held address end when it
// is lost, and the holder's next dial leases a fresh address and keeps it.
func TestDialerHoldLostAddress(t *testing.T) {
	d, p := loopbackDialer(t)
	m := p.mgr.(*fakeManager)
	ln := listenLoopback(t)
	ctx := context.Background()

	dial, release, err := d.Hold(ctx)
	require.NoError(t, err)
	var old []net.Conn
	for range 2 {
		c, err := dial(ctx, "tcp", ln.Addr().String())
		require.NoError(t, err)
		defer c.Close()
		old = append(old, c)
	}
	a := old[0].(*Conn).Egress()
	m.drop(a)
	require.True(t, p.lost(a, nil))
	for _, c := range old {
		_, err := c.Read(make([]byte, 1))
		require.ErrorIs(t, err, net.ErrClosed, "a connection from the lost address is ended")
	}

	adds := m.addCount()
	c1, err := dial(ctx, "tcp", ln.Addr().String())
	require.NoError(t, err, "the holder leases a fresh address")
	c2, err := dial(ctx, "tcp", ln.Addr().String())
	require.NoError(t, err)
	assert.Equal(t, adds+1, m.addCount(), "one fresh address, held for both")
	nettest.Echo(t, c1)
	nettest.Echo(t, c2)
	assert.Equal(t, 1, p.Stats().InUse)
	for _, c := range old {
		c.Close()
	}
	assert.Equal(t, 1, p.Stats().InUse, "closing the old connections gives back nothing of the new lease")
	release()
	require.NoError(t, c1.Close())
	require.NoError(t, c2.Close())
	assert.Zero(t, p.Stats().Live)
}
