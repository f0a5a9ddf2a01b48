package shape

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// Store keeps budgets that several egressd instances share: a bucket per
// key, which every instance naming the same store draws from (package
// redisstore keeps them in Redis).
type Store interface {
	// Allow takes one token from key's bucket, which holds burst tokens
	// and gains r a second. It returns 0 when it took one, else how long
	// until there is one (more than 0). An error means the store did not
	// answer; it must not contain credentials.
	Allow(ctx context.Context, key string, r rate.Limit, burst int) (time.Duration, error)
}

// Defaults of SharedConfig.
const (
	DefaultStoreTimeout = 250 * time.Millisecond
	DefaultStoreRetry   = time.Second
)

// SharedConfig configures a Shared.
type SharedConfig struct {
	// Store is where the budgets are kept.
	Store Store
	// Name is the store as logs and statistics show it, without
	// credentials.
	Name string
	// Timeout is the longest a decision waits for the store before it is
	// made in-process; DefaultStoreTimeout when 0.
	Timeout time.Duration
	// Retry is how often, while the store does not answer, one decision
	// tries it again; DefaultStoreRetry when 0.
	Retry time.Duration
	// Logger gets a line when the store stops answering and one when it
	// answers again; nil discards them.
	Logger *slog.Logger
	// Clock is SystemClock when nil.
	Clock Clock
}

// Shared makes the rate and burst of every rule a budget that all egressd
// instances naming the same store share: one bucket per rule and upstream
// host, kept in the store (GCRA). Give the same Shared to every Shaper of a
// process (a reload makes a new Shaper), so that its state carries over.
//
// With a Shared, every request of a shaped host joins its line, first come
// first served as without one, and only the head of the line asks the
// store; a request the store refuses waits here for the time the store
// says, then asks again. Concurrency caps stay per process.
//
// When the store does not answer within Timeout, decisions are made by the
// in-process limiter of each rule instead (so each egressd enforces the
// whole rule alone): Shared logs it once, counts it, and tries the store
// again every Retry, returning to it when it answers. A store that is down
// never fails a request. It is safe for concurrent use.
type Shared struct {
	store   Store
	name    string
	timeout time.Duration
	retry   time.Duration
	log     *slog.Logger
	clock   Clock

	decisions atomic.Uint64 // answered by the store
	local     atomic.Uint64 // made in-process while the store did not answer
	errors    atomic.Uint64 // store calls that failed or timed out
	fallbacks atomic.Uint64 // times decisions went in-process

	mu      sync.Mutex
	down    bool      // the store did not answer: decisions are in-process
	since   time.Time // when down last changed (or the start)
	nextTry time.Time // down: when a decision tries the store again
	trying  bool      // down: a decision is trying it now
	lastErr string
}

// NewShared returns a Shared for cfg.Store, taken to answer until it fails.
func NewShared(cfg SharedConfig) *Shared {
	sh := &Shared{store: cfg.Store, name: cfg.Name, timeout: cfg.Timeout, retry: cfg.Retry, log: cfg.Logger, clock: cfg.Clock}
	if sh.timeout <= 0 {
		sh.timeout = DefaultStoreTimeout
	}
	if sh.retry <= 0 {
		sh.retry = DefaultStoreRetry
	}
	if sh.log == nil {
		sh.log = slog.New(slog.DiscardHandler)
	}
	if sh.clock == nil {
		sh.clock = SystemClock
	}
	sh.since = sh.clock.Now()
	return sh
}

// SharedStats is a snapshot of a Shared.
type SharedStats struct {
	Store string // the store's name, without credentials
	// Shared is whether decisions go to the store now; false while it
	// does not answer and each egressd enforces every rule alone.
	Shared bool
	Since  time.Time // when Shared last changed, or the start
	// Decisions counts answers of the store, LocalDecisions decisions made
	// in-process because it did not answer; Errors the store calls that
	// failed or timed out, Fallbacks the times decisions went in-process.
	Decisions, LocalDecisions, Errors, Fallbacks uint64
	// LastError is the last failure, "" if none.
	LastError string
}

// Stats returns a snapshot of sh.
func (sh *Shared) Stats() SharedStats {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	return SharedStats{
		Store:          sh.name,
		Shared:         !sh.down,
		Since:          sh.since,
		Decisions:      sh.decisions.Load(),
		LocalDecisions: sh.local.Load(),
		Errors:         sh.errors.Load(),
		Fallbacks:      sh.fallbacks.Load(),
		LastError:      sh.lastErr,
	}
}

// begin says whether a decision asks the store: always while it answers;
// while it does not, one decision every Retry, which probe marks.
func (sh *Shared) begin() (ask, probe bool) {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if !sh.down {
		return true, false
	}
	if sh.trying || sh.clock.Now().Before(sh.nextTry) {
		return false, false
	}
	sh.trying = true
	return true, true
}

// allow asks the store within the timeout and records how it went. Its
// error is ctx's when the client left, the store's otherwise.
func (sh *Shared) allow(ctx context.Context, key string, r rate.Limit, burst int, probe bool) (time.Duration, error) {
	actx, cancel := context.WithTimeout(ctx, sh.timeout)
	d, err := sh.store.Allow(actx, key, r, burst)
	cancel()
	if err != nil && ctx.Err() != nil {
		// The client went away: that says nothing of the store.
		if probe {
			sh.mu.Lock()
			sh.trying = false
			sh.mu.Unlock()
		}
		return 0, ctx.Err()
	}
	sh.record(err, probe)
	return d, err
}

