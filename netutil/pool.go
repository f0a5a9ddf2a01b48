package netutil

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// AddrManager adds and removes egress addresses on the kernel's side. It is
// implemented by kernel.Netlink, by NoAddrs in routed mode, and by a fake in
// unit tests.
type AddrManager interface {
	// Add puts a on the interface as a deprecated /128 that the kernel
	// deletes by itself after lifetime unless refreshed. When a is already
	// on the interface, Add fails with an error wrapping fs.ErrExist and
	// leaves it alone: it is somebody else's.
	Add(a netip.Addr, lifetime time.Duration) error
	// Refresh resets the valid lifetime of an address that Add put there.
	Refresh(a netip.Addr, lifetime time.Duration) error
	// Remove deletes an address that Add put there. An address that is
	// already gone (it expired) is not an error.
	Remove(a netip.Addr) error
}

// NoAddrs is the AddrManager of routed mode: the prefix is routed to the
// host and a local route makes every address of it the host's own, so there
// is nothing to add or remove. The pool still hands out each address to one
// connection at a time and bounds how many are in use.
type NoAddrs struct{}

var _ AddrManager = NoAddrs{}

// Add implements AddrManager; it does nothing.
func (NoAddrs) Add(netip.Addr, time.Duration) error { return nil }

// Refresh implements AddrManager; it does nothing.
func (NoAddrs) Refresh(netip.Addr, time.Duration) error { return nil }

// Remove implements AddrManager; it does nothing.
func (NoAddrs) Remove(netip.Addr) error { return nil }

// Defaults of PoolConfig.
const (
	// DefaultMaxAddrs bounds the live egress addresses. The kernel's cost of
	// adding or deleting one grows with the addresses already on the
	// interface, by about 1.25 µs each (bench/results/core.md: 0.74 ms with
	// 512, 1.4 ms with 1,024, 2.6 ms with 2,048); the shared notes' table
	// puts 1,000 to 2,000 at 0.76 ms. At 1,024 an add stays near a
	// millisecond, and a builder farm holding a thousand upstream
	// connections open at once is far past what it needs.
	DefaultMaxAddrs = 1024
	// DefaultReady is how many addresses the refiller keeps added and unused,
	// so that requests do not wait for netlink.
	DefaultReady = 8
	// DefaultLifetime is the valid lifetime given to every address. Addresses
	// in use are refreshed long before it ends; if egressd dies, the kernel
	// removes what it left behind after at most this long.
	DefaultLifetime = 10 * time.Minute
	// DefaultLinger is how long a released address stays on the interface
	// without a Budget, so that the peer's last ACK and FIN still reach the
	// closed socket instead of leaving the upstream retransmitting into the
	// void. A warm address is removed at once when the pool needs its place.
	DefaultLinger = time.Second
)

// PoolConfig configures a Pool. Zero values take the defaults above.
type PoolConfig struct {
	// Prefixes are where addresses are drawn from, spread evenly over
	// their /64s (see Spread). Required (or Prefix): IPv6, each with at
	// least one host bit, none overlapping another.
	Prefixes []netip.Prefix
	// Prefix is a pool of one prefix: the same as Prefixes holding it
	// alone. Give one of the two.
	Prefix netip.Prefix
	// Exclude lists addresses never to draw: those on the interface when
	// egressd starts, and the pinned ones.
	Exclude []netip.Addr
	// Max bounds the addresses the pool has on the interface at once, in
	// every state (ready, in use, warm).
	Max int
	// Ready is how many unused addresses the refiller keeps added. Zero
	// means DefaultReady; a negative value turns the refiller off.
	Ready int
	// Lifetime is the valid lifetime of every address.
	Lifetime time.Duration
	// Linger is how long a released address stays warm before it is
	// removed when there is no Budget. Zero means DefaultLinger; a negative
	// value removes at once.
	Linger time.Duration
	// Budget bounds the never-used addresses handed out, for the router's
	// sake (see Budget); past it connections reuse warm addresses, which
	// then stay for Budget.Window instead of Linger. The zero Budget is
	// none: every lease gets a never-used address.
	Budget Budget
	// Manager does the kernel work. Required.
	Manager AddrManager
	// Logger gets warnings; slog.Default() when nil.
	Logger *slog.Logger
	// ObserveAdd, if set, is called with the duration of every successful
	// add, for latency statistics. It must not block.
	ObserveAdd func(time.Duration)
}

