package shape

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// result is what an Acquire in a goroutine came back with.
type result struct {
	name string
	p    Permit
	err  error
}

// harness runs Acquires in goroutines against a shaper on a fake clock.
type harness struct {
	t     *testing.T
	clock *fakeClock
	start time.Time // the clock's time when the test began
	s     *Shaper
	out   chan result
}

func newHarness(t *testing.T, rules ...string) *harness {
	clock := newFakeClock()
	return &harness{t: t, clock: clock, start: clock.Now(), s: newShaper(t, clock, rules...), out: make(chan result, 100)}
}

// now acquires host in this goroutine and requires it to pass at once.
func (h *harness) now(host string) Permit {
	h.t.Helper()
	p, err := h.s.Acquire(context.Background(), host)
	require.NoError(h.t, err)
	assert.Zero(h.t, p.Waited())
	return p
}

// rejected acquires host and requires a *RejectError at once.
func (h *harness) rejected(host string) *RejectError {
	h.t.Helper()
	_, err := h.s.Acquire(context.Background(), host)
	rej, ok := errors.AsType[*RejectError](err)
	require.True(h.t, ok, "want a *RejectError, got %v", err)
	return rej
}

// launch starts an Acquire of host named name, and returns once it sleeps,
// that is once the shaper counts blocked goroutines. Goroutines are started
// one at a time, so their order in line is known. The Acquire ends with
// cancel if the test has not ended it before.
func (h *harness) launch(name, host string, blocked int64) context.CancelFunc {
	h.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	h.t.Cleanup(cancel)
	go func() {
		p, err := h.s.Acquire(ctx, host)
		h.out <- result{name, p, err}
	}()
	h.blocked(blocked)
	return cancel
}

// blocked waits until n goroutines sleep in the shaper.
func (h *harness) blocked(n int64) {
	h.t.Helper()
	for end := time.Now().Add(5 * time.Second); h.s.blocked.Load() != n; {
		if time.Now().After(end) {
			h.t.Fatalf("blocked: have %d goroutines asleep, want %d", h.s.blocked.Load(), n)
		}
		time.Sleep(50 * time.Microsecond)
	}
}

// timerAt waits until a goroutine has set a timer for at after the start.
// A goroutine that sets a new timer after an event must have done so before
// the test moves the clock, as Clock.NewTimer takes a duration from now.
func (h *harness) timerAt(at time.Duration) {
	h.t.Helper()
	want := h.start.Add(at)
	for end := time.Now().Add(5 * time.Second); !h.clock.hasTimer(want); {
		if time.Now().After(end) {
			h.t.Fatalf("no timer set for %v after the start", at)
		}
		time.Sleep(50 * time.Microsecond)
	}
}

// next returns the next Acquire to come back.
func (h *harness) next() result {
	h.t.Helper()
	select {
	case r := <-h.out:
		return r
	case <-time.After(5 * time.Second):
		h.t.Fatal("no Acquire came back")
		return result{}
	}
}

// passed requires the next Acquire back to be name's, let through after
// waiting exactly waited, and releases it.
func (h *harness) passed(name string, waited time.Duration) {
	h.t.Helper()
	h.got(name, waited).Release()
}

// got is passed without the release.
func (h *harness) got(name string, waited time.Duration) Permit {
	h.t.Helper()
	r := h.next()
	require.Equal(h.t, name, r.name, "order")
	require.NoError(h.t, r.err)
	assert.Equal(h.t, waited, r.p.Waited(), "%s waited", name)
	return r.p
}

// failed requires the next Acquire back to be name's, with an error.
func (h *harness) failed(name string) error {
	h.t.Helper()
	r := h.next()
	require.Equal(h.t, name, r.name, "order")
	require.Error(h.t, r.err)
	return r.err
}

// none requires that no Acquire has come back.
func (h *harness) none() {
	h.t.Helper()
	select {
	case r := <-h.out:
		h.t.Fatalf("%s came back early: %+v", r.name, r)
	default:
	}
}

