package netutil

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func prefixes(list ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(list))
	for i, s := range list {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

// slash64 is the /64 of a.
func slash64(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, 64).Masked() }

func TestSpreadSplitsIntoSlash64s(t *testing.T) {
	tests := []struct {
		name     string
		prefixes []string
		want     int // distinct /64s
		inside   func(netip.Prefix) bool
	}{
		{"a /56 is its 256 /64s", []string{"2001:db8:0:100::/56"}, 256, nil},
		{"a /63 is two", []string{"2001:db8:0:2::/63"}, 2, nil},
		{"two /64s", []string{"2001:db8:0:1::/64", "2001:db8:0:7::/64"}, 2, nil},
		{"a /60 and a /64", []string{"2001:db8:0:10::/60", "2001:db8:0:99::/64"}, 17, nil},
		{"two /80s in one /64 are one", []string{"2001:db8:0:1:1::/80", "2001:db8:0:1:2::/80", "2001:db8:0:2::/64"}, 2, nil},
		{"a /64 alone", []string{"2001:db8:0:1::/64"}, 1, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ps := prefixes(tt.prefixes...)
			s, err := NewSpread(ps)
			require.NoError(t, err)
			assert.EqualValues(t, tt.want-1, s.Len64())
			counts := map[netip.Prefix]int{}
			for range 4 * tt.want {
				from := s.Next(netip.Addr{})
				a := RandomAddr(from)
				in := false
				for _, p := range ps {
					in = in || p.Contains(a)
				}
				require.True(t, in, "%s (drawn from %s) outside %v", a, from, ps)
				if from.Bits() <= 64 {
					assert.Equal(t, 64, from.Bits(), "a prefix of /64 or shorter is dealt as /64s")
				}
				counts[slash64(a)]++
			}
			// Four full cycles: every /64 exactly four times.
			assert.Len(t, counts, tt.want)
			for p, n := range counts {
				assert.Equal(t, 4, n, "%s", p)
			}
		})
	}
}

func TestSpreadConsecutiveDiffer(t *testing.T) {
	for _, list := range [][]string{
		{"2001:db8:0:100::/56"},
		{"2001:db8:1:2::/64", "2001:db8:5:5::/64"},
		{"2001:db8::/63"},
		{"2001:db8:7::/48"},
	} {
		s, err := NewSpread(prefixes(list...))
		require.NoError(t, err)
		var prev netip.Prefix
		for i := range 5000 {
			p := slash64(s.Next(netip.Addr{}).Addr())
			require.NotEqual(t, prev, p, "%v: draw %d repeats the /64 of the one before", list, i)
			prev = p
		}
	}
}

func TestSpreadAvoids(t *testing.T) {
	// The caller's last address (a warm one reused, say) is avoided even
	// when it is the /64 the cycle deals next; that /64 keeps its turn.
	s, err := NewSpread(prefixes("2001:db8:1:2::/64", "2001:db8:5:5::/64", "2001:db8:9:9::/64"))
	require.NoError(t, err)
	counts := map[netip.Prefix]int{}
	avoid := netip.MustParseAddr("2001:db8:5:5::1")
	for i := range 3000 {
		p := s.Next(avoid)
		require.NotEqual(t, slash64(avoid), p, "draw %d", i)
		counts[p]++
		avoid = RandomAddr(p)
		if i%7 == 0 { // now and then the lease before was another
			avoid = netip.MustParseAddr("2001:db8:5:5::1")
		}
	}
	for p, n := range counts {
		assert.InDelta(t, 1000, n, 20, "%s", p)
	}
}

// TestSpreadEvenOverSlash48: a /48's 65,536 /64s, dealt without keeping
// anything per /64: after one cycle each was dealt once, and at any point
// of the next no /64 is two ahead of another.
func TestSpreadEvenOverSlash48(t *testing.T) {
	s, err := NewSpread(prefixes("2001:db8:7::/48"))
	require.NoError(t, err)
	const n = 1 << 16
	counts := make(map[netip.Prefix]int, n)
	for range n {
		counts[s.Next(netip.Addr{})]++
	}
	require.Len(t, counts, n, "one cycle covers every /64")
	for range n / 2 {
		counts[s.Next(netip.Addr{})]++
	}
	lo, hi := n, 0
	for _, c := range counts {
		lo, hi = min(lo, c), max(hi, c)
	}
	assert.Equal(t, 1, lo)
	assert.Equal(t, 2, hi)
}

func TestSpreadRefuses(t *testing.T) {
	for _, tt := range []struct {
		name string
		list []string
		want string
	}{
		{"none", nil, "no prefix"},
		{"overlap", []string{"2001:db8:0:100::/56", "2001:db8:0:101::/64"}, "overlaps"},
		{"twice", []string{"2001:db8:1:2::/64", "2001:db8:1:2::/64"}, "overlaps"},
		{"nothing to draw", []string{"2001:db8::1/128"}, "no address to draw"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewSpread(prefixes(tt.list...))
			assert.ErrorContains(t, err, tt.want)
		})
	}
}

// TestSpreadWholeSpace: ::/0 holds 2^64 /64s, one more than a uint64 counts.
func TestSpreadWholeSpace(t *testing.T) {
	s, err := NewSpread(prefixes("::/0"))
	require.NoError(t, err)
	assert.Equal(t, ^uint64(0), s.Len64())
	seen := map[netip.Prefix]bool{}
	for range 1000 {
		p := s.Next(netip.Addr{})
		assert.Equal(t, 64, p.Bits())
		seen[p] = true
	}
	assert.Len(t, seen, 1000)
}

