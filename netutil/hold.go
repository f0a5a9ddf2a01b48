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
// leases a fresh one.
type holder struct {
	d *Dialer

	mu       sync.Mutex
	lease    *Lease
	released bool
}

// dial connects from the held address; if that address turns out to be
// gone, once more from a fresh one, which the holder keeps.
func (h *holder) dial(ctx context.Context, network, address string) (net.Conn, error) {
	for retried := false; ; retried = true {
		lease, err := h.current(ctx)
		if err != nil {
			return nil, err
		}
		c, err := h.d.DialFrom(ctx, network, address, lease)
		if err == nil || retried || !addrGone(err) {
			return c, err
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
