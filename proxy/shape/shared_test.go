package shape

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/time/rate"
)

// fakeStore is a Store in memory on a fake clock: GCRA as Redis runs it.
// down makes it fail; hang makes it answer only when its context is done.
type fakeStore struct {
	clock *fakeClock

	mu   sync.Mutex
	tat  map[string]time.Time
	keys []string // asked for, in order
	down bool
	hang bool
}

var _ Store = (*fakeStore)(nil)

func newFakeStore(clock *fakeClock) *fakeStore {
	return &fakeStore{clock: clock, tat: make(map[string]time.Time)}
}

func (f *fakeStore) Allow(ctx context.Context, key string, r rate.Limit, burst int) (time.Duration, error) {
	f.mu.Lock()
	f.keys = append(f.keys, key)
	down, hang := f.down, f.hang
	f.mu.Unlock()
	switch {
	case hang:
		<-ctx.Done()
		return 0, ctx.Err()
	case down:
		return 0, errors.New("dial tcp [2001:db8::6379]:6379: connect: connection refused")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	now := f.clock.Now()
	interval := time.Duration(float64(time.Second) / float64(r))
	tat := f.tat[key]
	if tat.Before(now) {
		tat = now
	}
	next := tat.Add(interval)
	if allowAt := next.Add(-time.Duration(burst) * interval); allowAt.After(now) {
		return allowAt.Sub(now), nil
	}
	f.tat[key] = next
	return 0, nil
}

func (f *fakeStore) set(down, hang bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down, f.hang = down, hang
}

func (f *fakeStore) asked() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.keys...)
}

// sharedHarness is a harness whose shaper shares its budgets through a
// fakeStore, and the log of its Shared.
type sharedHarness struct {
	*harness
	store  *fakeStore
	shared *Shared
	log    *strings.Builder
	logMu  *sync.Mutex
}

func newSharedHarness(t *testing.T, rules ...string) *sharedHarness {
	h := newHarness(t)
	sh := &sharedHarness{harness: h, store: newFakeStore(h.clock), log: new(strings.Builder), logMu: new(sync.Mutex)}
	sh.shared = NewShared(SharedConfig{
		Store:   sh.store,
		Name:    "redis://:xxxxx@store.test:6379/0",
		Timeout: 50 * time.Millisecond, // real time: only the hanging store waits for it
		Logger:  slog.New(slog.NewTextHandler(lockedWriter{sh.logMu, sh.log}, nil)),
		Clock:   h.clock,
	})
	h.s = sh.instance(t, rules...)
	return sh
}

// instance is another egressd's shaper on the same store and clock.
func (sh *sharedHarness) instance(t *testing.T, rules ...string) *Shaper {
	return newShaperWith(t, Config{Clock: sh.clock, Shared: sh.shared}, rules...)
}

