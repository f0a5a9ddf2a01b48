package netutil

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeManager stands in for the kernel: it keeps the set of addresses on a
// pretend interface.
type fakeManager struct {
	mu        sync.Mutex
	addrs     map[netip.Addr]time.Duration // address -> lifetime
	foreign   map[netip.Addr]bool          // on the interface, not ours
	adds      int
	refreshes int
	removes   []netip.Addr
	failAdd   error
	addDelay  time.Duration
}

var _ AddrManager = (*fakeManager)(nil)

func newFakeManager() *fakeManager {
	return &fakeManager{addrs: make(map[netip.Addr]time.Duration), foreign: make(map[netip.Addr]bool)}
}

func (m *fakeManager) Add(a netip.Addr, lifetime time.Duration) error {
	m.mu.Lock()
	delay := m.addDelay
	m.mu.Unlock()
	time.Sleep(delay)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.failAdd != nil {
		return m.failAdd
	}
	if _, ok := m.addrs[a]; ok || m.foreign[a] {
		return fmt.Errorf("adding %s: %w", a, fs.ErrExist)
	}
	m.adds++
	m.addrs[a] = lifetime
	return nil
}

func (m *fakeManager) Refresh(a netip.Addr, lifetime time.Duration) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.foreign[a] {
		return errors.New("refreshing an address that is not ours")
	}
	m.refreshes++
	m.addrs[a] = lifetime
	return nil
}

func (m *fakeManager) Remove(a netip.Addr) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.foreign[a] {
		return errors.New("removing an address that is not ours")
	}
	m.removes = append(m.removes, a)
	delete(m.addrs, a)
	return nil
}

func (m *fakeManager) count() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.addrs)
}

func (m *fakeManager) addCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.adds
}

func (m *fakeManager) has(a netip.Addr) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.addrs[a]
	return ok
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func newTestPool(t *testing.T, m *fakeManager, mod func(*PoolConfig)) *Pool {
	t.Helper()
	cfg := PoolConfig{
		Prefix:  netip.MustParsePrefix("2001:db8:1:2::/64"),
		Manager: m,
		Logger:  quiet,
		Ready:   -1,
	}
	if mod != nil {
		mod(&cfg)
	}
	p, err := NewPool(cfg)
	require.NoError(t, err)
	return p
}