func (c *PoolConfig) setDefaults() {
	if c.Max == 0 {
		c.Max = DefaultMaxAddrs
	}
	c.Ready = defaultOrOff(c.Ready, DefaultReady)
	if c.Ready > c.Max {
		c.Ready = c.Max
	}
	if c.Lifetime == 0 {
		c.Lifetime = DefaultLifetime
	}
	c.Linger = defaultOrOff(c.Linger, DefaultLinger)
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// defaultOrOff maps a setting where zero means the default and a negative
// value means off to the value in force.
func defaultOrOff[T int | time.Duration](v, def T) T {
	switch {
	case v == 0:
		return def
	case v < 0:
		return 0
	}
	return v
}

// prefixes are the prefixes the pool draws from.
func (c *PoolConfig) prefixes() []netip.Prefix {
	if len(c.Prefixes) > 0 {
		return c.Prefixes
	}
	return []netip.Prefix{c.Prefix}
}

func (c *PoolConfig) validate() error {
	if len(c.Prefixes) > 0 && c.Prefix.IsValid() {
		return fmt.Errorf("prefix %s given besides prefixes %v: give one or the other", c.Prefix, c.Prefixes)
	}
	for _, p := range c.prefixes() {
		switch {
		case !p.IsValid() || !p.Addr().Is6() || p.Addr().Is4In6():
			return fmt.Errorf("prefix %s is not an IPv6 prefix", p)
		case !HasDrawable(p):
			return fmt.Errorf("prefix %s has no address to draw", p)
		}
	}
	switch {
	case c.Max < 1:
		return fmt.Errorf("max addresses %d: must be at least 1", c.Max)
	case c.Lifetime < 4*time.Second:
		return fmt.Errorf("address lifetime %s: must be at least 4s", c.Lifetime)
	case c.Manager == nil:
		return errors.New("no address manager")
	}
	return c.Budget.validate()
}

// AddrState says what an address of the pool is doing.
type AddrState uint8

const (
	// StateAdding: the kernel is being asked to add it.
	StateAdding AddrState = iota
	// StateReady: added, waiting for a connection.
	StateReady
	// StateInUse: leased to a connection.
	StateInUse
	// StateWarm: used, and released; it stays on the interface, reusable
	// past the Budget, until it has been unused for the window (or Linger).
	StateWarm
	// StateRemoving: the kernel is being asked to remove it.
	StateRemoving
)

func (s AddrState) String() string {
	switch s {
	case StateAdding:
		return "adding"
	case StateReady:
		return "ready"
	case StateInUse:
		return "in-use"
	case StateWarm:
		return "warm"
	case StateRemoving:
		return "removing"
	}
	return fmt.Sprintf("AddrState(%d)", uint8(s))
}

// maxDraws bounds the attempts to find an address that is neither live nor
// excluded; in a /64 the first draw all but always succeeds.
const maxDraws = 128

type entry struct {
	state     AddrState
	since     time.Time // when it entered its state
	added     time.Time // when the kernel had added it
	refreshed time.Time // when its valid lifetime was last set
	lease     *Lease    // its holder, while in use
}

// PoolStats is a snapshot of a pool's counters.
type PoolStats struct {
	Live  int // on the interface, in any state
	Ready int
	InUse int
	Warm  int

	// Fresh counts leases of never-used addresses, Reused those of warm
	// ones, handed out past the Budget.
	Fresh  uint64
	Reused uint64
	// Retries counts connections from a never-used address that got no
	// answer within FirstTry and were tried again from a warm one;
	// Overflows those of them that got an answer then, each taken as the
	// router's neighbour table overflowing (the rate was lowered).
	Retries   uint64
	Overflows uint64
	// Budget is the budget in force; nil without one.
	Budget *BudgetStats

	Added          uint64
	Removed        uint64
	AddFailures    uint64
	RemoveFailures uint64
	// Lost counts addresses that left the interface without the pool
	// removing them (somebody deleted them, or the kernel flushed them
	// when the interface went down).
	Lost uint64
	// AddTime is the total time spent in successful adds; divide by Added
	// for the mean latency of an add.
	AddTime time.Duration

	// Subnets counts the upstream connections per /64, in address order,
	// for at most DefaultMaxSubnets /64s (see subnetTable); OtherSubnets
	// those of the /64s past that bound.
	Subnets      []SubnetStats
	OtherSubnets SubnetStats
}

// Pool hands out egress addresses, one connection at a time. It adds them to
// the interface on demand through its AddrManager, keeps a few ready, never
// hands out an address that is live elsewhere or excluded, bounds how many
// exist at once, and removes each one shortly after its connection closes.
//
// Acquire works on its own; Run adds the background work (keeping addresses
// ready, removing released ones, refreshing lifetimes), and Close removes
// everything the pool added.
type Pool struct {
	cfg  PoolConfig
	mgr  AddrManager
	log  *slog.Logger
	now  func() time.Time
	wake chan struct{}

	mu       sync.Mutex
	spread   *Spread    // which /64 the next never-used address comes from
	last     netip.Addr // the address leased last: the next lease avoids its /64
	live     map[netip.Addr]*entry
	exclude  map[netip.Addr]struct{}
	ready    []netip.Addr // oldest first
	warm     []netip.Addr // in release order: the least recently used first
	keep     time.Duration
	budget   *bucket       // nil without a Budget
	claims   int           // leases of never-used addresses being added
	avail    chan struct{} // closed, and replaced, when an Acquire waiting for the budget may go on
	warnedAt time.Time     // of the last overflow warning
	inflight sync.WaitGroup
	count    [StateRemoving + 1]int // live addresses in each state
	closed   bool
	faults   []fault // why the pool is suspended, in the order they began
	failing  bool    // the last add failed: a failure episode is under way
	failFrom uint64  // stats.AddFailures when it began
	stats    PoolStats

	subnets *subnetTable // connections per /64
}

// fault is a condition outside the pool under which no address may be
// handed out: the uplink is down, routed mode's local route is missing.
type fault struct {
	key string
	err error
}

// NewPool returns a pool drawing from cfg.Prefixes (or cfg.Prefix).
func NewPool(cfg PoolConfig) (*Pool, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg.Prefixes = slices.Clone(cfg.prefixes())
	cfg.Prefix = netip.Prefix{}
	spread, err := NewSpread(cfg.Prefixes)
	if err != nil {
		return nil, err
	}
	p := &Pool{
		spread:  spread,
		subnets: newSubnetTable(DefaultMaxSubnets),
		cfg:     cfg,
		mgr:     cfg.Manager,
		log:     cfg.Logger,
		now:     time.Now,
		wake:    make(chan struct{}, 1),
		live:    make(map[netip.Addr]*entry),
		exclude: make(map[netip.Addr]struct{}, len(cfg.Exclude)),
		keep:    cfg.Linger,
		avail:   make(chan struct{}),
	}
	if !cfg.Budget.IsZero() {
		p.budget = newBucket(cfg.Budget, p.now())
		p.keep = cfg.Budget.Window
	}
	for _, a := range cfg.Exclude {
		p.exclude[a.Unmap()] = struct{}{}
	}
	return p, nil
}

// Prefixes returns the prefixes the pool draws from.
func (p *Pool) Prefixes() []netip.Prefix { return slices.Clone(p.cfg.Prefixes) }

// contains reports whether a lies in one of the pool's prefixes.
func (p *Pool) contains(a netip.Addr) bool {
	return slices.ContainsFunc(p.cfg.Prefixes, func(q netip.Prefix) bool { return q.Contains(a) })
}

// prefixList names the pool's prefixes for an error.
func (p *Pool) prefixList() string {
	parts := make([]string, len(p.cfg.Prefixes))
	for i, q := range p.cfg.Prefixes {
		parts[i] = q.String()
	}
	return strings.Join(parts, ", ")
}

// Lease is one address handed to one holder: a connection (Dialer.DialContext),
// or a holder such as a proxy session that binds many connections to it with
// Dialer.DialFrom. Release gives it back. If the address leaves the
// interface while leased, the connections bound to it are ended and no more
// can be made from it.
type Lease struct {
	pool *Pool
	addr netip.Addr
	once sync.Once

	mu      sync.Mutex
	conns   int                // connections DialFrom bound to it, open or being dialed
	own     *Conn              // DialContext's connection
	open    map[*Conn]struct{} // DialFrom's open connections
	done    bool               // Release was called
	lost    bool               // the address left the interface
	fresh   bool               // never used before, and no connection from it has been answered yet
	discard bool               // on release, remove the address rather than keep it warm
}

// Addr returns the leased address.
func (l *Lease) Addr() netip.Addr { return l.addr }

// Fresh reports whether the address was never used before this lease, and
// no connection from it has been answered yet.
func (l *Lease) Fresh() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.fresh
}