// logLines counts the lines of the Shared's log that contain msg.
func (sh *sharedHarness) logLines(msg string) int {
	sh.logMu.Lock()
	defer sh.logMu.Unlock()
	return strings.Count(sh.log.String(), msg)
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *strings.Builder
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func TestSharedFIFO(t *testing.T) {
	h := newSharedHarness(t, "*.test=5r/s,burst=1,wait=30s")
	p := h.now("h.test")
	assert.Equal(t, "*.test", p.Rule())
	defer p.Release()
	assert.Equal(t, []string{"*.test/h.test"}, h.store.asked(), "one key per rule and host")

	h.launch("b", "H.Test:443", 1) // refused: asks again in 200ms
	h.launch("c", "h.test", 2)
	h.launch("d", "h.test.", 3)
	assert.Len(t, h.store.asked(), 2, "only the head asks the store")
	for i, name := range []string{"b", "c", "d"} {
		h.timerAt(time.Duration(i+1) * 200 * time.Millisecond)
		h.clock.Advance(199 * time.Millisecond)
		h.none()
		h.clock.Advance(time.Millisecond)
		h.passed(name, time.Duration(i+1)*200*time.Millisecond)
	}
	h.blocked(0)
	h.now("other.test").Release() // a bucket of its own
	assert.Equal(t, "*.test/other.test", h.store.asked()[len(h.store.asked())-1])
	st := h.shared.Stats()
	assert.True(t, st.Shared)
	assert.Equal(t, uint64(8), st.Decisions, "a, b twice, c twice, d twice, other")
	assert.Zero(t, st.LocalDecisions)
}

// Two instances draw from one bucket: together they get the rule's rate.
func TestSharedAcrossInstances(t *testing.T) {
	h := newSharedHarness(t, "h.test=5r/s,burst=2,wait=30s")
	other := h.instance(t, "h.test=5r/s,burst=2,wait=30s")
	h.now("h.test").Release()
	p, err := other.Acquire(context.Background(), "h.test")
	require.NoError(t, err)
	p.Release() // the burst is spent, across both

	h.launch("a", "h.test", 1)
	go func() {
		p, err := other.Acquire(context.Background(), "h.test")
		h.out <- result{"b", p, err}
	}()
	asleep := func(n int64) {
		for end := time.Now().Add(5 * time.Second); h.s.blocked.Load()+other.blocked.Load() != n; {
			require.False(t, time.Now().After(end), "want %d asleep", n)
			time.Sleep(50 * time.Microsecond)
		}
	}
	asleep(2)
	h.clock.Advance(200 * time.Millisecond)
	r := h.next() // one of them gets the token at 200ms, the other at 400ms
	require.NoError(t, r.err)
	r.p.Release()
	asleep(1)
	h.timerAt(400 * time.Millisecond)
	h.none()
	h.clock.Advance(199 * time.Millisecond)
	h.none()
	h.clock.Advance(time.Millisecond)
	r2 := h.next()
	require.NoError(t, r2.err)
	assert.NotEqual(t, r.name, r2.name)
	assert.Equal(t, 400*time.Millisecond, r2.p.Waited())
	r2.p.Release()
}

func TestSharedTooLong(t *testing.T) {
	t.Run("the store's retry is past the wait", func(t *testing.T) {
		h := newSharedHarness(t, "h.test=1r/s,wait=500ms")
		h.now("h.test").Release()
		h.launch("b", "h.test", 0) // refused for 1s, rejected at once
		rej, ok := errors.AsType[*RejectError](h.failed("b"))
		require.True(t, ok)
		assert.Equal(t, &RejectError{Host: "h.test", Rule: "h.test", RetryAfter: time.Second,
			Reason: "rate limit for h.test: would wait longer than 500ms"}, rej)
	})
	t.Run("no room behind the head", func(t *testing.T) {
		h := newSharedHarness(t, "h.test=1r/s,wait=1s")
		h.now("h.test").Release()
		h.launch("b", "h.test", 1) // asks again at 1s
		rej := h.rejected("h.test")
		assert.Equal(t, 2*time.Second, rej.RetryAfter, "1s for b, then 1s for it")
		h.clock.Advance(time.Second)
		h.passed("b", time.Second)
	})
	t.Run("line full", func(t *testing.T) {
		h := newSharedHarness(t, "h.test=5r/s")
		h.s.maxLine = 1
		h.now("h.test").Release()
		h.launch("b", "h.test", 1)
		assert.Equal(t, "too many requests waiting for h.test", h.rejected("h.test").Reason)
		h.clock.Advance(200 * time.Millisecond)
		h.passed("b", 200*time.Millisecond)
	})
}

func TestSharedCancel(t *testing.T) {
	h := newSharedHarness(t, "h.test=5r/s,wait=10s")
	h.now("h.test").Release()
	b := h.launch("b", "h.test", 1)
	h.launch("c", "h.test", 2)
	b()
	assert.ErrorIs(t, h.failed("b"), context.Canceled)
	h.timerAt(200 * time.Millisecond) // c is the head, refused until 200ms
	h.clock.Advance(200 * time.Millisecond)
	h.passed("c", 200*time.Millisecond)
	h.blocked(0)
	assert.Zero(t, h.shared.Stats().Errors)
}

func TestSharedPushback(t *testing.T) {
	h := newSharedHarness(t, "h.test=5r/s,wait=4s")
	h.launch("a", "h.test", 0)
	h.passed("a", 0)
	h.launch("b", "h.test", 1)
	h.launch("c", "h.test", 2)
	h.clock.Advance(100 * time.Millisecond)
	assert.True(t, h.s.Pushback("h.test", 3*time.Second)) // b and c can wait
	h.timerAt(3100 * time.Millisecond)
	h.clock.Advance(2999 * time.Millisecond)
	h.none()
	h.clock.Advance(time.Millisecond)
	h.passed("b", 3100*time.Millisecond)
	h.timerAt(3300 * time.Millisecond)
	h.s.Pushback("h.test", 5*time.Second) // past c's deadline, 4.1s
	rej, ok := errors.AsType[*RejectError](h.failed("c"))
	require.True(t, ok)
	assert.Equal(t, "h.test asked to slow down (Retry-After)", rej.Reason)
	assert.Equal(t, 5*time.Second, rej.RetryAfter)
	h.blocked(0)
}

// A store that fails: decisions go in-process, logged once and counted,
// and back to the store once it answers a try.
func TestSharedFallback(t *testing.T) {
	h := newSharedHarness(t, "h.test=5r/s,burst=2,wait=10s")
	h.now("h.test").Release()
	h.store.set(true, false)

	h.now("h.test").Release() // the store fails: the local bucket, full, lets it go
	h.now("h.test").Release()
	h.launch("c", "h.test", 1) // the local bucket is empty
	h.timerAt(200 * time.Millisecond)
	h.clock.Advance(200 * time.Millisecond)
	h.passed("c", 200*time.Millisecond)
	st := h.shared.Stats()
	assert.False(t, st.Shared)
	assert.Equal(t, uint64(1), st.Fallbacks)
	assert.Equal(t, uint64(1), st.Errors, "only the first asked the store")
	assert.Equal(t, uint64(4), st.LocalDecisions)
	assert.Equal(t, h.start, st.Since)
	assert.Contains(t, st.LastError, "connection refused")
	assert.Equal(t, 1, h.logLines("limit store fails"))

	// A try a second after the failure fails again: still one line.
	h.clock.Advance(time.Second)
	h.now("h.test").Release()
	st = h.shared.Stats()
	assert.False(t, st.Shared)
	assert.Equal(t, uint64(2), st.Errors)
	assert.Equal(t, uint64(1), st.Fallbacks)
	assert.Equal(t, 1, h.logLines("limit store fails"))

	// Back up: the next try, a second on, goes to the store and stays there.
	h.store.set(false, false)
	h.clock.Advance(500 * time.Millisecond)
	h.now("h.test").Release()
	assert.False(t, h.shared.Stats().Shared, "no try before a second has passed")
	h.clock.Advance(500 * time.Millisecond)
	asked := len(h.store.asked())
	h.now("h.test").Release()
	st = h.shared.Stats()
	assert.True(t, st.Shared)
	assert.Equal(t, h.start.Add(2200*time.Millisecond), st.Since)
	assert.Equal(t, 1, h.logLines("limit store answers again"))
	h.clock.Advance(200 * time.Millisecond)
	h.now("h.test").Release()
	assert.Len(t, h.store.asked(), asked+2)
}

// A store that does not answer is given up after the timeout; the request
// goes on.
func TestSharedTimeout(t *testing.T) {
	h := newSharedHarness(t, "h.test=5r/s")
	h.store.set(false, true)
	h.now("h.test").Release()
	st := h.shared.Stats()
	assert.False(t, st.Shared)
	assert.Equal(t, "no answer within "+h.shared.timeout.String(), st.LastError, "what egressctl stats shows, not \"context deadline exceeded\"")
}

// A client that leaves while the store is asked says nothing of the store.
func TestSharedClientLeaves(t *testing.T) {
	h := newSharedHarness(t, "h.test=5r/s")
	h.shared.timeout = time.Minute
	h.store.set(false, true)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, err := h.s.Acquire(ctx, "h.test")
		done <- err
	}()
	for end := time.Now().Add(5 * time.Second); len(h.store.asked()) == 0; {
		require.False(t, time.Now().After(end), "the store was not asked")
		time.Sleep(50 * time.Microsecond)
	}
	cancel()
	assert.ErrorIs(t, <-done, context.Canceled)
	st := h.shared.Stats()
	assert.True(t, st.Shared)
	assert.Zero(t, st.Errors)
	h.store.set(false, false)
	h.now("h.test").Release()
}