// record counts an answer of the store, or its failure, and logs the
// changes between shared and in-process decisions.
func (sh *Shared) record(err error, probe bool) {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	now := sh.clock.Now()
	if probe {
		sh.trying = false
	}
	if err == nil {
		sh.decisions.Add(1)
		if sh.down {
			sh.log.Info("limit store answers again: -limit rules are shared again", "store", sh.name, "down_for", now.Sub(sh.since))
			sh.down, sh.since = false, now
		}
		return
	}
	sh.errors.Add(1)
	sh.lastErr = strings.Join(strings.Fields(err.Error()), " ")
	if errors.Is(err, context.DeadlineExceeded) {
		sh.lastErr = fmt.Sprintf("no answer within %s", sh.timeout)
	}
	sh.nextTry = now.Add(sh.retry)
	if !sh.down {
		sh.down, sh.since = true, now
		sh.fallbacks.Add(1)
		sh.log.Warn("limit store fails: each egressd enforces every -limit rule alone until it answers",
			"store", sh.name, "err", sh.lastErr)
	}
}

// storeKey is the key of host's bucket under rule: one per rule and
// upstream host. Neither contains '/'.
func storeKey(rule, host string) string {
	return rule + "/" + host
}

// waitShared waits until w is let through or rejected, or ctx is done. The
// head of the line asks for a token once any hold is over and the time the
// last refusal named has come; the others wait for their turn until their
// deadline.
func (s *Shaper) waitShared(ctx context.Context, st *state, w *waiter) error {
	for {
		s.mu.Lock()
		now := s.clock.Now()
		if w.done {
			s.mu.Unlock()
			return w.err
		}
		ask, target := false, w.deadline
		if w == st.head {
			switch {
			case st.hold.After(now):
				target = st.hold // not after the deadline: see queueShared and rejectLate
			case st.retry.After(now):
				target = st.retry
			default:
				ask = true
			}
		}
		if !ask && !now.Before(w.deadline) {
			k := st.position(w)
			st.drop(w)
			s.mu.Unlock()
			return reject(w.host, st.rule, st.least(now, k), rateReason, w.host, st.rule.Wait)
		}
		select {
		case <-w.wake:
		default:
		}
		s.mu.Unlock()

		if ask {
			d, err := s.decide(ctx, st, w.host)
			s.mu.Lock()
			now = s.clock.Now()
			switch {
			case w.done: // rejected meanwhile, by Pushback
			case err != nil: // ctx is done
				st.drop(w)
				w.err = err
			case d <= 0:
				st.finish(w, nil)
				st.wakeHead()
			default:
				if at := now.Add(d); at.After(st.retry) {
					st.retry = at
				}
				st.rejectLate(now)
			}
			done, err := w.done, w.err
			s.mu.Unlock()
			if done {
				return err
			}
			continue
		}

		if err := s.sleep(ctx, target, w, func() { st.drop(w) }); err != nil {
			return err
		}
	}
}

// decide asks whether host may go now under st's rule: the store while it
// answers, else st's own limiter. It returns 0 to go, or how long until it
// may ask again; its error is ctx's, when the client went away.
func (s *Shaper) decide(ctx context.Context, st *state, host string) (time.Duration, error) {
	sh := s.shared
	if ask, probe := sh.begin(); ask {
		d, err := sh.allow(ctx, storeKey(st.rule.Host, host), st.rule.Rate, st.rule.Burst, probe)
		if err == nil {
			return d, nil
		}
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
	}
	sh.local.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	if st.lim.AllowN(now, 1) {
		return 0, nil
	}
	return max(tokenDelay(st.lim.TokensAt(now), 1, st.rule.Rate), time.Nanosecond), nil
}

// least is the soonest the k-th waiter (from 1) of a shared line can go,
// from now: after any hold and the time the last refusal named, the store
// gives the burst at most, and then the rule's rate, to all hosts together.
// Called with s.mu held.
func (st *state) least(now time.Time, k int) time.Duration {
	base, tokens := now, float64(st.rule.Burst)
	if st.retry.After(base) {
		base, tokens = st.retry, 1
	}
	if st.hold.After(base) {
		base = st.hold
	}
	return base.Sub(now) + tokenDelay(tokens, k, st.rule.Rate)
}

// rejectLate rejects the waiters of a shared line that cannot get through
// by their deadline, after a refusal of the store or a Pushback, and wakes
// the head. Called with s.mu held.
func (st *state) rejectLate(now time.Time) {
	k := 0
	for w := st.head; w != nil; {
		next := w.next
		switch d := st.least(now, k+1); {
		case st.hold.After(w.deadline):
			st.finish(w, reject(w.host, st.rule, st.hold.Sub(now), "%s asked to slow down (Retry-After)", w.host))
		case d > w.deadline.Sub(now):
			st.finish(w, reject(w.host, st.rule, d, rateReason, w.host, st.rule.Wait))
		default:
			k++
		}
		w = next
	}
	st.wakeHead()
}

// position is w's place in st's line, from 1.
func (st *state) position(w *waiter) int {
	k := 1
	for x := st.head; x != nil && x != w; x = x.next {
		k++
	}
	return k
}

// drop takes w out of the line without an outcome (its client left, or its
// deadline passed) and wakes the head, which may be new. Called with s.mu
// held.
func (st *state) drop(w *waiter) {
	st.remove(w)
	w.done = true
	st.wakeHead()
}

// wakeHead makes the head of the line look again.
func (st *state) wakeHead() {
	if st.head != nil {
		st.head.signal()
	}
}