// answered records that a connection from l's address got an answer: the
// router knows the address.
func (l *Lease) answered() {
	l.mu.Lock()
	l.fresh = false
	l.mu.Unlock()
}

// unanswered marks l's address as one the router never answered for: on
// release it is removed instead of kept warm, where a later connection from
// it would wait out its whole timeout.
func (l *Lease) unanswered() {
	l.mu.Lock()
	l.discard = true
	l.mu.Unlock()
}

// Release ends the lease: the address stays warm for a while and is then
// removed (see Budget). Connections DialFrom bound to it keep it until the
// last of them closes. It is safe to call more than once.
func (l *Lease) Release() {
	l.mu.Lock()
	l.done = true
	last := l.conns == 0
	l.mu.Unlock()
	if last {
		l.once.Do(func() { l.pool.release(l) })
	}
}

var (
	errReleased = fmt.Errorf("%w: the held address was released", ErrNoAddress)
	errLost     = fmt.Errorf("%w: the address left the interface", ErrNoAddress)
)

// ref counts one more connection bound to l, unless l was released or its
// address is gone.
func (l *Lease) ref() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.lost:
		return errLost
	case l.done:
		return errReleased
	}
	l.conns++
	return nil
}

// unref counts one connection fewer (c, if it got as far as attach), and
// gives the address back if it was the last one and the holder released the
// lease.
func (l *Lease) unref(c *Conn) {
	l.mu.Lock()
	l.conns--
	delete(l.open, c)
	last := l.done && l.conns == 0
	l.mu.Unlock()
	if last {
		l.once.Do(func() { l.pool.release(l) })
	}
}

