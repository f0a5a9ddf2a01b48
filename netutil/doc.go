// Package netutil is the address side of egressd: drawing addresses in a
// prefix, the pool of egress addresses added to an interface (through an
// AddrManager: netutil/kernel's netlink one), the destination guard, and the
// dialer that binds every upstream connection to a fresh one. It never talks
// to netlink itself: netutil/kernel does, and feeds the pool and the guard
// the host's events through the Events and Uplink interfaces. A host
// with no IPv6 address at all is dialed over IPv4 from the host's own address,
// or refused, as the dialer's IPv4Policy says.
//
// It knows nothing of HTTP. The proxy package receives a dial function built
// here and learns about failures only through the sentinel errors below.
package netutil

import (
	"errors"
	"fmt"
)

// ErrNoAddress is wrapped by every error that means no fresh egress address
// could be had for a connection: the pool is at its limit, the kernel refused to
// add an address, the kernel refused to bind one, the uplink is down, or
// routed mode's local route is missing. A caller must fail the request rather
// than fall back to another source address.
var ErrNoAddress = errors.New("no fresh egress address")

// ErrNoIPv6 is wrapped by the error of a dial to a host that has IPv4
// addresses only (or is an IPv4 literal) when the Dialer may not go over
// IPv4 (IPv4Deny).
var ErrNoIPv6 = errors.New("no IPv6 address")

// ErrDenied is wrapped by the error of a dial to a destination the Dialer
// refuses (Dialer.Deny): the host's loopback, egressd's own prefix, and the
// like, which a client must not reach through the proxy.
var ErrDenied = errors.New("destination not allowed")

// Unavailable is the cause, wrapped together with ErrNoAddress, of a pool
// that hands out no address for a reason its clients may be told: the
// uplink is down, routed mode's local route is missing, -max-addrs is
// reached, egressd is shutting down. Its text never names an egress
// address.
type Unavailable struct{ Reason string }

func (e *Unavailable) Error() string { return e.Reason }

// unavailable returns an error wrapping ErrNoAddress and an *Unavailable
// with the reason.
func unavailable(format string, args ...any) error {
	return fmt.Errorf("%w: %w", ErrNoAddress, &Unavailable{Reason: fmt.Sprintf(format, args...)})
}
