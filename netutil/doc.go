// Package netutil is the address side of egressd: drawing addresses in a
// prefix, the pool of egress addresses added to an interface with netlink,
// and the dialer that binds every upstream connection to a fresh one.
//
// It knows nothing of HTTP. The proxy package receives a dial function built
// here and learns about failures only through the sentinel errors below.
package netutil

import "errors"

// ErrNoAddress is wrapped by every error that means no fresh egress address
// could be had for a connection: the pool is at its limit, netlink refused to
// add an address, or the kernel refused to bind one. A caller must fail the
// request rather than fall back to another source address.
var ErrNoAddress = errors.New("no fresh egress address")