// attach records c, connected from l's address, so that it is ended if the
// address leaves the interface. It reports false, and records nothing, if
// that already happened.
func (l *Lease) attach(c *Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lost {
		return false
	}
	if c.shared {
		if l.open == nil {
			l.open = make(map[*Conn]struct{})
		}
		l.open[c] = struct{}{}
	} else {
		l.own = c
	}
	return true
}

// isLost reports whether l's address left the interface.
func (l *Lease) isLost() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lost
}

// lose marks l's address gone and ends the connections bound to it: the
// kernel keeps them open, but nothing sent to a deleted address reaches
// them any more, so they would hang until TCP gives up.
func (l *Lease) lose() {
	l.mu.Lock()
	l.lost = true
	conns := make([]*Conn, 0, len(l.open)+1)
	if l.own != nil {
		conns = append(conns, l.own)
	}
	for c := range l.open {
		conns = append(conns, c)
	}
	l.mu.Unlock()
	for _, c := range conns {
		c.abort()
	}
}

// vanished tells the pool that l's address is gone, found out by a failed
// bind (EADDRNOTAVAIL), before the watcher may have seen it.
func (l *Lease) vanished() {
	if !l.pool.lost(l.addr, l) {
		l.lose()
	}
}

// Acquire leases an address no other lease holds. Without a Budget it is
// always a never-used one: a ready one if there is one, otherwise one added
// now. With a Budget, a never-used one while the budget allows it, else the
// warm address unused the longest; when there is neither, Acquire waits for
// whichever comes first, until ctx is done. Errors wrap ErrNoAddress; while
// the pool is suspended (the uplink is down, say) it fails at once, saying
// why.
func (p *Pool) Acquire(ctx context.Context) (*Lease, error) {
	for {
		p.mu.Lock()
		if err := p.unusableLocked(); err != nil {
			p.mu.Unlock()
			return nil, err
		}
		now := p.now()
		if p.budget == nil || p.freshAllowedLocked(now) {
			return p.acquireFresh(ctx)
		}
		if l, ok := p.takeWarmLocked(ctx); ok {
			p.mu.Unlock()
			return l, nil
		}
		if err := p.waitLocked(ctx, now, true); err != nil {
			return nil, err
		}
	}
}

// acquireFresh leases a never-used address: a ready one, or one added now.
// It is called with p.mu held, and unlocks it.
func (p *Pool) acquireFresh(ctx context.Context) (*Lease, error) {
	l := &Lease{pool: p, fresh: true}
	if i := p.pickLocked(p.ready, p.avoidLocked(ctx)); i >= 0 {
		a := p.ready[i]
		p.ready = slices.Delete(p.ready, i, i+1)
		p.setStateLocked(a, StateInUse)
		p.live[a].lease, l.addr, p.last = l, a, a
		p.stats.Fresh++
		p.mu.Unlock()
		p.kick()
		return l, nil
	}
	p.claims++
	p.mu.Unlock()
	_, err := p.add(ctx, StateInUse, l)
	p.mu.Lock()
	p.claims--
	if err == nil {
		p.stats.Fresh++
	}
	p.mu.Unlock()
	p.kick()
	if err != nil {
		return nil, err
	}
	return l, nil
}

// freshAllowedLocked reports whether the budget lets a never-used address
// be handed out now, and takes its token if so: fewer distinct addresses
// than the cap were used within the window, and the bucket has a token.
func (p *Pool) freshAllowedLocked(now time.Time) bool {
	p.budget.advance(now)
	return p.distinctLocked() < p.budget.cap() && p.budget.take(now)
}

// distinctLocked counts the addresses the router is taken to know: in use,
// warm, and being added for a lease.
func (p *Pool) distinctLocked() int {
	return p.count[StateInUse] + p.count[StateWarm] + p.claims
}

// takeWarmLocked leases the warm address unused the longest, if there is
// one.
func (p *Pool) takeWarmLocked(ctx context.Context) (*Lease, bool) {
	if len(p.warm) == 0 {
		return nil, false
	}
	// When every warm address is on the last /64, past the budget, it is
	// reused all the same.
	i := max(p.pickLocked(p.warm, p.avoidLocked(ctx)), 0)
	a := p.warm[i]
	p.warm = slices.Delete(p.warm, i, i+1)
	l := &Lease{pool: p, addr: a}
	p.setStateLocked(a, StateInUse)
	p.live[a].lease, p.last = l, a
	p.stats.Reused++
	return l, true
}

// pickLocked returns the index of the first of addrs (ready ones, oldest
// first, or warm ones, unused the longest first) that is not on the /64 of
// avoid, or -1 if there is none. With one /64 only, the first will do.
func (p *Pool) pickLocked(addrs []netip.Addr, avoid netip.Addr) int {
	if p.spread.Len64() == 0 || !avoid.IsValid() {
		return min(0, len(addrs)-1)
	}
	last := upper64(avoid)
	return slices.IndexFunc(addrs, func(a netip.Addr) bool { return upper64(a) != last })
}

