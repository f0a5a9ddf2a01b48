package netutil

import (
	"context"
	"errors"
	"net"
	"sync"
	"syscall"
)

// holder is an address held for many connections (Dialer.Hold). When the
// address leaves the interface the holder gives it up, and its next dial
// leases another.
type holder struct {
	d *Dialer

	mu       sync.Mutex
	lease    *Lease
	warmFor  *Lease // the never-used lease that lease, a warm one, replaced
	released bool
}

// dial connects from the held address; if that address turns out to be
// gone, once more from a fresh one, which the holder keeps. If the first
// connection from a never-used address gets no answer (see DialContext), the
// holder takes a warm address instead and tries once more from it.
func (h *holder) dial(ctx context.Context, network, address string) (net.Conn, error) {
	for retried := false; ; retried = true {
		lease, err := h.current(ctx)
		if err != nil {
			return nil, err
		}
		c, err := h.d.dialFrom(ctx, network, address, lease, !retried)
		switch {
		case err == nil || retried:
			if err == nil && retried && h.swapped(lease) {
				h.d.Pool.overflowed()
			}
			return c, err
		case errors.Is(err, errNoAnswer):
			h.d.Pool.retried()
			if werr := h.swap(ctx, lease); werr != nil {
				return nil, err
			}
		case !addrGone(err):
			return nil, err
		}
	}
}

// current returns the held lease, first replacing it with a fresh one if its
// address is gone.
func (h *holder) current(ctx context.Context) (*Lease, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.released {
		return nil, errReleased
	}
	if h.lease.isLost() {
		lease, err := h.d.Pool.Acquire(ctx)
		if err != nil {
			return nil, err // the lost lease stays, to be replaced next time
		}
		h.lease.Release()
		h.lease = lease
	}
	return h.lease, nil
}

// swap replaces old, the held lease whose never-used address got no answer,
// with a warm one, unless another dial did so already.
func (h *holder) swap(ctx context.Context, old *Lease) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.released {
		return errReleased
	}
	if h.lease != old {
		return nil
	}
	warm, err := h.d.Pool.acquireWarm(ctx)
	if err != nil {
		return err
	}
	h.lease.Release()
	h.lease, h.warmFor = warm, old
	return nil
}

// swapped reports whether lease is the warm one that replaced a never-used
// address, and forgets it: the first connection from it counts once.
func (h *holder) swapped(lease *Lease) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.warmFor == nil || h.lease != lease {
		return false
	}
	h.warmFor = nil
	return true
}

// release gives the held address back once its connections have closed.
func (h *holder) release() {
	h.mu.Lock()
	h.released = true
	lease := h.lease
	h.mu.Unlock()
	lease.Release()
}

// addrGone reports whether a dial failed because its source address is no
// longer on the interface: the bind said EADDRNOTAVAIL, or the pool heard
// of the loss first.
func addrGone(err error) bool {
	return errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, errLost)
}

// abort ends c at once, with a reset, while its owner may still be using
// it: its source address is gone, so nothing sent to it can arrive. The
// owner closes it as usual afterwards.
func (c *Conn) abort() {
	_ = c.TCPConn.SetLinger(0)
	_ = c.TCPConn.Close()
}

// unref counts c, a DialFrom connection that closed, off its lease.
func (c *Conn) unref() { c.lease.unref(c) }