// finish cancels whatever still waits and collects it.
func (h *harness) finish(cancels ...context.CancelFunc) {
	h.t.Helper()
	for _, c := range cancels {
		c()
	}
	for range cancels {
		r := h.next()
		if r.err == nil {
			r.p.Release()
		}
	}
}

func TestAcquireUnshaped(t *testing.T) {
	h := newHarness(t, "*.example.org=1r/s")
	for range 3 {
		p := h.now("example.org")
		assert.Equal(t, Permit{}, p)
		assert.Empty(t, p.Rule())
		p.Release()
	}
	Permit{}.Release() // no-op
}

func TestAcquireFIFO(t *testing.T) {
	h := newHarness(t, "h.test=5r/s,burst=1,wait=30s")
	p := h.now("h.test")
	assert.Equal(t, "h.test", p.Rule())
	defer p.Release()

	h.launch("b", "H.Test:443", 1)
	h.launch("c", "h.test", 2)
	h.launch("d", "h.test.", 3)
	assert.Equal(t, 1, h.clock.pending(), "only the head of the line sets a timer")

	for i, name := range []string{"b", "c", "d"} {
		h.timerAt(time.Duration(i+1) * 200 * time.Millisecond)
		h.clock.Advance(199 * time.Millisecond)
		h.none()
		h.clock.Advance(time.Millisecond)
		h.passed(name, time.Duration(i+1)*200*time.Millisecond)
	}
	h.blocked(0)
}

func TestAcquireTooLong(t *testing.T) {
	tests := []struct {
		name   string
		rule   string
		queued int           // requests that fit in line after the first
		retry  time.Duration // for the one after them
		reason string
	}{
		{"rounded up", "h.test=2r/s,wait=1s", 2, 2 * time.Second, "rate limit for h.test: would wait longer than 1s"},
		{"at least a second", "h.test=10r/s,wait=0", 0, time.Second, "rate limit for h.test: would wait longer than 0s"},
		{"slow rate", "h.test=1r/m,wait=90s", 1, 2 * time.Minute, "rate limit for h.test: would wait longer than 1m30s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, tt.rule)
			defer h.now("h.test").Release()
			var cancels []context.CancelFunc
			for i := range tt.queued {
				cancels = append(cancels, h.launch(fmt.Sprint(i), "h.test", int64(i+1)))
			}
			rej := h.rejected("h.test")
			assert.Equal(t, &RejectError{Host: "h.test", Rule: "h.test", RetryAfter: tt.retry, Reason: tt.reason}, rej)
			assert.Equal(t, tt.reason, rej.Error())
			h.finish(cancels...)
		})
	}
}

func TestAcquireLineFull(t *testing.T) {
	h := newHarness(t, "h.test=5r/s")
	h.s.maxLine = 2
	defer h.now("h.test").Release()
	b := h.launch("b", "h.test", 1)
	c := h.launch("c", "h.test", 2)
	rej := h.rejected("h.test")
	assert.Equal(t, "too many requests waiting for h.test", rej.Reason)
	assert.Equal(t, time.Second, rej.RetryAfter, "600ms rounded up")
	h.finish(b, c)
}