type avoidKey struct{}

// AvoidingSubnetOf returns a copy of ctx that asks Acquire (and
// Dialer.Hold) for an address on another /64 than a's, where the pool has
// several: a session that rotates away from a leaves its /64 too. Without
// it, a lease avoids the /64 of the address leased before it.
func AvoidingSubnetOf(ctx context.Context, a netip.Addr) context.Context {
	return context.WithValue(ctx, avoidKey{}, a)
}

// avoidLocked is the address whose /64 a lease for ctx avoids.
func (p *Pool) avoidLocked(ctx context.Context) netip.Addr {
	if a, ok := ctx.Value(avoidKey{}).(netip.Addr); ok && a.IsValid() {
		return a
	}
	return p.last
}

// waitLocked waits, with p.mu held (it unlocks it), until an address may be
// handed out again: one is released or leaves the warm set, the pool's
// state changes, or (with token set, while the cap leaves room) the next
// token is due. When ctx is done first it returns why nothing could be had.
func (p *Pool) waitLocked(ctx context.Context, now time.Time, token bool) error {
	var timer <-chan time.Time
	if token && p.distinctLocked() < p.budget.cap() {
		t := time.NewTimer(p.budget.untilToken(now))
		defer t.Stop()
		timer = t.C
	}
	avail := p.avail
	p.mu.Unlock()
	select {
	case <-avail:
	case <-timer:
	case <-ctx.Done():
		p.mu.Lock()
		defer p.mu.Unlock()
		if c := p.budget.cap(); p.distinctLocked() >= c {
			return unavailable("all %d addresses the neighbour budget allows within %s are in use (-new-addrs, -neigh-window)", c, p.cfg.Budget.Window)
		}
		return unavailable("no new address allowed yet, and every warm one is in use (-new-addrs)")
	}
	return nil
}

// signalLocked wakes every Acquire waiting for the budget, to look again.
func (p *Pool) signalLocked() {
	close(p.avail)
	p.avail = make(chan struct{})
}

// acquireWarm leases the warm address unused the longest, waiting for one
// until ctx is done: the retry of a connection whose never-used address got
// no answer.
func (p *Pool) acquireWarm(ctx context.Context) (*Lease, error) {
	for {
		p.mu.Lock()
		if err := p.unusableLocked(); err != nil {
			p.mu.Unlock()
			return nil, err
		}
		if l, ok := p.takeWarmLocked(ctx); ok {
			p.mu.Unlock()
			return l, nil
		}
		if p.budget == nil {
			p.mu.Unlock()
			return nil, unavailable("no warm address to retry from")
		}
		if err := p.waitLocked(ctx, p.now(), false); err != nil {
			return nil, err
		}
	}
}

// warmFree reports whether a warm address waits to be reused: a retry from
// one is possible.
func (p *Pool) warmFree() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.budget != nil && len(p.warm) > 0
}

// retried counts a connection from a never-used address tried again from a
// warm one.
func (p *Pool) retried() {
	p.mu.Lock()
	p.stats.Retries++
	p.mu.Unlock()
}

// overflowed records that a connection from a never-used address got no
// answer while the same connection from a warm address did: the router
// dropped the answer for lack of a neighbour entry. It counts it, lowers the
// rate (Budget), and logs it at most once per overflowWarnEvery.
func (p *Pool) overflowed() {
	p.mu.Lock()
	if p.budget == nil { // no warm address is compared without one
		p.mu.Unlock()
		return
	}
	now := p.now()
	p.stats.Overflows++
	cut := p.budget.cut(now)
	st := p.budget.stats(now)
	warn := p.warnedAt.IsZero() || now.Sub(p.warnedAt) >= overflowWarnEvery
	if warn {
		p.warnedAt = now
	}
	p.mu.Unlock()
	if warn {
		p.log.Warn("connections from new egress addresses get no answer while reused ones do: the router's neighbour table is likely full "+
			"(Linux routers keep 1,024 entries by default); handing out fewer new addresses for a while (lower -new-addrs to keep it so)",
			"new_addrs_per_second", st.Rate, "set_per_second", st.MaxRate, "cut", cut)
	}
}

// unusableLocked says why the pool hands out nothing now, or nil.
func (p *Pool) unusableLocked() error {
	switch {
	case p.closed:
		return unavailable("shutting down")
	case len(p.faults) > 0:
		return fmt.Errorf("%w: %w", ErrNoAddress, &Unavailable{Reason: p.faults[0].err.Error()})
	}
	return nil
}

// Usable returns nil if the pool hands out addresses now, and otherwise why
// not, wrapping ErrNoAddress.
func (p *Pool) Usable() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.unusableLocked()
}

