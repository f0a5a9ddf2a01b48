package netutil

import (
	"context"
	"net/netip"
)

// What the tests of package netutil_test (those that need netutil/kernel,
// which imports netutil) see of netutil's inside.

var (
	TimedOut    = timedOut
	ErrNoAnswer = errNoAnswer
	AddrStates  = addrStates
)

// Fill is Pool.fill: ready addresses added now, without Run.
func (p *Pool) Fill(ctx context.Context) error { return p.fill(ctx) }

// NextReady returns the ready address the next Acquire takes, if any.
func (p *Pool) NextReady() (netip.Addr, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.ready) == 0 {
		return netip.Addr{}, false
	}
	return p.ready[0], true
}

// Excluded reports whether a is never drawn.
func (p *Pool) Excluded(a netip.Addr) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.exclude[a]
	return ok
}

// Settled is Pool.settled.
func (p *Pool) Settled() []AddrInfo { return p.settled() }

// FollowerAddr returns the address callback of a follower of uplink for p,
// as Follow makes one, for a test to hand it an event itself.
func (p *Pool) FollowerAddr(uplink Uplink) func(AddrUpdate) {
	f := &follower{p: p, uplink: uplink, name: uplink.Name(), addrs: true}
	return f.addr
}

// IsLost is Lease.isLost.
func (l *Lease) IsLost() bool { return l.isLost() }