// TestPoolSpreadsLeases: the pool's leases, never-used ones made on
// demand or kept ready, each on another /64 than the one before.
func TestPoolSpreadsLeases(t *testing.T) {
	for _, ready := range []int{-1, 8} {
		m := newFakeManager()
		p := newTestPool(t, m, func(c *PoolConfig) {
			c.Prefix = netip.Prefix{}
			c.Prefixes = prefixes("2001:db8:1:2::/64", "2001:db8:0:100::/62")
			c.Ready = ready
		})
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go p.Run(ctx)
		var prev netip.Prefix
		counts := map[netip.Prefix]int{}
		for i := range 100 {
			l, err := p.Acquire(ctx)
			require.NoError(t, err, "ready %d: lease %d", ready, i)
			got := slash64(l.Addr())
			require.NotEqual(t, prev, got, "ready %d: lease %d on the /64 of the one before", ready, i)
			prev = got
			counts[got]++
			l.Release()
		}
		assert.Len(t, counts, 5, "ready %d", ready)
	}
}

// TestPoolReadyAvoidsLastSlash64: when the ready address next in line is on
// the /64 of the lease before (a warm one, say), another ready one is taken.
func TestPoolReadyAvoidsLastSlash64(t *testing.T) {
	m := newFakeManager()
	p := newTestPool(t, m, func(c *PoolConfig) {
		c.Prefix = netip.Prefix{}
		c.Prefixes = prefixes("2001:db8:1:2::/64", "2001:db8:5:5::/64")
		c.Ready = 4
	})
	require.NoError(t, p.fill(context.Background()))
	p.mu.Lock()
	require.Len(t, p.ready, 4)
	p.last = p.ready[0]
	first := p.ready[0]
	p.mu.Unlock()
	l, err := p.Acquire(context.Background())
	require.NoError(t, err)
	defer l.Release()
	assert.NotEqual(t, slash64(first), slash64(l.Addr()))
}

// TestPoolWarmAvoidsLastSlash64: past the budget warm addresses are reused
// unused-longest first, but never on the /64 of the lease before while
// another /64 is warm: here they are released sorted by /64, so that the
// least recently used order alone would repeat /64s.
func TestPoolWarmAvoidsLastSlash64(t *testing.T) {
	m := newFakeManager()
	p := newTestPool(t, m, func(c *PoolConfig) {
		c.Prefix = netip.Prefix{}
		c.Prefixes = prefixes("2001:db8:1:2::/64", "2001:db8:0:100::/62")
		c.Budget = Budget{Rate: 0.001, Burst: 8, Window: time.Hour}
	})
	ctx := context.Background()
	var held []*Lease
	for range 8 {
		l, err := p.Acquire(ctx)
		require.NoError(t, err)
		held = append(held, l)
	}
	slices.SortFunc(held, func(a, b *Lease) int { return a.Addr().Compare(b.Addr()) })
	for _, l := range held {
		l.Release()
	}
	var prev netip.Prefix
	for i := range 40 {
		l, err := p.Acquire(ctx)
		require.NoError(t, err)
		got := slash64(l.Addr())
		require.NotEqual(t, prev, got, "lease %d on the /64 of the one before", i)
		prev = got
		l.Release()
	}
	st := p.Stats()
	assert.EqualValues(t, 8, st.Fresh)
	assert.EqualValues(t, 40, st.Reused)
}

// TestPoolAvoidingSubnetOf: a lease whose ctx names an address (a session
// rotating away from it) is on another /64 than that address, not only
// than the lease before; ready, made on demand and warm alike.
func TestPoolAvoidingSubnetOf(t *testing.T) {
	two := prefixes("2001:db8:1:2::/64", "2001:db8:5:5::/64")
	for _, tt := range []struct {
		name string
		cfg  func(*PoolConfig)
	}{
		{"on demand", func(c *PoolConfig) { c.Ready = -1 }},
		{"ready", func(c *PoolConfig) { c.Ready = 4 }},
		{"warm", func(c *PoolConfig) { c.Budget = Budget{Rate: 0.001, Burst: 4, Window: time.Hour} }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := newTestPool(t, newFakeManager(), func(c *PoolConfig) {
				c.Prefix = netip.Prefix{}
				c.Prefixes = two
				tt.cfg(c)
			})
			ctx := context.Background()
			if tt.name == "ready" {
				require.NoError(t, p.fill(ctx))
			}
			if tt.name == "warm" { // spend the budget: every later lease is a warm one
				var held []*Lease
				for range 4 {
					l, err := p.Acquire(ctx)
					require.NoError(t, err)
					held = append(held, l)
				}
				for _, l := range held {
					l.Release()
				}
			}
			for i := range 20 {
				// A session holds old; another lease comes between, so
				// that by default the next lease would avoid its /64 and
				// land on old's. Rotating away from old asks otherwise.
				old, err := p.Acquire(ctx)
				require.NoError(t, err)
				between, err := p.Acquire(ctx)
				require.NoError(t, err)
				between.Release()
				l, err := p.Acquire(AvoidingSubnetOf(ctx, old.Addr()))
				require.NoError(t, err)
				assert.NotEqual(t, slash64(old.Addr()), slash64(l.Addr()), "lease %d", i)
				old.Release()
				l.Release()
			}
		})
	}
}