// Suspend stops the pool handing out addresses because of a fault outside
// it, named key ("uplink", "route"): Acquire fails at once with an error
// wrapping ErrNoAddress and err, and the refiller waits. Addresses in use
// are left alone. It reports whether key is a new fault; a known one gets
// its error updated. err's text is told to clients: it must not name an
// egress address.
func (p *Pool) Suspend(key string, err error) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if i := slices.IndexFunc(p.faults, func(f fault) bool { return f.key == key }); i >= 0 {
		p.faults[i].err = err
		return false
	}
	p.faults = append(p.faults, fault{key, err})
	p.signalLocked() // Acquires waiting for the budget fail at once
	return true
}

// Resume ends the fault key; the pool works again, by itself, once no fault
// is left. It reports whether key was a fault.
func (p *Pool) Resume(key string) bool {
	p.mu.Lock()
	n := len(p.faults)
	p.faults = slices.DeleteFunc(p.faults, func(f fault) bool { return f.key == key })
	was := len(p.faults) < n
	p.mu.Unlock()
	if was {
		p.kick()
	}
	return was
}

// newLocked records a as being added.
func (p *Pool) newLocked(a netip.Addr) {
	p.live[a] = &entry{state: StateAdding, since: p.now()}
	p.count[StateAdding]++
}

func (p *Pool) setStateLocked(a netip.Addr, s AddrState) {
	e := p.live[a]
	p.count[e.state]--
	p.count[s]++
	e.state = s
	e.since = p.now()
}

// forgetLocked drops a, which is no longer on the interface.
func (p *Pool) forgetLocked(a netip.Addr) {
	if e, ok := p.live[a]; ok {
		p.count[e.state]--
		delete(p.live, a)
	}
}

// add draws an address, adds it to the interface and records it in state to,
// held by l when that is StateInUse. At the limit it first removes the
// warm address unused the longest. A failure to add is counted, and
// logged once for each run of failures.
func (p *Pool) add(ctx context.Context, to AddrState, l *Lease) (netip.Addr, error) {
	for range maxDraws {
		if err := ctx.Err(); err != nil {
			return netip.Addr{}, err
		}
		p.mu.Lock()
		if err := p.unusableLocked(); err != nil {
			p.mu.Unlock()
			return netip.Addr{}, err
		}
		if len(p.live) >= p.cfg.Max {
			if len(p.warm) == 0 {
				p.mu.Unlock()
				return netip.Addr{}, unavailable("all %d addresses are in use (-max-addrs)", p.cfg.Max)
			}
			victim := p.warm[0]
			p.warm = p.warm[1:]
			p.removeLocked(victim)
			continue
		}
		// A lease's address avoids the /64 of the one leased before it
		// (or the one its ctx names); the refiller's follow the Spread,
		// whose consecutive /64s differ.
		var avoid netip.Addr
		if to == StateInUse {
			avoid = p.avoidLocked(ctx)
		}
		a, ok := p.drawLocked(avoid)
		if !ok {
			p.mu.Unlock()
			return netip.Addr{}, fmt.Errorf("%w: no unused address left in %s", ErrNoAddress, p.prefixList())
		}
		if to == StateInUse {
			p.last = a
		}
		p.newLocked(a)
		p.inflight.Add(1)
		p.mu.Unlock()

		start := p.now()
		err := p.mgr.Add(a, p.cfg.Lifetime)
		took := p.now().Sub(start)

		p.mu.Lock()
		if err != nil {
			p.forgetLocked(a)
			p.inflight.Done()
			if errors.Is(err, fs.ErrExist) {
				// Somebody else put it there since we started: it is not
				// ours to use or remove. Never draw it again.
				p.exclude[a] = struct{}{}
				p.mu.Unlock()
				continue
			}
			first := !p.failing
			if first {
				p.failing, p.failFrom = true, p.stats.AddFailures
			}
			p.stats.AddFailures++
			p.mu.Unlock()
			if first {
				p.log.Warn("adding egress addresses fails: new connections fail closed until it works again", "err", err)
			}
			return netip.Addr{}, fmt.Errorf("%w: %w", ErrNoAddress, err)
		}
		recovered, failures := p.failing, p.stats.AddFailures-p.failFrom
		p.failing = false
		p.stats.Added++
		p.stats.AddTime += took
		e := p.live[a]
		e.added, e.refreshed = start.Add(took), start
		if p.closed {
			// Close is waiting for this add; take the address back out.
			p.setStateLocked(a, StateRemoving)
			p.mu.Unlock()
			p.remove(a)
			return netip.Addr{}, unavailable("shutting down")
		}
		p.setStateLocked(a, to)
		switch to {
		case StateReady:
			p.ready = append(p.ready, a)
		case StateInUse:
			e.lease, l.addr = l, a
		}
		p.inflight.Done()
		p.mu.Unlock()
		if recovered {
			p.log.Info("adding egress addresses works again", "failures", failures)
		}
		if p.cfg.ObserveAdd != nil {
			p.cfg.ObserveAdd(took)
		}
		return a, nil
	}
	return netip.Addr{}, fmt.Errorf("%w: no unused address found in %s", ErrNoAddress, p.prefixList())
}