func TestAcquireCancel(t *testing.T) {
	t.Run("head", func(t *testing.T) {
		h := newHarness(t, "h.test=5r/s")
		defer h.now("h.test").Release()
		b := h.launch("b", "h.test", 1)
		h.launch("c", "h.test", 2)
		b()
		assert.ErrorIs(t, h.failed("b"), context.Canceled)
		h.timerAt(200 * time.Millisecond)
		h.clock.Advance(200 * time.Millisecond)
		h.passed("c", 200*time.Millisecond) // b's slot
	})
	t.Run("middle", func(t *testing.T) {
		h := newHarness(t, "h.test=5r/s")
		defer h.now("h.test").Release()
		h.launch("b", "h.test", 1)
		c := h.launch("c", "h.test", 2)
		h.launch("d", "h.test", 3)
		c()
		assert.ErrorIs(t, h.failed("c"), context.Canceled)
		h.blocked(2)
		h.clock.Advance(200 * time.Millisecond)
		h.passed("b", 200*time.Millisecond)
		h.timerAt(400 * time.Millisecond)
		h.clock.Advance(200 * time.Millisecond)
		h.passed("d", 400*time.Millisecond) // c's slot
	})
	t.Run("last, then a newcomer", func(t *testing.T) {
		h := newHarness(t, "h.test=5r/s")
		defer h.now("h.test").Release()
		h.launch("b", "h.test", 1)
		c := h.launch("c", "h.test", 2)
		c()
		assert.ErrorIs(t, h.failed("c"), context.Canceled)
		h.blocked(1)
		h.launch("e", "h.test", 2)
		h.clock.Advance(200 * time.Millisecond)
		h.passed("b", 200*time.Millisecond)
		h.timerAt(400 * time.Millisecond)
		h.clock.Advance(200 * time.Millisecond)
		h.passed("e", 400*time.Millisecond)
	})
	t.Run("already done", func(t *testing.T) {
		h := newHarness(t, "h.test=5r/s")
		defer h.now("h.test").Release()
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := h.s.Acquire(ctx, "h.test")
		assert.ErrorIs(t, err, context.Canceled)
		h.clock.Advance(200 * time.Millisecond)
		h.now("h.test").Release()
	})
}

func TestAcquireConcurrency(t *testing.T) {
	const rule = "h.test=1000r/s,burst=100,concurrency=2,wait=1s"
	t.Run("third waits for a release", func(t *testing.T) {
		h := newHarness(t, rule)
		p1, p2 := h.now("h.test"), h.now("h.test")
		h.launch("c", "h.test", 1)
		h.launch("d", "h.test", 2)
		h.none()
		h.clock.Advance(10 * time.Millisecond)
		h.none()
		p1.Release()
		c := h.got("c", 10*time.Millisecond)
		h.none()
		p2.Release()
		d := h.got("d", 10*time.Millisecond)
		c.Release()
		d.Release()
	})
	t.Run("no slot within wait", func(t *testing.T) {
		h := newHarness(t, rule)
		p1, p2 := h.now("h.test"), h.now("h.test")
		defer p1.Release()
		defer p2.Release()
		h.launch("c", "h.test", 1)
		h.clock.Advance(999 * time.Millisecond)
		h.none()
		h.clock.Advance(time.Millisecond)
		rej, ok := errors.AsType[*RejectError](h.failed("c"))
		require.True(t, ok)
		assert.Equal(t, &RejectError{Host: "h.test", Rule: "h.test", RetryAfter: time.Second,
			Reason: "concurrency limit for h.test: no slot within 1s"}, rej)
	})
	t.Run("cancel while waiting for a slot", func(t *testing.T) {
		h := newHarness(t, rule)
		p1, p2 := h.now("h.test"), h.now("h.test")
		c := h.launch("c", "h.test", 1)
		c()
		assert.ErrorIs(t, h.failed("c"), context.Canceled)
		p1.Release()
		p2.Release()
		h.now("h.test").Release()
	})
	t.Run("rate wait counts against the slot wait", func(t *testing.T) {
		h := newHarness(t, "h.test=2r/s,concurrency=1,wait=1s")
		p := h.now("h.test")
		defer p.Release()
		h.launch("b", "h.test", 1)
		h.clock.Advance(500 * time.Millisecond) // b has its token, not a slot
		h.timerAt(time.Second)
		h.clock.Advance(499 * time.Millisecond)
		h.none()
		h.clock.Advance(time.Millisecond)
		_, ok := errors.AsType[*RejectError](h.failed("b"))
		assert.True(t, ok)
	})
}

