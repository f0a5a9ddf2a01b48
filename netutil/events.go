package netutil

import (
	"net/netip"

	"golang.org/x/sys/unix"
)

// The host's network as the Pool (Follow) and the Guard (Follow) hear of it:
// the events and the two small interfaces they consume. netutil/kernel
// implements them over netlink (kernel.Watcher, kernel.Netlink); netutil
// itself never talks to the kernel's routing side.

// EgressFlags are the IFA_F_* flags of every address egressd adds: usable at
// once (no duplicate address detection, which would keep it tentative for a
// second or two) and without a prefix route of its own.
const EgressFlags = unix.IFA_F_NODAD | unix.IFA_F_NOPREFIXROUTE

// AddrUpdate is an address of the namespace, IPv4 or IPv6, on any
// interface, that appeared, changed or went away.
type AddrUpdate struct {
	// Added is set when the address is there (new, or its flags or
	// lifetimes changed), clear when it went away.
	Added bool
	// Prefix is the address with its prefix length. IPv4 addresses are
	// plain IPv4 addresses, never IPv4-mapped ones.
	Prefix netip.Prefix
	// LinkIndex is the interface the address is on.
	LinkIndex int
	// Flags are its IFA_F_* flags (IFA_F_TENTATIVE, IFA_F_DEPRECATED, …).
	Flags int
	// Scope is its RT_SCOPE_* scope.
	Scope int
}

// Addr returns the address itself.
func (u AddrUpdate) Addr() netip.Addr { return u.Prefix.Addr() }

// LooksLikeEgress reports whether the address has the shape of those
// egressd adds (a /128 with EgressFlags): the pool's own, reported as they
// come and go.
func (u AddrUpdate) LooksLikeEgress() bool {
	return u.Prefix.Bits() == 128 && u.Flags&EgressFlags == EgressFlags
}

// OperState is an interface's RFC 2863 operational state (IF_OPER_*, as
// the kernel reports it).
type OperState uint8

// The operational states.
const (
	OperUnknown OperState = iota
	OperNotPresent
	OperDown
	OperLowerLayerDown
	OperTesting
	OperDormant
	OperUp
)

func (s OperState) String() string {
	switch s {
	case OperNotPresent:
		return "not-present"
	case OperDown:
		return "down"
	case OperLowerLayerDown:
		return "lower-layer-down"
	case OperTesting:
		return "testing"
	case OperDormant:
		return "dormant"
	case OperUp:
		return "up"
	}
	return "unknown"
}

// LinkUpdate is the state of an interface of the namespace.
type LinkUpdate struct {
	Index int
	Name  string
	// Removed is set when the interface is gone.
	Removed bool
	// Flags are its IFF_* flags (IFF_UP, IFF_LOWER_UP, IFF_RUNNING, …).
	Flags uint32
	// OperState is its operational state; a link whose carrier is lost is
	// up (IFF_UP) but OperDown.
	OperState OperState
}

// Up reports whether the interface can pass packets: administratively up
// (IFF_UP), and not operationally down (no carrier), down because of a
// lower layer, or missing a component.
func (u LinkUpdate) Up() bool {
	if u.Removed || u.Flags&unix.IFF_UP == 0 {
		return false
	}
	switch u.OperState {
	case OperDown, OperLowerLayerDown, OperNotPresent:
		return false
	}
	return true
}

// State describes the link for a log line: "up", or why it is down.
func (u LinkUpdate) State() string {
	switch {
	case u.Removed:
		return "removed"
	case u.Flags&unix.IFF_UP == 0:
		return "admin-down"
	case !u.Up():
		return u.OperState.String()
	}
	return "up"
}

// Subscriber is what one user of an Events source wants to hear; nil
// callbacks are skipped. Callbacks run one at a time, in the kernel's order
// of events, on the source's goroutine (or, for the replay, on Subscribe's
// caller), and must neither block nor call Subscribe or its cancel
// function: a slow callback makes the kernel drop events, which costs a
// resync.
//
// A callback may see an event again (the kernel reports a refreshed
// lifetime as a new address) or, just after a resync, an event that the
// resync already accounted for: handling each as "this is the state now"
// keeps a subscriber right.
type Subscriber struct {
	// Addr hears of every address that appears, changes or goes away.
	Addr func(AddrUpdate)
	// Link hears of every interface whose state changes, and of every
	// interface after each resync.
	Link func(LinkUpdate)
	// Synced is called after each listing of the state: once the watch
	// has started, and again after events were lost.
	Synced func()
}

// Events is a source of the namespace's address and link events
// (kernel.Watcher). Subscribe adds s, which hears at once of every link and
// address known so far (and Synced, if the state has been listed), then of
// every change. The returned function ends the subscription: no callback
// of s runs after it returns.
type Events interface {
	Subscribe(s Subscriber) (cancel func())
}

// Uplink is the interface egress traffic leaves by, as Pool.Follow checks
// it (kernel.Netlink).
type Uplink interface {
	// Index is the interface's index, as AddrUpdate.LinkIndex and
	// LinkUpdate.Index give it.
	Index() int
	// Name is its name when the pool starts following it.
	Name() string
	// Check lists the IPv6 addresses on it now and reports whether it is
	// up; an interface that cannot be found is down. err is a failure to
	// list the addresses, and names the interface.
	Check() (addrs []netip.Addr, up bool, err error)
}