// drawSlots is how many /64s (see Spread) drawLocked tries before it gives
// up; it draws maxDraws addresses in all.
const drawSlots = 4

// drawLocked draws an address that is neither live nor excluded, from the
// /64 the Spread deals next (one other than avoid's where there are
// several), or if that one is full from the following ones.
func (p *Pool) drawLocked(avoid netip.Addr) (netip.Addr, bool) {
	var from netip.Prefix
	for i := range maxDraws {
		if i%(maxDraws/drawSlots) == 0 {
			from = p.spread.Next(avoid)
		}
		a := RandomAddr(from)
		if _, ok := p.live[a]; ok {
			continue
		}
		if _, ok := p.exclude[a]; ok {
			continue
		}
		return a, true
	}
	return netip.Addr{}, false
}

// removeLocked removes a, which the caller has taken off the warm list or
// from its lease: a goes to StateRemoving, Close waits for its removal, and
// Acquires waiting for the budget look again (the cap has room). It is
// called with p.mu held, and unlocks it.
func (p *Pool) removeLocked(a netip.Addr) {
	p.setStateLocked(a, StateRemoving)
	p.inflight.Add(1)
	if p.budget != nil {
		p.signalLocked()
	}
	p.mu.Unlock()
	p.remove(a)
}

// remove deletes a from the interface and forgets it. The caller has set its
// state to StateRemoving and added one to p.inflight.
func (p *Pool) remove(a netip.Addr) {
	err := p.drop(a)
	p.inflight.Done()
	if err != nil {
		p.log.Warn("removing egress address", "addr", a, "err", err)
	}
}

// drop deletes a from the interface, forgets it, and counts the outcome.
func (p *Pool) drop(a netip.Addr) error {
	err := p.mgr.Remove(a)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.forgetLocked(a)
	if err != nil {
		p.stats.RemoveFailures++
	} else {
		p.stats.Removed++
	}
	return err
}

func (p *Pool) release(l *Lease) {
	a := l.addr
	p.mu.Lock()
	e, ok := p.live[a]
	if !ok || e.lease != l || p.closed {
		// Lost (and perhaps drawn again since), or Close began and removes
		// every address itself.
		p.mu.Unlock()
		return
	}
	e.lease = nil
	l.mu.Lock()
	discard := l.discard
	l.mu.Unlock()
	if p.keep == 0 || discard {
		p.removeLocked(a)
		return
	}
	p.setStateLocked(a, StateWarm)
	p.warm = append(p.warm, a)
	if p.budget != nil {
		p.signalLocked()
	}
	p.mu.Unlock()
	p.kick()
}

// lost forgets a, which left the interface without the pool removing it
// (somebody deleted it, the kernel flushed it when the interface went down,
// or a bind to it failed), and ends the connections bound to it. The pool
// never removes it again. If l is not nil, a is forgotten only if l holds
// it. It reports whether a was ready, in use or warm; an address being
// added or removed is the pool's own business and left alone.
func (p *Pool) lost(a netip.Addr, l *Lease) bool {
	p.mu.Lock()
	e, ok := p.live[a]
	if !ok || p.closed || (l != nil && e.lease != l) {
		p.mu.Unlock()
		return false
	}
	holder := e.lease
	switch e.state {
	case StateReady:
		p.ready = slices.DeleteFunc(p.ready, func(x netip.Addr) bool { return x == a })
	case StateWarm:
		p.warm = slices.DeleteFunc(p.warm, func(x netip.Addr) bool { return x == a })
	case StateInUse:
	default:
		p.mu.Unlock()
		return false
	}
	p.forgetLocked(a)
	p.stats.Lost++
	if p.budget != nil {
		p.signalLocked()
	}
	p.mu.Unlock()
	if holder != nil {
		holder.lose()
	}
	p.kick() // the refiller replaces it
	return true
}

// settled lists the addresses that the pool believes are on the interface
// and is not adding or removing right now (ready, in use or warm), with
// when the kernel had added them.
func (p *Pool) settled() []AddrInfo {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]AddrInfo, 0, len(p.live))
	for a, e := range p.live {
		if isSettled(e.state) {
			out = append(out, AddrInfo{Addr: a, State: e.state, Since: e.since, Added: e.added})
		}
	}
	return out
}

// settledSince returns when the kernel had added a, if a is ready, in use or
// warm.
func (p *Pool) settledSince(a netip.Addr) (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if e, ok := p.live[a]; ok && isSettled(e.state) {
		return e.added, true
	}
	return time.Time{}, false
}

func isSettled(s AddrState) bool {
	return s == StateReady || s == StateInUse || s == StateWarm
}

// avoid makes sure a is never drawn: somebody else put it on the host.
func (p *Pool) avoid(a netip.Addr) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.live[a]; !ok {
		p.exclude[a] = struct{}{}
	}
}

