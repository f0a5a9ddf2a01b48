package proxy

import (
	"context"
	"net/http"
	"net/netip"
	"runtime"
	"sync"
	"time"

	"github.com/egressd/egressd/proxy/auth"
	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/stats"
	"golang.org/x/time/rate"
)

// Failed logins are throttled per client address: bcrypt costs about 71 ms
// of CPU per check at cost 10, so unthrottled guessing from one client keeps
// a core busy (41 guesses a second measured 197% CPU on 2 cores) and
// guesses as fast as the CPU allows. After loginFreeFailures failures in a
// row an address may try once every loginEvery; an attempt before its turn
// is answered 429 with Retry-After without checking the password at all.
// A check that passes, the only way out, forgets the address's failures.
// Logins found in the cache of successful checks (auth.Users.Cached) never
// wait: a client that shares its address with a guesser keeps working.
//
// On top of that, at most GOMAXPROCS bcrypt checks run at once, so that a
// flood from many addresses, each within its budget, leaves the proxy CPU
// to serve others.
const (
	loginFreeFailures = 10
	loginEvery        = 6 * time.Second
	// loginTableMax bounds the addresses whose failures are remembered;
	// loginForget is when an address's failures are forgotten without a
	// success.
	loginTableMax = 10000
	loginForget   = 10 * time.Minute
)

// loginGuard throttles failed logins per client address (see above).
type loginGuard struct {
	slots chan struct{} // bcrypt checks running
	now   func() time.Time

	mu sync.Mutex
	m  map[netip.Addr]*loginFailures
}

// loginFailures are an address's failed logins in a row.
type loginFailures struct {
	n    int
	last time.Time
	lim  *rate.Limiter // from the loginFreeFailures-th failure on
}

func newLoginGuard() *loginGuard {
	return &loginGuard{
		slots: make(chan struct{}, runtime.GOMAXPROCS(0)),
		now:   time.Now,
		m:     make(map[netip.Addr]*loginFailures),
	}
}

// wait reports, for an address past its free failures, how long until it
// may try again (0: now, and the attempt takes its turn).
func (g *loginGuard) wait(addr netip.Addr) time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	f := g.m[addr]
	if f == nil || f.lim == nil {
		return 0
	}
	now := g.now()
	r := f.lim.ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return d
	}
	return 0
}

// failed counts a failed login from addr.
func (g *loginGuard) failed(addr netip.Addr) {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	f := g.m[addr]
	if f == nil {
		if len(g.m) >= loginTableMax {
			g.sweepLocked(now)
		}
		f = &loginFailures{}
		g.m[addr] = f
	}
	f.n++
	f.last = now
	if f.n >= loginFreeFailures && f.lim == nil {
		// The turn of the failure just made is taken: the next try is
		// loginEvery away.
		f.lim = rate.NewLimiter(rate.Every(loginEvery), 1)
		f.lim.AllowN(now, 1)
	}
}

// succeeded forgets addr's failures.
func (g *loginGuard) succeeded(addr netip.Addr) {
	g.mu.Lock()
	delete(g.m, addr)
	g.mu.Unlock()
}

// sweepLocked makes room in a full table: it forgets addresses that failed
// long ago, and if that is not enough, any one address.
func (g *loginGuard) sweepLocked(now time.Time) {
	for a, f := range g.m {
		if now.Sub(f.last) >= loginForget {
			delete(g.m, a)
		}
	}
	for a := range g.m {
		if len(g.m) < loginTableMax {
			break
		}
		delete(g.m, a)
	}
}

// check runs fn, a bcrypt check, in one of the slots, waiting for one
// while ctx allows. It reports false, without running fn, if ctx ended
// first.
func (g *loginGuard) check(ctx context.Context, fn func() bool) (ok, ran bool) {
	select {
	case g.slots <- struct{}{}:
	case <-ctx.Done():
		return false, false
	}
	defer func() { <-g.slots }()
	return fn(), true
}

// loginResult is the outcome of a login attempt.
type loginResult int

const (
	loginOK        loginResult = iota
	loginFailed                // wrong user name or password
	loginThrottled             // too many failures from the address: not checked
	loginGone                  // the client went away while waiting for a check
)

// login checks user and pass against users for a client at addr, throttling
// failures (see loginGuard). retry is, when throttled, how long until the
// address may try again.
func (s *Server) login(ctx context.Context, addr netip.Addr, users *auth.Users, user, pass string) (_ loginResult, retry time.Duration) {
	if users.Cached(user, pass) {
		return loginOK, 0
	}
	addr = addr.Unmap()
	if d := s.logins.wait(addr); d > 0 {
		return loginThrottled, d
	}
	ok, ran := s.logins.check(ctx, func() bool { return users.Verify(user, pass) })
	switch {
	case !ran:
		return loginGone, 0
	case ok:
		s.logins.succeeded(addr)
		return loginOK, 0
	}
	s.logins.failed(addr)
	return loginFailed, 0
}

// errLoginThrottled answers an attempt to log in from an address that
// failed too often, before its turn.
func errLoginThrottled(retry time.Duration) *Error {
	e := clientRefusal(stats.RefusedLoginThrottled, http.StatusTooManyRequests, typeRequestDenied,
		"too many failed logins from this address: try again in %d s", shape.RetryAfterSeconds(retry))
	e.retryAfter = retry
	return e
}
