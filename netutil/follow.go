package netutil

import (
	"fmt"
	"net/netip"
	"time"
)

// faultUplink is the pool's fault while the uplink is down.
const faultUplink = "uplink"

// Follow keeps the pool's view of its uplink (the interface egress traffic
// leaves by) true from w's events, until cancel is called:
//
//   - An address of the pool that somebody else removed from the uplink is
//     forgotten, and never removed again. If it was in use, the
//     connections bound to it are ended (the kernel leaves them open,
//     sending into the void), and the holder's next connection gets a
//     fresh address.
//   - An address of the prefix that appears anywhere on the host and is not
//     an egress address (one a person, SLAAC or a network manager adds) is
//     never drawn.
//   - While the uplink is down (administratively, or its carrier lost) or
//     gone, the pool is suspended: new connections fail at once with an
//     error wrapping ErrNoAddress that says "uplink NAME is down" instead of
//     each waiting for its dial timeout, and the refiller waits. When it is
//     up again the pool resumes by itself.
//
// In routed mode (the pool's manager is NoAddrs) the pool's addresses are on
// no interface, and only the uplink's state counts.
func (p *Pool) Follow(w Events, uplink Uplink) (cancel func()) {
	_, routed := p.mgr.(NoAddrs)
	f := &follower{p: p, uplink: uplink, name: uplink.Name(), addrs: !routed}
	return w.Subscribe(Subscriber{Addr: f.addr, Link: f.link, Synced: f.synced})
}

// follower is a pool's subscriber to an Events source. Its methods run one
// at a time.
type follower struct {
	p      *Pool
	uplink Uplink
	name   string
	addrs  bool // the pool's addresses are on the uplink

	// The uplink's addresses as last listed, and when, and whether it was
	// up then: a burst of removals (the kernel flushes every address when
	// an interface goes down) is checked against one listing.
	listed  time.Time
	present map[netip.Addr]bool
	down    bool
}

func (f *follower) link(u LinkUpdate) {
	if u.Index != f.uplink.Index() {
		return
	}
	if u.Name != "" {
		f.name = u.Name
	}
	if u.Up() {
		if f.p.Resume(faultUplink) {
			f.p.log.Info("uplink is up again: handing out egress addresses", "interface", f.name)
		}
		return
	}
	err := fmt.Errorf("uplink %s is down", f.name)
	if u.Removed {
		err = fmt.Errorf("uplink %s is gone", f.name)
	}
	if f.p.Suspend(faultUplink, err) {
		f.p.log.Warn("uplink is down: new connections fail closed until it is up again", "interface", f.name, "state", u.State())
	}
}

func (f *follower) addr(u AddrUpdate) {
	a := u.Addr()
	if !f.p.contains(a) {
		return
	}
	if u.Added {
		if !u.LooksLikeEgress() {
			f.p.avoid(a)
		}
		return
	}
	if !f.addrs || u.LinkIndex != f.uplink.Index() {
		return
	}
	// The pool's own removals find the address gone from the pool, or
	// being removed. A removal reported late, of an address the pool has
	// since drawn and added again, would look like somebody else's: the
	// kernel has the last word.
	added, ok := f.p.settledSince(a)
	if !ok || !f.gone(a, added) {
		return
	}
	f.forget(a)
}

// synced checks every address of the pool against a fresh listing: events
// lost in an overflow may have hidden a removal.
func (f *follower) synced() {
	if !f.addrs {
		return
	}
	if err := f.list(); err != nil {
		f.p.log.Warn("checking egress addresses", "interface", f.name, "err", err)
		return
	}
	for _, info := range f.p.settled() {
		if info.Added.Before(f.listed) && !f.present[info.Addr] {
			f.forget(info.Addr)
		}
	}
}

func (f *follower) forget(a netip.Addr) {
	if !f.p.lost(a, nil) {
		return
	}
	// When the interface goes down the kernel flushes every address: the
	// uplink's warning says it all. Its link event may come after the
	// address events (they come on sockets of their own), the listing
	// tells.
	if f.p.Usable() == nil && !f.down {
		f.p.log.Warn("egress address removed by somebody else: forgotten, its connections ended", "addr", a, "interface", f.name)
	} else {
		f.p.log.Debug("egress address removed with the uplink down: forgotten, its connections ended", "addr", a, "interface", f.name)
	}
}

// gone reports whether a, which the kernel had added at added, is no longer
// on the uplink. A listing made since that lacks it settles it; otherwise
// the uplink is listed again.
func (f *follower) gone(a netip.Addr, added time.Time) bool {
	if f.listed.After(added) && !f.present[a] {
		return true
	}
	if err := f.list(); err != nil {
		f.p.log.Warn("checking egress addresses", "interface", f.name, "err", err)
		return true // trust the event
	}
	return !f.present[a]
}

func (f *follower) list() error {
	start := f.p.now()
	addrs, up, err := f.uplink.Check()
	if err != nil {
		return err
	}
	f.present = make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		f.present[a] = true
	}
	f.listed = start
	f.down = !up
	return nil
}
