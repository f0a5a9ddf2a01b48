package netutil

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/egressd/egressd/internal/nettest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeClock is a pool's clock that a test moves by hand.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// budgetPool is a pool with the budget b, no refiller, and a clock of the
// test's.
func budgetPool(t *testing.T, m *fakeManager, b Budget, mod func(*PoolConfig)) (*Pool, *fakeClock) {
	t.Helper()
	clock := &fakeClock{now: time.Unix(1_000_000, 0)}
	p := newTestPool(t, m, func(c *PoolConfig) {
		c.Budget = b
		if mod != nil {
			mod(c)
		}
	})
	p.now = clock.Now
	p.budget = newBucket(b, clock.Now())
	return p, clock
}

func acquireN(t testing.TB, p *Pool, n int) []*Lease {
	t.Helper()
	var out []*Lease
	for range n {
		l, err := p.Acquire(context.Background())
		require.NoError(t, err)
		out = append(out, l)
	}
	return out
}

// TestBudgetFreshThenWarm: within the burst every lease gets a never-used
// address; past it, with no token, the warm address unused the longest, in
// the order they were released, each again only after every other; a token
// later, a never-used one again.
func TestBudgetFreshThenWarm(t *testing.T) {
	m := newFakeManager()
	p, clock := budgetPool(t, m, Budget{Rate: 5, Burst: 10, Window: time.Minute}, nil)

	first := acquireN(t, p, 10)
	seen := map[netip.Addr]bool{}
	for _, l := range first {
		assert.True(t, l.Fresh())
		assert.False(t, seen[l.Addr()], "%s handed out twice", l.Addr())
		seen[l.Addr()] = true
	}
	// Released in an order of their own: reuse follows it.
	order := []int{3, 0, 7, 1, 2, 4, 5, 6, 8, 9}
	for _, i := range order {
		first[i].Release()
	}
	assert.Equal(t, 10, p.Stats().Warm)
	assert.Equal(t, 10, m.count(), "warm addresses stay on the interface")

	adds := m.addCount()
	var again []netip.Addr
	for range 10 {
		l, err := p.Acquire(context.Background())
		require.NoError(t, err)
		assert.False(t, l.Fresh(), "no token: a warm address")
		again = append(again, l.Addr())
		l.Release() // back at the end of the line
	}
	var want []netip.Addr
	for _, i := range order {
		want = append(want, first[i].Addr())
	}
	assert.Equal(t, want, again, "least recently used first")
	again = again[:0]
	for range 10 {
		l, err := p.Acquire(context.Background())
		require.NoError(t, err)
		again = append(again, l.Addr())
		l.Release()
	}
	assert.Equal(t, want, again, "each again only after every other")
	assert.Equal(t, adds, m.addCount(), "reuse adds nothing to the interface")

	clock.Add(200 * time.Millisecond) // one token at 5/s
	l, err := p.Acquire(context.Background())
	require.NoError(t, err)
	assert.True(t, l.Fresh())
	assert.False(t, seen[l.Addr()])
	s := p.Stats()
	assert.Equal(t, uint64(11), s.Fresh)
	assert.Equal(t, uint64(20), s.Reused)
	require.NotNil(t, s.Budget)
	assert.Equal(t, BudgetStats{Rate: 5, MaxRate: 5, Burst: 10, Cap: 310, Window: time.Minute}, *s.Budget)
}

// TestBudgetSustainedRate: 5 leases a second for ten minutes, each held
// 100 ms, under the default budget: every one gets a never-used address,
// and the warm set stays within the window's worth.
func TestBudgetSustainedRate(t *testing.T) {
	m := newFakeManager()
	p, clock := budgetPool(t, m, DefaultBudget, nil)
	seen := map[netip.Addr]bool{}
	maxWarm := 0
	for i := range 10 * 60 * 5 {
		l, err := p.Acquire(context.Background())
		require.NoError(t, err)
		require.True(t, l.Fresh(), "lease %d", i)
		require.False(t, seen[l.Addr()], "lease %d: %s again", i, l.Addr())
		seen[l.Addr()] = true
		clock.Add(100 * time.Millisecond)
		l.Release()
		clock.Add(100 * time.Millisecond)
		p.removeDue()
		maxWarm = max(maxWarm, p.Stats().Warm)
	}
	assert.LessOrEqual(t, maxWarm, 5*60+1, "a minute's worth of warm addresses at most")
}