func TestPushback(t *testing.T) {
	t.Run("holds until the hold ends", func(t *testing.T) {
		h := newHarness(t, "h.test=5r/s,wait=10s")
		assert.True(t, h.s.Pushback("H.test:443", 3*time.Second))
		h.launch("a", "h.test", 1)
		h.launch("b", "h.test", 2)
		h.clock.Advance(2999 * time.Millisecond)
		h.none()
		h.clock.Advance(time.Millisecond)
		h.passed("a", 3*time.Second)
		h.timerAt(3200 * time.Millisecond)
		h.clock.Advance(199 * time.Millisecond)
		h.none()
		h.clock.Advance(time.Millisecond)
		h.passed("b", 3200*time.Millisecond)
		h.clock.Advance(200 * time.Millisecond)
		h.now("h.test").Release() // the hold is over
	})
	t.Run("rejects when the hold exceeds wait", func(t *testing.T) {
		h := newHarness(t, "h.test=5r/s,wait=10s")
		assert.True(t, h.s.Pushback("h.test", 20*time.Second))
		h.clock.Advance(1500 * time.Millisecond)
		assert.Equal(t, &RejectError{Host: "h.test", Rule: "h.test", RetryAfter: 19 * time.Second,
			Reason: "h.test asked to slow down (Retry-After)"}, h.rejected("h.test"))
	})
	t.Run("at most an hour", func(t *testing.T) {
		h := newHarness(t, "*=5r/s")
		assert.True(t, h.s.Pushback("h.test", 5*time.Hour))
		assert.Equal(t, time.Hour, h.rejected("h.test").RetryAfter)
	})
	t.Run("a shorter hold does not cut a longer one", func(t *testing.T) {
		h := newHarness(t, "*=5r/s")
		assert.True(t, h.s.Pushback("h.test", time.Minute))
		assert.True(t, h.s.Pushback("h.test", time.Second))
		assert.Equal(t, time.Minute, h.rejected("h.test").RetryAfter)
	})
	t.Run("holds only that host", func(t *testing.T) {
		h := newHarness(t, "*.example.org=5r/s")
		assert.True(t, h.s.Pushback("a.example.org", time.Minute))
		h.now("b.example.org").Release()
		h.rejected("a.example.org")
	})
	t.Run("unshaped host: no-op", func(t *testing.T) {
		h := newHarness(t, "*.example.org=5r/s")
		assert.False(t, h.s.Pushback("example.org", time.Minute))
		assert.Equal(t, Permit{}, h.now("example.org"))
		assert.Empty(t, h.s.states)
	})
	t.Run("no time: nothing held", func(t *testing.T) {
		h := newHarness(t, "h.test=5r/s")
		assert.True(t, h.s.Pushback("h.test", 0))
		h.now("h.test").Release()
	})
	t.Run("moves the line back", func(t *testing.T) {
		h := newHarness(t, "h.test=5r/s,wait=10s")
		defer h.now("h.test").Release()
		h.launch("b", "h.test", 1)
		h.launch("c", "h.test", 2)
		h.s.Pushback("h.test", 5*time.Second)
		h.timerAt(5 * time.Second)
		h.clock.Advance(4999 * time.Millisecond)
		h.none()
		h.clock.Advance(time.Millisecond)
		h.passed("b", 5*time.Second) // a full bucket after the hold
		h.timerAt(5200 * time.Millisecond)
		h.clock.Advance(200 * time.Millisecond)
		h.passed("c", 5200*time.Millisecond)
	})
	t.Run("turns away those who cannot wait for it", func(t *testing.T) {
		h := newHarness(t, "h.test=1r/s,wait=6s")
		defer h.now("h.test").Release()
		h.launch("b", "h.test", 1) // 1s
		h.launch("c", "h.test", 2) // 2s
		h.clock.Advance(500 * time.Millisecond)
		// Hold to 5.5s: b goes at 5.5s, c would at 6.5s, past its 6s.
		h.s.Pushback("h.test", 5*time.Second)
		rej, ok := errors.AsType[*RejectError](h.failed("c"))
		require.True(t, ok)
		assert.Equal(t, "rate limit for h.test: would wait longer than 6s", rej.Reason)
		assert.Equal(t, 6*time.Second, rej.RetryAfter)
		// Then a hold past b's deadline.
		h.s.Pushback("h.test", 7*time.Second)
		rej, ok = errors.AsType[*RejectError](h.failed("b"))
		require.True(t, ok)
		assert.Equal(t, "h.test asked to slow down (Retry-After)", rej.Reason)
		assert.Equal(t, 7*time.Second, rej.RetryAfter)
		h.blocked(0)
	})
}