func TestPoolConfigErrors(t *testing.T) {
	tests := []struct {
		name string
		cfg  PoolConfig
		want string
	}{
		{"ipv4 prefix", PoolConfig{Prefix: netip.MustParsePrefix("192.0.2.0/24"), Manager: newFakeManager()}, "not an IPv6 prefix"},
		{"no prefix", PoolConfig{Manager: newFakeManager()}, "not an IPv6 prefix"},
		{"slash128", PoolConfig{Prefix: netip.MustParsePrefix("2001:db8::1/128"), Manager: newFakeManager()}, "no address to draw"},
		{"negative max", PoolConfig{Prefix: netip.MustParsePrefix("2001:db8::/64"), Max: -1, Manager: newFakeManager()}, "max addresses -1"},
		{"short lifetime", PoolConfig{Prefix: netip.MustParsePrefix("2001:db8::/64"), Lifetime: time.Second, Manager: newFakeManager()}, "lifetime 1s"},
		{"no manager", PoolConfig{Prefix: netip.MustParsePrefix("2001:db8::/64")}, "no address manager"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewPool(tt.cfg)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestPoolNeverDrawsExcluded(t *testing.T) {
	// A /124 has 15 drawable addresses; exclude five of them. Every address
	// the pool hands out while all are held must come from the other ten.
	m := newFakeManager()
	prefix := netip.MustParsePrefix("2001:db8::/124")
	excluded := []netip.Addr{
		netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2"),
		netip.MustParseAddr("2001:db8::3"), netip.MustParseAddr("2001:db8::a"),
		netip.MustParseAddr("2001:db8::f"),
	}
	p := newTestPool(t, m, func(c *PoolConfig) { c.Prefix = prefix; c.Exclude = excluded })
	seen := make(map[netip.Addr]bool)
	for range 10 {
		l, err := p.Acquire(context.Background())
		require.NoError(t, err)
		assert.NotContains(t, excluded, l.Addr())
		assert.NotEqual(t, prefix.Addr(), l.Addr())
		assert.False(t, seen[l.Addr()], "%s handed out twice while in use", l.Addr())
		seen[l.Addr()] = true
	}
	_, err := p.Acquire(context.Background())
	require.ErrorIs(t, err, ErrNoAddress, "an eleventh address does not exist")
}

func TestPoolLimit(t *testing.T) {
	m := newFakeManager()
	p := newTestPool(t, m, func(c *PoolConfig) { c.Max = 2; c.Linger = time.Hour })
	ctx := context.Background()
	l1, err := p.Acquire(ctx)
	require.NoError(t, err)
	l2, err := p.Acquire(ctx)
	require.NoError(t, err)

	_, err = p.Acquire(ctx)
	require.ErrorIs(t, err, ErrNoAddress)
	assert.Contains(t, err.Error(), "all 2 addresses are in use")

	// A released address stays warm, but gives its place to a new one at once.
	l1.Release()
	l1.Release() // twice is harmless
	assert.True(t, m.has(l1.Addr()), "a released address stays warm")
	l3, err := p.Acquire(ctx)
	require.NoError(t, err)
	assert.False(t, m.has(l1.Addr()), "the warm address made room")
	assert.NotEqual(t, l1.Addr(), l3.Addr())
	assert.NotEqual(t, l2.Addr(), l3.Addr())
	assert.Equal(t, 2, m.count())
	assert.Equal(t, 2, p.Stats().InUse)
}

func TestPoolAddFailure(t *testing.T) {
	m := newFakeManager()
	m.failAdd = errors.New("operation not permitted")
	p := newTestPool(t, m, nil)
	_, err := p.Acquire(context.Background())
	require.ErrorIs(t, err, ErrNoAddress)
	assert.Contains(t, err.Error(), "operation not permitted")
	assert.Equal(t, uint64(1), p.Stats().AddFailures)
	assert.Zero(t, p.Stats().Live)
}

func TestPoolSkipsForeignAddress(t *testing.T) {
	// In a /127 there is one drawable address; when somebody else holds it
	// the pool must not take it over, and must not remove it.
	m := newFakeManager()
	only := netip.MustParseAddr("2001:db8::1")
	m.foreign[only] = true
	p := newTestPool(t, m, func(c *PoolConfig) { c.Prefix = netip.MustParsePrefix("2001:db8::/127") })
	_, err := p.Acquire(context.Background())
	require.ErrorIs(t, err, ErrNoAddress)
	_, err = p.Close()
	require.NoError(t, err)
	assert.Empty(t, m.removes)
}

func TestPoolRunKeepsReadyAndRemovesReleased(t *testing.T) {
	m := newFakeManager()
	p := newTestPool(t, m, func(c *PoolConfig) { c.Ready = 3; c.Linger = 10 * time.Millisecond })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	require.Eventually(t, func() bool { return p.Stats().Ready == 3 }, 5*time.Second, time.Millisecond)
	adds := m.addCount()
	l, err := p.Acquire(ctx)
	require.NoError(t, err)
	assert.True(t, m.has(l.Addr()))
	// The lease came from the ready ones: the request path did not add.
	// The refiller adds a replacement afterwards.
	require.Eventually(t, func() bool { return p.Stats().Ready == 3 }, 5*time.Second, time.Millisecond)
	assert.Equal(t, adds+1, m.addCount())

	l.Release()
	require.Eventually(t, func() bool { return !m.has(l.Addr()) }, 5*time.Second, time.Millisecond)
	s := p.Stats()
	assert.Equal(t, 3, s.Live)
	assert.Equal(t, uint64(1), s.Removed)
}

func TestPoolRefreshesLifetimes(t *testing.T) {
	m := newFakeManager()
	p := newTestPool(t, m, func(c *PoolConfig) { c.Lifetime = time.Minute })
	now := time.Unix(1_000_000, 0)
	p.now = func() time.Time { return now }

	old, err := p.Acquire(context.Background())
	require.NoError(t, err)
	now = now.Add(20 * time.Second)
	young, err := p.Acquire(context.Background())
	require.NoError(t, err)

	now = now.Add(15 * time.Second) // old is 35s into a 60s lifetime, young 15s
	p.refreshOld()
	assert.Equal(t, 1, m.refreshes, "only the address past half its lifetime is refreshed")

	now = now.Add(20 * time.Second) // young is now 35s old, old was refreshed 20s ago
	p.refreshOld()
	assert.Equal(t, 2, m.refreshes)
	_, _ = old, young
}

func TestPoolClose(t *testing.T) {
	m := newFakeManager()
	p := newTestPool(t, m, func(c *PoolConfig) { c.Ready = 3; c.Linger = time.Hour })
	ctx := context.Background()
	require.NoError(t, p.fill(ctx))
	inUse, err := p.Acquire(ctx)
	require.NoError(t, err)
	released, err := p.Acquire(ctx)
	require.NoError(t, err)
	released.Release()
	require.Equal(t, 3, m.count(), "one ready, one in use, one warm")

	n, err := p.Close()
	require.NoError(t, err)
	assert.Equal(t, 3, n)
	assert.Zero(t, m.count())
	assert.Zero(t, p.Stats().Live)

	_, err = p.Acquire(ctx)
	require.ErrorIs(t, err, ErrNoAddress)
	inUse.Release() // after Close: nothing left to do, nothing breaks
	assert.Zero(t, m.count())
}

func TestPoolCloseWaitsForAdd(t *testing.T) {
	m := newFakeManager()
	m.addDelay = 50 * time.Millisecond
	p := newTestPool(t, m, nil)
	errc := make(chan error, 1)
	go func() {
		_, err := p.Acquire(context.Background())
		errc <- err
	}()
	require.Eventually(t, func() bool { return p.Stats().Live == 1 }, 5*time.Second, time.Millisecond)
	_, err := p.Close()
	require.NoError(t, err)
	<-errc
	assert.Zero(t, m.count(), "an address added while closing is taken back out")
}

func TestPoolConcurrentLeasesAreDistinct(t *testing.T) {
	m := newFakeManager()
	p := newTestPool(t, m, func(c *PoolConfig) { c.Ready = 4; c.Linger = -1 })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	var mu sync.Mutex
	held := make(map[netip.Addr]bool)
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() {
			for range 20 {
				l, err := p.Acquire(ctx)
				if !assert.NoError(t, err) {
					return
				}
				mu.Lock()
				assert.False(t, held[l.Addr()], "%s leased twice at once", l.Addr())
				held[l.Addr()] = true
				mu.Unlock()
				time.Sleep(time.Millisecond)
				mu.Lock()
				delete(held, l.Addr())
				mu.Unlock()
				l.Release()
			}
		})
	}
	wg.Wait()
	s := p.Stats()
	assert.Zero(t, s.InUse)
	assert.GreaterOrEqual(t, s.Added, uint64(1000))
	assert.LessOrEqual(t, s.Live, DefaultMaxAddrs)
}

func BenchmarkPoolAcquireReady(b *testing.B) {
	// Taking a ready address and giving it back, with a fake kernel: the
	// pool's own cost on the request path. Ready addresses are topped up
	// outside the timed part.
	m := newFakeManager()
	p, err := NewPool(PoolConfig{
		Prefix:  netip.MustParsePrefix("2001:db8:1:2::/64"),
		Manager: m,
		Logger:  quiet,
		Max:     8192,
		Ready:   4096,
		Linger:  -1,
	})
	require.NoError(b, err)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if p.Stats().Ready == 0 {
			b.StopTimer()
			require.NoError(b, p.fill(ctx))
			b.StartTimer()
		}
		l, err := p.Acquire(ctx)
		if err != nil {
			b.Fatal(err)
		}
		l.Release()
	}
}
