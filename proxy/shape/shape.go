package shape

import (
	"context"
	"fmt"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// Bounds on what the shaper keeps; the Shaper copies them into fields that
// tests make small.
const (
	maxStates  = 10_000      // hosts with a state of their own
	maxLine    = 10_000      // requests waiting on one state
	sweepEvery = time.Second // least time between sweeps that freed little
)

// MaxHold is the longest an upstream's Retry-After holds its rule (see
// Pushback).
const MaxHold = time.Hour

// Clock is where the shaper reads the time and sets its timers.
type Clock interface {
	Now() time.Time
	// NewTimer returns a channel that receives after d, and a stop func.
	NewTimer(d time.Duration) (<-chan time.Time, func() bool)
}

// SystemClock is the real clock.
var SystemClock Clock = systemClock{}

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

func (systemClock) NewTimer(d time.Duration) (<-chan time.Time, func() bool) {
	t := time.NewTimer(d)
	return t.C, t.Stop
}

// Config configures a Shaper.
type Config struct {
	// Rules are the -limit rules. No two may have the same Host; their
	// order does not matter, the most specific one applies.
	Rules []Rule
	// Clock is where the shaper reads the time; SystemClock when nil.
	Clock Clock
	// Shared, when set, makes the rate and burst of every rule a budget
	// that all egressd instances naming the same store share (see
	// Shared); nil keeps them in this process alone.
	Shared *Shared
}

// Shaper paces requests per upstream host by the rules it was given. It is
// safe for concurrent use.
type Shaper struct {
	clock  Clock
	rules  []Rule
	exact  map[string]int // host -> index in rules
	suffix map[string]int // ".archlinux.org" for "*.archlinux.org" -> index
	star   int            // index of "*", -1 when there is none
	shared *Shared        // nil: rates are this process's own

	maxStates  int
	maxLine    int
	sweepEvery time.Duration

	blocked atomic.Int64 // goroutines asleep in Acquire; tests wait on it

	mu        sync.Mutex
	states    map[string]*state // by normalized host
	overflow  []*state          // by rule index, made when first needed
	nextSweep time.Time         // no sweep before, after one that freed little
}

// state is what one host (or a rule's overflow) is paced by. The fields
// after sem are guarded by Shaper.mu, and so is every use of lim.
type state struct {
	s    *Shaper
	rule *Rule
	lim  *rate.Limiter
	sem  chan struct{} // a slot per request in flight; nil when no cap

	active int       // requests waiting or holding a Permit
	hold   time.Time // Pushback: nobody goes before this
	retry  time.Time // shared: the head asks again then, as the store said
	head   *waiter   // the line, first come first served
	tail   *waiter
	n      int // waiters in the line
}

// waiter is a request in a state's line. Only the head holds a rate
// reservation, so when anyone leaves, those behind simply move up; the head
// leaving gives its reservation back with CancelAt, which is exact because
// it is the limiter's latest.
type waiter struct {
	prev, next *waiter
	host       string
	deadline   time.Time
	r          *rate.Reservation // the head's, until it goes
	at         time.Time         // when r lets it go
	armed      time.Time         // what its goroutine's timer is set for; zero: none
	wake       chan struct{}     // buffered 1: look again
	done       bool              // out of the line: let through, or err
	err        error
}

// New checks the rules and returns a Shaper. Two rules with the same Host are
// an error naming it.
func New(cfg Config) (*Shaper, error) {
	s := &Shaper{
		clock:      cfg.Clock,
		exact:      make(map[string]int),
		suffix:     make(map[string]int),
		star:       -1,
		maxStates:  maxStates,
		maxLine:    maxLine,
		sweepEvery: sweepEvery,
		states:     make(map[string]*state),
		overflow:   make([]*state, len(cfg.Rules)),
		shared:     cfg.Shared,
	}
	if s.clock == nil {
		s.clock = SystemClock
	}
	for i, r := range cfg.Rules {
		r, err := r.validate()
		if err != nil {
			return nil, err
		}
		var m map[string]int
		key := r.Host
		switch {
		case r.Host == "*":
			if s.star >= 0 {
				return nil, fmt.Errorf("two rules for %q", r.Host)
			}
			s.star = i
		case strings.HasPrefix(r.Host, "*."):
			m, key = s.suffix, r.Host[1:]
		default:
			m = s.exact
		}
		if m != nil {
			if _, dup := m[key]; dup {
				return nil, fmt.Errorf("two rules for %q", r.Host)
			}
			m[key] = i
		}
		s.rules = append(s.rules, r)
	}
	return s, nil
}

// Rules returns a copy of the rules, in the order given.
func (s *Shaper) Rules() []Rule {
	return append([]Rule(nil), s.rules...)
}

// RuleFor returns the most specific rule for host and whether there is one:
// the exact host, else the longest matching "*.suffix", else "*". The host
// may have a port, a trailing dot and upper case. No allocation unless host
// has upper case.
func (s *Shaper) RuleFor(host string) (Rule, bool) {
	i := s.match(normHost(host))
	if i < 0 {
		return Rule{}, false
	}
	return s.rules[i], true
}

// match returns the index of the rule for a normalized host, or -1.
func (s *Shaper) match(h string) int {
	if i, ok := s.exact[h]; ok {
		return i
	}
	// The first dot gives the longest suffix. Substrings: no allocation.
	for i := 0; i < len(h); i++ {
		if h[i] == '.' {
			if j, ok := s.suffix[h[i:]]; ok {
				return j
			}
		}
	}
	return s.star
}

// Permit is a request let through. Release it when the request (or tunnel)
// ends. The zero Permit, for an unshaped host, releases nothing.
type Permit struct {
	st     *state
	waited time.Duration
}

// Release ends the request: it gives back its concurrency slot. Call it once;
// on the zero Permit it does nothing.
func (p Permit) Release() {
	st := p.st
	if st == nil {
		return
	}
	if st.sem != nil {
		select {
		case <-st.sem:
		default: // released twice; do not block
		}
	}
	st.s.mu.Lock()
	if st.active > 0 {
		st.active--
	}
	st.s.mu.Unlock()
}

// Waited returns how long Acquire waited, for the rate and for a slot.
func (p Permit) Waited() time.Duration { return p.waited }

// Rule returns the Host of the rule that applied, "" when unshaped.
func (p Permit) Rule() string {
	if p.st == nil {
		return ""
	}
	return p.st.rule.Host
}

// Acquire waits for host's turn. With no matching rule it returns at once
// with a zero-cost Permit. On success the caller must call Release when the
// request (or tunnel) ends. Errors: *RejectError (429 for the client), or
// ctx.Err() when the client went away while waiting.
//
// A request that finds a token and a free slot goes through without
// allocating. Otherwise it queues: first for the rate, behind everyone
// already waiting, then for a concurrency slot, both within its rule's Wait.
func (s *Shaper) Acquire(ctx context.Context, host string) (Permit, error) {
	h := normHost(host)
	i := s.match(h)
	if i < 0 {
		return Permit{}, nil
	}
	s.mu.Lock()
	// Read the time under the lock, so that the limiter sees it go forward.
	now := s.clock.Now()
	st := s.stateFor(h, i, now)
	if s.shared != nil {
		return s.queue(ctx, st, h, now) // only the line's head asks the store
	}
	if st.head != nil {
		s.pump(st, now)
	}
	if st.head == nil && !st.hold.After(now) && st.lim.AllowN(now, 1) {
		st.active++
		s.mu.Unlock()
		if st.sem != nil {
			select {
			case st.sem <- struct{}{}:
			default:
				return s.slot(ctx, st, h, now, now.Add(st.rule.Wait))
			}
		}
		return Permit{st: st}, nil
	}
	return s.queue(ctx, st, h, now)
}

// queue puts a request that cannot go at once in line, or rejects it; with
// a Shared, every request of a shaped host comes here. It is called with
// s.mu held and unlocks it.
func (s *Shaper) queue(ctx context.Context, st *state, host string, now time.Time) (Permit, error) {
	rule := st.rule
	if err := ctx.Err(); err != nil {
		s.mu.Unlock()
		return Permit{}, err
	}
	deadline := now.Add(rule.Wait)
	if st.hold.After(deadline) {
		left := st.hold.Sub(now)
		s.mu.Unlock()
		return Permit{}, reject(host, rule, left, "%s asked to slow down (Retry-After)", host)
	}
	var delay time.Duration
	if s.shared != nil {
		delay = st.least(now, st.n+1)
	} else {
		delay = st.expect(now, st.unreserved()+1)
	}
	if st.n >= s.maxLine {
		s.mu.Unlock()
		return Permit{}, reject(host, rule, delay, "too many requests waiting for %s", host)
	}
	if delay > rule.Wait {
		s.mu.Unlock()
		return Permit{}, reject(host, rule, delay, rateReason, host, rule.Wait)
	}
	w := &waiter{host: host, deadline: deadline, wake: make(chan struct{}, 1)}
	st.push(w)
	st.active++
	var err error
	if s.shared != nil {
		s.mu.Unlock()
		err = s.waitShared(ctx, st, w)
	} else {
		s.pump(st, now)
		s.mu.Unlock()
		err = s.wait(ctx, st, w)
	}
	if err != nil {
		s.mu.Lock()
		st.active--
		s.mu.Unlock()
		return Permit{}, err
	}
	return s.slot(ctx, st, host, now, deadline)
}

const rateReason = "rate limit for %s: would wait longer than %v"

// wait sleeps until w is let through or rejected, or ctx is done.
func (s *Shaper) wait(ctx context.Context, st *state, w *waiter) error {
	for {
		s.mu.Lock()
		now := s.clock.Now()
		s.pump(st, now)
		if w.done {
			s.mu.Unlock()
			return w.err
		}
		target := st.target(w, now)
		w.armed = target
		// Signals are sent under s.mu, so any pending one is about what
		// this goroutine has just seen.
		select {
		case <-w.wake:
		default:
		}
		s.mu.Unlock()

		if err := s.sleep(ctx, target, w, func() { s.leave(st, w, s.clock.Now()) }); err != nil {
			return err
		}
	}
}

// sleep waits for w's wake-up, or until target unless it is zero. When ctx
// ends first it takes w out of its line with leave (under s.mu, unless w
// is done by then) and returns ctx's error.
func (s *Shaper) sleep(ctx context.Context, target time.Time, w *waiter, leave func()) error {
	var fire <-chan time.Time
	stop := func() bool { return false }
	if !target.IsZero() {
		fire, stop = s.clock.NewTimer(target.Sub(s.clock.Now()))
	}
	s.blocked.Add(1)
	select {
	case <-ctx.Done():
		s.blocked.Add(-1)
		stop()
		s.mu.Lock()
		if !w.done {
			leave()
		}
		s.mu.Unlock()
		return ctx.Err()
	case <-fire:
	case <-w.wake:
	}
	s.blocked.Add(-1)
	stop()
	return nil
}

// slot takes a concurrency slot for a request that has its rate turn, by
// deadline. On failure it drops the request from st.active.
func (s *Shaper) slot(ctx context.Context, st *state, host string, start, deadline time.Time) (Permit, error) {
	if st.sem != nil {
		select {
		case st.sem <- struct{}{}:
		default:
			if err := s.waitSlot(ctx, st, host, deadline); err != nil {
				s.mu.Lock()
				st.active--
				s.mu.Unlock()
				return Permit{}, err
			}
		}
	}
	return Permit{st: st, waited: s.clock.Now().Sub(start)}, nil
}

// waitSlot waits for a concurrency slot. Blocked senders on a channel are
// served in order, so slots go first come first served.
func (s *Shaper) waitSlot(ctx context.Context, st *state, host string, deadline time.Time) error {
	full := func() error {
		return reject(host, st.rule, time.Second, "concurrency limit for %s: no slot within %v", host, st.rule.Wait)
	}
	d := deadline.Sub(s.clock.Now())
	if d <= 0 {
		return full()
	}
	fire, stop := s.clock.NewTimer(d)
	defer stop()
	s.blocked.Add(1)
	defer s.blocked.Add(-1)
	select {
	case st.sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-fire:
		return full()
	}
}

// Pushback holds host because its upstream answered 429 or 503 with
// Retry-After: nobody goes to it for retryAfter (at most an hour). Requests
// that may wait that long wait, then take their tokens in turn; the others
// are rejected with the time left of the hold. A shorter hold does not cut
// a longer one. Pushback reports whether host is shaped; for an unshaped
// host it does nothing.
func (s *Shaper) Pushback(host string, retryAfter time.Duration) bool {
	h := normHost(host)
	i := s.match(h)
	if i < 0 {
		return false
	}
	if retryAfter <= 0 {
		return true
	}
	retryAfter = min(retryAfter, MaxHold)
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	st := s.stateFor(h, i, now)
	until := now.Add(retryAfter)
	if !until.After(st.hold) {
		return true
	}
	st.hold = until
	if s.shared != nil {
		st.rejectLate(now)
		return true
	}
	if w := st.head; w != nil && w.r != nil {
		w.r.CancelAt(now) // the head takes its token after the hold
		w.r, w.at = nil, time.Time{}
	}
	// Those who cannot wait for the hold, or for their turn after it, go now.
	tokens := st.lim.TokensAt(until)
	k := 0
	for w := st.head; w != nil; {
		next := w.next
		if until.After(w.deadline) {
			st.finish(w, reject(w.host, st.rule, retryAfter, "%s asked to slow down (Retry-After)", w.host))
		} else if d := retryAfter + tokenDelay(tokens, k+1, st.rule.Rate); d > w.deadline.Sub(now) {
			st.finish(w, reject(w.host, st.rule, d, rateReason, w.host, st.rule.Wait))
		} else {
			k++
		}
		w = next
	}
	s.pump(st, now)
	return true
}

// pump moves st's line along at now: the head takes its reservation, and
// goes when its time has come; then the next. It signals the head when its
// timer must change. Called with s.mu held.
func (s *Shaper) pump(st *state, now time.Time) {
	for st.head != nil && !st.hold.After(now) {
		w := st.head
		if w.r == nil {
			r := st.lim.ReserveN(now, 1) // allocates; only when waiting
			d := r.DelayFrom(now)
			if d > w.deadline.Sub(now) {
				r.CancelAt(now)
				st.finish(w, reject(w.host, st.rule, d, rateReason, w.host, st.rule.Wait))
				continue
			}
			w.r, w.at = r, now.Add(d)
		}
		if w.at.After(now) {
			break
		}
		w.r = nil // spent
		st.finish(w, nil)
	}
	if w := st.head; w != nil && !st.target(w, now).Equal(w.armed) {
		w.signal()
	}
}

// leave takes w out of the line because its client went away, giving back
// its reservation. Called with s.mu held.
func (s *Shaper) leave(st *state, w *waiter, now time.Time) {
	if w.r != nil {
		w.r.CancelAt(now)
		w.r = nil
	}
	st.remove(w)
	w.done = true
	s.pump(st, now)
}

// stateFor returns host's state, making one if there is room; if there is
// none, even after dropping idle states, the host shares its rule's
// overflow state. Called with s.mu held.
func (s *Shaper) stateFor(host string, i int, now time.Time) *state {
	if st, ok := s.states[host]; ok {
		return st
	}
	if len(s.states) >= s.maxStates && !now.Before(s.nextSweep) {
		s.sweep(now)
	}
	if len(s.states) >= s.maxStates {
		if s.overflow[i] == nil {
			s.overflow[i] = s.newState(i)
		}
		return s.overflow[i]
	}
	st := s.newState(i)
	s.states[strings.Clone(host)] = st // host may be part of a larger string
	return st
}

// sweep drops the idle states. A sweep costs a walk over all of them, so
// after one that freed little the next waits sweepEvery.
func (s *Shaper) sweep(now time.Time) {
	freed := 0
	for h, st := range s.states {
		if st.idle(now) {
			delete(s.states, h)
			freed++
		}
	}
	if freed < max(1, s.maxStates/8) {
		s.nextSweep = now.Add(s.sweepEvery)
	}
}

func (s *Shaper) newState(i int) *state {
	r := &s.rules[i]
	st := &state{s: s, rule: r, lim: rate.NewLimiter(r.Rate, r.Burst)}
	if r.Concurrency > 0 {
		st.sem = make(chan struct{}, r.Concurrency)
	}
	return st
}

// idle reports whether st can be dropped with nothing lost: nothing in
// flight, nobody waiting, a full bucket, no hold. A new state is the same.
func (st *state) idle(now time.Time) bool {
	return st.active == 0 && st.head == nil && !st.hold.After(now) &&
		st.lim.TokensAt(now) >= float64(st.rule.Burst)
}

// unreserved counts the waiters without a reservation.
func (st *state) unreserved() int {
	if st.head != nil && st.head.r != nil {
		return st.n - 1
	}
	return st.n
}

// expect returns how long from now until the k-th waiter without a
// reservation gets its token, if nothing changes.
func (st *state) expect(now time.Time, k int) time.Duration {
	base := now
	if st.hold.After(now) {
		base = st.hold
	}
	return base.Sub(now) + tokenDelay(st.lim.TokensAt(base), k, st.rule.Rate)
}

// tokenDelay returns how long a bucket with tokens takes to have k, at r.
func tokenDelay(tokens float64, k int, r rate.Limit) time.Duration {
	need := float64(k) - tokens
	if need <= 0 {
		return 0
	}
	ns := need / float64(r) * float64(time.Second)
	if ns >= math.MaxInt64/2 { // far beyond any wait; room to add a hold
		return math.MaxInt64 / 2
	}
	return time.Duration(ns)
}

// target returns when w's goroutine must look again: the head sleeps until
// its reservation or the end of a hold; the others until woken (zero).
func (st *state) target(w *waiter, now time.Time) time.Time {
	switch {
	case w != st.head:
		return time.Time{}
	case st.hold.After(now):
		return st.hold
	}
	return w.at
}

func (st *state) push(w *waiter) {
	w.prev = st.tail
	if st.tail != nil {
		st.tail.next = w
	} else {
		st.head = w
	}
	st.tail = w
	st.n++
}

func (st *state) remove(w *waiter) {
	if w.prev != nil {
		w.prev.next = w.next
	} else {
		st.head = w.next
	}
	if w.next != nil {
		w.next.prev = w.prev
	} else {
		st.tail = w.prev
	}
	w.prev, w.next = nil, nil
	st.n--
}

// finish takes w out of the line, let through (err nil) or rejected.
func (st *state) finish(w *waiter, err error) {
	st.remove(w)
	w.done, w.err = true, err
	w.signal()
}

func (w *waiter) signal() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}