// kick wakes Run without blocking.
func (p *Pool) kick() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// Run does the pool's background work until ctx is done: it keeps cfg.Ready
// addresses added, removes warm addresses once they have gone unused long
// enough, and
// refreshes the lifetime of every address before it ends.
func (p *Pool) Run(ctx context.Context) {
	refresh := time.NewTicker(p.cfg.Lifetime / 4)
	defer refresh.Stop()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var retryAt time.Time // after a failed add, when to try again
	for {
		next := p.removeDue()
		if p.now().After(retryAt) {
			if err := p.fill(ctx); err != nil {
				retryAt = p.now().Add(time.Second)
			}
		}
		// A kick while waiting to retry must not lose the retry: without
		// requests, nothing else would wake the refiller once adds work.
		if wait := retryAt.Sub(p.now()); wait > 0 && (next == 0 || next > wait) {
			next = wait
		}
		if next > 0 {
			timer.Reset(next)
		}
		select {
		case <-ctx.Done():
			return
		case <-p.wake:
		case <-timer.C:
		case <-refresh.C:
			p.refreshOld()
		}
		timer.Stop()
	}
}

// removeDue removes the warm addresses unused long enough (Budget.Window,
// or Linger) and returns how long until the next one is due (0 if none is
// warm).
func (p *Pool) removeDue() time.Duration {
	for {
		p.mu.Lock()
		if len(p.warm) == 0 || p.closed {
			p.mu.Unlock()
			return 0
		}
		a := p.warm[0]
		wait := p.live[a].since.Add(p.keep).Sub(p.now())
		if wait > 0 {
			p.mu.Unlock()
			return wait
		}
		p.warm = p.warm[1:]
		p.removeLocked(a)
	}
}

// fill adds addresses until cfg.Ready are ready or the limit is reached. It
// does nothing while the pool is suspended.
func (p *Pool) fill(ctx context.Context) error {
	for {
		p.mu.Lock()
		want := len(p.ready)+p.count[StateAdding] < p.cfg.Ready && len(p.live) < p.cfg.Max && p.unusableLocked() == nil
		p.mu.Unlock()
		if !want {
			return nil
		}
		if _, err := p.add(ctx, StateReady, nil); err != nil {
			return err
		}
	}
}

// refreshOld resets the lifetime of every address whose lifetime was last
// set more than half a lifetime ago. Run calls it every quarter lifetime, so
// no address comes closer than a quarter lifetime to its end.
func (p *Pool) refreshOld() {
	cutoff := p.now().Add(-p.cfg.Lifetime / 2)
	p.mu.Lock()
	var due []netip.Addr
	for a, e := range p.live {
		if isSettled(e.state) && e.refreshed.Before(cutoff) {
			due = append(due, a)
		}
	}
	p.mu.Unlock()
	for _, a := range due {
		start := p.now()
		if err := p.mgr.Refresh(a, p.cfg.Lifetime); err != nil {
			p.log.Warn("refreshing egress address lifetime", "addr", a, "err", err)
			continue
		}
		p.mu.Lock()
		if e, ok := p.live[a]; ok {
			e.refreshed = start
		}
		p.mu.Unlock()
	}
}

// Close stops handing out addresses, waits for adds and removes under way,
// and removes every address the pool still has, in use or not. It returns how
// many it removed and the first error.
func (p *Pool) Close() (int, error) {
	p.mu.Lock()
	p.closed = true
	p.signalLocked() // Acquires waiting for the budget give up
	p.mu.Unlock()
	p.inflight.Wait()

	p.mu.Lock()
	all := make([]netip.Addr, 0, len(p.live))
	for a := range p.live {
		all = append(all, a)
	}
	p.ready, p.warm = nil, nil
	p.mu.Unlock()

	var first error
	n := 0
	for _, a := range all {
		switch err := p.drop(a); {
		case err == nil:
			n++
		case first == nil:
			first = fmt.Errorf("removing %s: %w", a, err)
		}
	}
	return n, first
}

// Stats returns a snapshot of the pool's counters.
func (p *Pool) Stats() PoolStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.stats
	s.Live = len(p.live)
	s.Ready = p.count[StateReady]
	s.InUse = p.count[StateInUse]
	s.Warm = p.count[StateWarm]
	if p.budget != nil {
		b := p.budget.stats(p.now())
		s.Budget = &b
	}
	s.Subnets, s.OtherSubnets = p.subnets.snapshot()
	return s
}

// AddrInfo describes one live address of the pool.
type AddrInfo struct {
	Addr  netip.Addr
	State AddrState
	Since time.Time // when it entered its state
	Added time.Time // when it was added; zero while it is being added
}

// Addrs lists the pool's live addresses.
func (p *Pool) Addrs() []AddrInfo {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]AddrInfo, 0, len(p.live))
	for a, e := range p.live {
		out = append(out, AddrInfo{Addr: a, State: e.state, Since: e.since, Added: e.added})
	}
	return out
}