// TestBudgetWindow: a warm address unused for the window is removed from the
// interface, and makes room under the cap for a never-used one.
func TestBudgetWindow(t *testing.T) {
	m := newFakeManager()
	// Cap 2 + 0.05 x 10 = 2.
	p, clock := budgetPool(t, m, Budget{Rate: 0.05, Burst: 2, Window: 10 * time.Second}, nil)
	ls := acquireN(t, p, 2)
	ls[0].Release()
	clock.Add(5 * time.Second)
	ls[1].Release()

	clock.Add(5*time.Second - time.Millisecond)
	assert.Equal(t, time.Millisecond, p.removeDue(), "the first is due in a millisecond")
	assert.True(t, m.has(ls[0].Addr()))
	clock.Add(time.Millisecond)
	assert.Equal(t, 5*time.Second, p.removeDue(), "the second is due five seconds after the first")
	assert.False(t, m.has(ls[0].Addr()), "unused for the window: removed")
	assert.True(t, m.has(ls[1].Addr()))
	assert.Equal(t, 1, p.Stats().Warm)

	// A reuse renews the window.
	l, err := p.Acquire(context.Background())
	require.NoError(t, err)
	assert.Equal(t, ls[1].Addr(), l.Addr(), "no token yet (0.05/s): the warm one")
	clock.Add(4 * time.Second)
	l.Release()
	clock.Add(9 * time.Second)
	p.removeDue()
	assert.True(t, m.has(l.Addr()), "used 9 s ago: still warm")
	clock.Add(time.Second)
	p.removeDue()
	assert.False(t, m.has(l.Addr()))
	assert.Zero(t, p.Stats().Live)
}

// TestBudgetCap: with the cap's worth of addresses in use, a lease waits
// even with a token saved up, fails with a reason when its context ends,
// and takes the first address released.
func TestBudgetCap(t *testing.T) {
	m := newFakeManager()
	// Cap 2 + 1 x 2 = 4.
	p, clock := budgetPool(t, m, Budget{Rate: 1, Burst: 2, Window: 2 * time.Second}, nil)
	var held []*Lease
	for range 4 {
		clock.Add(time.Second)
		held = append(held, acquireN(t, p, 1)...)
	}
	clock.Add(time.Minute) // the bucket is full again
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := p.Acquire(ctx)
	require.ErrorIs(t, err, ErrNoAddress)
	assert.EqualError(t, err, "no fresh egress address: all 4 addresses the neighbour budget allows within 2s are in use (-new-addrs, -neigh-window)")
	var u *Unavailable
	require.ErrorAs(t, err, &u)

	got := make(chan *Lease)
	go func() {
		l, err := p.Acquire(context.Background())
		assert.NoError(t, err)
		got <- l
	}()
	time.Sleep(20 * time.Millisecond) // let it wait; nothing may come
	select {
	case l := <-got:
		t.Fatalf("a lease past the cap: %s", l.Addr())
	default:
	}
	held[2].Release()
	l := <-got
	assert.Equal(t, held[2].Addr(), l.Addr(), "the address released, reused")
	assert.False(t, l.Fresh())
}

// TestBudgetWaitsForToken: with every warm address in use and room under
// the cap, a lease waits for the next token and then gets a never-used
// address.
func TestBudgetWaitsForToken(t *testing.T) {
	m := newFakeManager()
	p, clock := budgetPool(t, m, Budget{Rate: 20, Burst: 1, Window: time.Minute}, nil)
	first := acquireN(t, p, 1)
	got := make(chan *Lease)
	go func() {
		l, err := p.Acquire(context.Background())
		assert.NoError(t, err)
		got <- l
	}()
	time.Sleep(20 * time.Millisecond)
	clock.Add(50 * time.Millisecond) // the token is due; the waiter's timer fires after 50 ms
	l := <-got
	assert.True(t, l.Fresh())
	assert.NotEqual(t, first[0].Addr(), l.Addr())
}

// TestBudgetMaxAddrs: -max-addrs still bounds the live addresses: a
// never-used address takes the place of the warm one unused the longest.
func TestBudgetMaxAddrs(t *testing.T) {
	m := newFakeManager()
	p, _ := budgetPool(t, m, Budget{Rate: 5, Burst: 10, Window: time.Minute}, func(c *PoolConfig) { c.Max = 3 })
	ls := acquireN(t, p, 3)
	for _, l := range ls {
		l.Release()
	}
	l := acquireN(t, p, 1)[0]
	assert.True(t, l.Fresh(), "a token is left: a never-used address")
	assert.False(t, m.has(ls[0].Addr()), "the warm address unused the longest made room")
	assert.Equal(t, 3, m.count())
	assert.Equal(t, 2, p.Stats().Warm)
}

