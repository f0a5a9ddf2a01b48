package netutil

import (
	"fmt"
	"math"
	"time"
)

// Budget is on-link mode's neighbour budget. Every address a connection
// leaves from makes the router learn a neighbour entry, which it keeps for
// about a minute after the address's last use whether or not the address
// is still on the interface (Linux: stale after 15 to 45 s, collected once
// unused for gc_stale_time, 60 s, at the next garbage collection, which runs
// every 15 s). So what fills the router's table is the number of distinct
// addresses used within that window, not the number live on the host.
//
// With a Budget the pool hands out a never-used address only while a token
// bucket (Rate, Burst) has a token and fewer than Cap() distinct addresses
// were used within Window (in use, or warm: released less than Window ago).
// Past that a connection reuses the warm address that has gone unused the
// longest, and warm addresses stay on the interface until they have been
// unused for Window. The router then holds at most Cap() entries for the
// prefix, plus those of addresses it has not collected yet, about Rate x
// 15 s.
//
// The zero Budget means none: every connection gets a never-used address
// (routed mode, where addresses cost the router nothing).
type Budget struct {
	// Rate is the never-used addresses a second the pool may hand out,
	// sustained.
	Rate float64
	// Burst is how many it may hand out at once beyond the rate.
	Burst int
	// Window is how long the router remembers an address after its last
	// use: warm addresses are reused within it and removed after it.
	Window time.Duration
}

// DefaultBudget keeps a Linux router with default settings (gc_thresh2 512,
// gc_thresh3 1,024, gc_stale_time 60 s, base_reachable_time 30 s) below 512
// entries for the prefix under any load: a cap of 96 + 5 x 60 = 396
// addresses within the window, plus about 5 x 15 = 75 the router has not
// collected yet. 5 new addresses a second, sustained, all leave from
// never-used addresses; the burst of 96 leaves 96 distinct addresses
// between two uses of one even in the first second of heavy load. The window
// is the router's gc_stale_time: measured on Linux 6.18, a router that saw
// 200 new addresses once had them all REACHABLE, STALE by 31 s, and gone by
// 72 s (bench/results/core.md).
var DefaultBudget = Budget{Rate: 5, Burst: 96, Window: 60 * time.Second}

// IsZero reports whether b is no budget at all.
func (b Budget) IsZero() bool { return b == Budget{} }

// Cap is the most distinct addresses the budget lets be used within
// Window: Burst + Rate x Window.
func (b Budget) Cap() int { return capOf(b.Burst, b.Rate, b.Window) }

func capOf(burst int, rate float64, window time.Duration) int {
	return burst + int(math.Floor(rate*window.Seconds()))
}

func (b Budget) validate() error {
	switch {
	case b.IsZero():
		return nil
	case !(b.Rate > 0) || math.IsInf(b.Rate, 0):
		return fmt.Errorf("new address rate %v: must be positive", b.Rate)
	case b.Burst < 1:
		return fmt.Errorf("new address burst %d: must be at least 1", b.Burst)
	case b.Window <= 0:
		return fmt.Errorf("neighbour window %s: must be positive", b.Window)
	}
	return nil
}

// How the pool adapts to a router whose table overflows anyway (a smaller
// table, other hosts' entries, a shorter memory than Window): when a
// connection from a never-used address gets no answer within FirstTry
// while warm addresses are there, and the same connection from a warm
// address does, the router dropped the answer for lack of a neighbour entry.
// Then the rate is halved (at most once per adaptHold: the connections that
// failed together are one overflow), the tokens saved up are dropped, and
// the rate rises again by adaptRaise every adaptEvery without another
// overflow, back to the one set.
const (
	// FirstTry bounds the first attempt of a connection from a never-used
	// address while warm addresses are there. The kernel sends its second
	// SYN a second after the first: two SYNs without an answer.
	FirstTry   = 2 * time.Second
	adaptHold  = 5 * time.Second
	adaptRaise = 1.25
	adaptEvery = 30 * time.Second
	// adaptFloor: the rate never falls below the one set divided by it.
	adaptFloor = 32
	// overflowWarnEvery is the most often an overflow is logged.
	overflowWarnEvery = time.Minute
)

// BudgetStats is the budget in force.
type BudgetStats struct {
	// Rate is the never-used addresses a second allowed now: MaxRate, or
	// less after the router overflowed.
	Rate    float64
	MaxRate float64
	Burst   int
	// Cap is Burst + Rate x Window: the most distinct addresses used
	// within Window that let a never-used one be handed out now.
	Cap    int
	Window time.Duration
}

// bucket is the state of a Budget: a token bucket whose rate adapts. Its
// methods take the time explicitly; the pool's lock guards it.
type bucket struct {
	set       Budget
	rate      float64   // in force
	tokens    float64   // as of last
	last      time.Time // when tokens was right
	nextRaise time.Time // when rate, below set.Rate, rises next
	cutAt     time.Time // the last cut
}

func newBucket(b Budget, now time.Time) *bucket {
	return &bucket{set: b, rate: b.Rate, tokens: float64(b.Burst), last: now}
}

// advance brings tokens and rate up to now.
func (b *bucket) advance(now time.Time) {
	for b.rate < b.set.Rate && !now.Before(b.nextRaise) {
		b.accrue(b.nextRaise)
		b.rate = min(b.rate*adaptRaise, b.set.Rate)
		b.nextRaise = b.nextRaise.Add(adaptEvery)
	}
	b.accrue(now)
}

func (b *bucket) accrue(t time.Time) {
	if t.After(b.last) {
		b.tokens = min(float64(b.set.Burst), b.tokens+b.rate*t.Sub(b.last).Seconds())
		b.last = t
	}
}

// cap is the cap in force, with the rate in force.
func (b *bucket) cap() int { return capOf(b.set.Burst, b.rate, b.set.Window) }

// take takes a token if there is one at now.
func (b *bucket) take(now time.Time) bool {
	b.advance(now)
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// untilToken is how long from now until the next token.
func (b *bucket) untilToken(now time.Time) time.Duration {
	b.advance(now)
	if b.tokens >= 1 {
		return 0
	}
	return time.Duration(math.Ceil((1 - b.tokens) / b.rate * float64(time.Second)))
}

// cut halves the rate after an overflow and drops the saved tokens, unless
// it was cut less than adaptHold ago. It reports whether it cut.
func (b *bucket) cut(now time.Time) bool {
	b.advance(now)
	if !b.cutAt.IsZero() && now.Sub(b.cutAt) < adaptHold {
		return false
	}
	b.rate = max(b.rate/2, b.set.Rate/adaptFloor)
	b.tokens = 0
	b.cutAt = now
	b.nextRaise = now.Add(adaptEvery)
	return true
}

func (b *bucket) stats(now time.Time) BudgetStats {
	b.advance(now)
	return BudgetStats{Rate: b.rate, MaxRate: b.set.Rate, Burst: b.set.Burst, Cap: b.cap(), Window: b.set.Window}
}