func TestStatePerHost(t *testing.T) {
	h := newHarness(t, "*.example.org=1r/s,burst=2,wait=0")
	for _, host := range []string{"a.example.org", "b.example.org"} {
		t.Run(host, func(t *testing.T) {
			h.now(host).Release()
			h.now(host).Release()
			h.rejected(host)
		})
	}
}

func TestStatesBounded(t *testing.T) {
	h := newHarness(t, "*=1r/s,wait=0")
	h.s.maxStates = 3
	states := func() int {
		h.s.mu.Lock()
		defer h.s.mu.Unlock()
		return len(h.s.states)
	}
	var permits []Permit
	for i := range 3 {
		permits = append(permits, h.now(fmt.Sprintf("h%d.test", i)))
	}
	assert.Equal(t, 3, states())

	// None is idle: the next hosts share the overflow state.
	permits = append(permits, h.now("h3.test"))
	rej := h.rejected("h4.test") // h3 took the overflow's token
	assert.Equal(t, "*", rej.Rule)
	assert.Equal(t, "h4.test", rej.Host)
	assert.Equal(t, 3, states())
	assert.NotNil(t, h.s.overflow[0])

	// Once they are idle, they make room.
	for _, p := range permits {
		p.Release()
	}
	h.clock.Advance(time.Second)
	h.now("h5.test").Release()
	assert.Equal(t, 1, states())
	assert.Contains(t, h.s.states, "h5.test", "a state of its own")
	h.rejected("h5.test")
	h.now("h6.test").Release()

	for i := range 100 {
		h.clock.Advance(time.Second)
		h.s.Acquire(context.Background(), fmt.Sprintf("many%d.test", i))
		assert.LessOrEqual(t, states(), 3)
	}
}

func TestStatesBoundedHolds(t *testing.T) {
	h := newHarness(t, "*=10r/s")
	h.s.maxStates = 2
	assert.True(t, h.s.Pushback("a.test", time.Minute))
	assert.True(t, h.s.Pushback("b.test", time.Minute))
	h.clock.Advance(2 * time.Second)
	h.now("c.test").Release() // overflow: held ones are not idle
	h.rejected("a.test")
	h.clock.Advance(time.Minute)
	h.now("d.test").Release() // the holds are over: room again
	h.now("a.test").Release()
}

// TestSystemClock runs many clients at once on the real clock: every one is
// let through or leaves when told to, and no more than the cap are ever in
// flight. It takes about 10ms.
func TestSystemClock(t *testing.T) {
	s := newShaper(t, nil, "h.test=20000r/s,burst=5,concurrency=3,wait=5s")
	var inFlight, most atomic.Int64
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Go(func() {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if i%10 == 0 {
				cancel() // some clients are gone before they are let through
			}
			p, err := s.Acquire(ctx, "h.test")
			if err != nil {
				assert.ErrorIs(t, err, context.Canceled)
				return
			}
			n := inFlight.Add(1)
			for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
			}
			runtime.Gosched()
			inFlight.Add(-1)
			p.Release()
		})
	}
	wg.Wait()
	assert.LessOrEqual(t, most.Load(), int64(3))
	assert.Zero(t, s.blocked.Load())
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.states["h.test"]
	assert.Zero(t, st.active)
	assert.Zero(t, st.n)
}