// TestBudgetAdapt: an overflow halves the rate and drops the saved tokens,
// once for overflows close together; the rate rises by a quarter every 30 s
// without one, back to the rate set, and never falls below a 32nd of it. The
// warning is logged once a minute at most, naming the cause and the flag.
func TestBudgetAdapt(t *testing.T) {
	m := newFakeManager()
	var logs nettest.LogBuffer
	p, clock := budgetPool(t, m, Budget{Rate: 8, Burst: 10, Window: time.Minute}, func(c *PoolConfig) { c.Logger = logs.Logger() })
	rate := func() float64 { return p.Stats().Budget.Rate }
	capNow := func() int { return p.Stats().Budget.Cap }
	require.Equal(t, 10+8*60, capNow())

	p.overflowed()
	p.overflowed() // the same overflow
	assert.Equal(t, 4.0, rate())
	assert.Equal(t, 10+4*60, capNow(), "the cap follows the rate")
	assert.Equal(t, uint64(2), p.Stats().Overflows)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err := p.Acquire(ctx)
	assert.EqualError(t, err, "no fresh egress address: no new address allowed yet, and every warm one is in use (-new-addrs)",
		"the tokens saved up are gone")
	clock.Add(250 * time.Millisecond)
	assert.True(t, acquireN(t, p, 1)[0].Fresh(), "a token at 4/s")
	assert.Equal(t, 1, logs.Count("the router's neighbour table is likely full"), logs.String())
	assert.Equal(t, 1, logs.Count("-new-addrs"))

	clock.Add(adaptHold)
	p.overflowed()
	assert.Equal(t, 2.0, rate())
	assert.Equal(t, 1, logs.Count("the router's neighbour table is likely full"), "once a minute at most")
	for range 10 {
		clock.Add(adaptHold)
		p.overflowed()
	}
	assert.Equal(t, 8.0/32, rate(), "the floor")

	clock.Add(overflowWarnEvery)
	assert.Equal(t, 8.0/32*1.25*1.25, rate(), "raised twice in the minute since the last overflow")
	p.overflowed()
	assert.Equal(t, 2, logs.Count("the router's neighbour table is likely full"), "a minute later, again")

	clock.Add(time.Hour)
	assert.Equal(t, 8.0, rate(), "back to the rate set, no higher")
	assert.Equal(t, 10+8*60, capNow())
}

// TestBucketAdapt checks the bucket's arithmetic: tokens accrue at the rate
// in force, a cut empties them, and a raise takes effect from its time on.
func TestBucketAdapt(t *testing.T) {
	t0 := time.Unix(0, 0)
	b := newBucket(Budget{Rate: 4, Burst: 4, Window: time.Minute}, t0)
	for range 4 {
		assert.True(t, b.take(t0))
	}
	assert.False(t, b.take(t0))
	assert.Equal(t, 250*time.Millisecond, b.untilToken(t0))
	assert.True(t, b.cut(t0))
	assert.Equal(t, 500*time.Millisecond, b.untilToken(t0), "2/s now, and the tokens dropped")
	assert.False(t, b.cut(t0.Add(time.Second)), "within adaptHold")
	assert.Equal(t, 2.0, b.stats(t0.Add(time.Second)).Rate)
	// At 30 s the rate rises to 2.5/s; 30 s at 2/s filled the burst.
	assert.Equal(t, 2.5, b.stats(t0.Add(30*time.Second)).Rate)
	for range 4 {
		assert.True(t, b.take(t0.Add(30*time.Second)))
	}
	assert.Equal(t, 400*time.Millisecond, b.untilToken(t0.Add(30*time.Second)))
}

func BenchmarkPoolAcquireWarm(b *testing.B) {
	// Past the budget: taking the warm address unused the longest and
	// giving it back, with a fake kernel. No token is ever due (the
	// clock stands still), so every lease is a reuse.
	m := newFakeManager()
	now := time.Unix(1_000_000, 0)
	p, err := NewPool(PoolConfig{
		Prefix:  netip.MustParsePrefix("2001:db8:1:2::/64"),
		Manager: m,
		Logger:  quiet,
		Ready:   -1,
		Budget:  Budget{Rate: 1, Burst: 100, Window: time.Minute},
	})
	require.NoError(b, err)
	p.now = func() time.Time { return now }
	p.budget = newBucket(p.cfg.Budget, now)
	ctx := context.Background()
	for _, l := range acquireN(b, p, 100) {
		l.Release() // the warm set
	}
	b.ReportAllocs()
	for b.Loop() {
		l, err := p.Acquire(ctx)
		if err != nil {
			b.Fatal(err)
		}
		l.Release()
	}
}
