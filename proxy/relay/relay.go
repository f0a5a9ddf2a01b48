// Package relay moves bytes both ways between two connections, for the
// proxy's CONNECT and SOCKS5 tunnels: it passes half-closes through, closes
// both connections after an idle timeout, and between two TCP sockets lets
// the kernel splice the bytes without copying them to user space.
package relay

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrIdle ends a tunnel that carried no byte for its idle timeout.
var ErrIdle = errors.New("tunnel idle timeout")

// Tunnel relays bytes between a client connection and an upstream
// connection, passing half-closes through and closing both after its idle
// timeout without a byte either way.
//
// Between two TCP connections (see tcpConnOf), each direction waits until
// its source has bytes queued, without holding anything but the goroutine,
// and then has the kernel splice exactly those bytes to the destination
// (*net.TCPConn.ReadFrom of an io.LimitedReader of the source), without
// copying them to user space. It never calls ReadFrom on an empty socket:
// Go's splice takes a pipe (two descriptors and its kernel buffer) before
// it waits for the source, so an idle tunnel relayed by a plain io.Copy
// holds two pipes besides its two sockets. Other connections are relayed by
// io.Copy.
//
// Idleness is checked from outside: each direction waits under a read
// deadline one tick (a quarter of the idle timeout) away. A deadline on the
// read side loses nothing (splice moves what it drained into its pipe to the
// destination before returning); write deadlines, which could strand bytes
// in that pipe, are never set. When the deadline passes, bytes moved since
// count as activity; if the tunnel as a whole, both directions together,
// was silent for the idle timeout, it is closed, otherwise the deadline is
// moved on. A direction blocked writing to a peer that reads nothing
// (splice waits for room) never reaches its deadline: while the other
// direction waits on its own, that one notices the silence; once the other
// has ended (a half-close), the direction that ended watches for it (see
// finished).
type Tunnel struct {
	// OnCopy, when set before Run, sees the destination and the source of
	// every copy the tunnel makes, as passed to ReadFrom or io.Copy: a test
	// checks with it that tunnels stay on the splice path.
	OnCopy func(dst io.Writer, src io.Reader)

	client, upstream net.Conn
	idle             time.Duration
	start            time.Time
	last             atomic.Int64 // last byte either way, as time.Duration since start
	closeOnce        sync.Once
	closed           chan struct{} // closed by Close
	running          atomic.Int32  // directions still relaying

	// Each direction's splice state, and client->upstream's result (it
	// runs on a goroutine of its own), kept here to save allocations.
	downQ, upQ queued
	wg         sync.WaitGroup
	up         int64
	upErr      error
}

// New returns a tunnel between client and upstream that closes both after
// idle without a byte either way. Run starts it.
func New(client, upstream net.Conn, idle time.Duration) *Tunnel {
	return &Tunnel{client: client, upstream: upstream, idle: idle, start: time.Now(), closed: make(chan struct{})}
}

// Close closes both connections, ending both directions.
func (t *Tunnel) Close() error {
	t.closeOnce.Do(func() {
		close(t.closed)
		_ = t.client.Close()
		_ = t.upstream.Close()
	})
	return nil
}

// Run relays until both directions are done and returns the bytes copied
// upstream->client (down) and client->upstream (up), and what ended the
// tunnel if it was not a normal close (ErrIdle for the idle timeout).
func (t *Tunnel) Run() (down, up int64, err error) {
	t.running.Store(2)
	t.wg.Add(1)
	go t.runUp()
	down, err = t.pipe(t.client, t.upstream, &t.downQ)
	t.finished()
	t.wg.Wait()
	t.Close()
	return down, t.up, errors.Join(err, t.upErr)
}

func (t *Tunnel) runUp() {
	defer t.wg.Done()
	t.up, t.upErr = t.pipe(t.upstream, t.client, &t.upQ)
	t.finished()
}

// finished is called by each direction when it has ended. The last one
// closes the tunnel. The first one, when the tunnel stays open (it ended
// with a half-close), watches it until then: the other direction may be
// blocked writing to a peer that reads nothing, and is then closed after
// the idle timeout like any silent tunnel.
func (t *Tunnel) finished() {
	if t.running.Add(-1) == 0 {
		t.Close()
		return
	}
	tick := time.NewTicker(max(t.idle/4, time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-t.closed:
			return
		case <-tick.C:
			if t.silent() {
				t.Close()
				return
			}
		}
	}
}

// silent reports whether no byte went either way for the idle timeout.
func (t *Tunnel) silent() bool {
	return time.Since(t.start)-time.Duration(t.last.Load()) >= t.idle
}

type closeWriter interface{ CloseWrite() error }

// pipe copies src to dst until src reaches EOF, which it passes on to dst as
// a half-close, or until the tunnel fails, idles out or is closed. Between
// two TCP connections it splices with q.
func (t *Tunnel) pipe(dst, src net.Conn, q *queued) (int64, error) {
	tick := max(t.idle/4, time.Millisecond)
	d, s := tcpConnOf(dst), tcpConnOf(src)
	var w *queued
	if d != nil && s != nil {
		if err := q.init(s, t.OnCopy); err != nil {
			t.Close()
			return 0, err
		}
		w = q
	}
	var total int64
	if err := src.SetReadDeadline(time.Now().Add(tick)); err != nil {
		t.Close()
		return total, quiet(err)
	}
	for {
		var n int64
		var err error
		if w != nil {
			n, err = w.spliceTo(d)
		} else {
			if t.OnCopy != nil {
				t.OnCopy(dst, src)
			}
			n, err = io.Copy(dst, src)
		}
		total += n
		if n > 0 {
			t.last.Store(int64(time.Since(t.start)))
		}
		switch {
		case err == nil && (w == nil || w.eof): // EOF from src
			if cw, ok := dst.(closeWriter); ok && cw.CloseWrite() == nil {
				return total, nil // the other direction goes on
			}
			t.Close() // cannot half-close dst: end the tunnel
			return total, nil
		case err == nil: // more to wait for
		case errors.Is(err, os.ErrDeadlineExceeded):
			if t.silent() {
				t.Close()
				return total, ErrIdle
			}
			if err := src.SetReadDeadline(time.Now().Add(tick)); err != nil {
				t.Close()
				return total, quiet(err)
			}
		default:
			t.Close()
			return total, quiet(err)
		}
	}
}

// tcpConnOf returns the TCP connection c is or carries unchanged: c itself,
// or what its NetConn method returns (netutil.Conn). It returns nil for
// anything else, TLS included, whose bytes are not the socket's.
func tcpConnOf(c net.Conn) *net.TCPConn {
	for range 4 { // wrappers of wrappers, but not forever
		switch v := c.(type) {
		case *net.TCPConn:
			return v
		case *tls.Conn:
			return nil
		case interface{ NetConn() net.Conn }:
			c = v.NetConn()
		default:
			return nil
		}
	}
	return nil
}

// queued waits until a TCP connection has bytes to read, or has reached
// EOF, without reading them, and then lets the kernel splice exactly the
// bytes queued to a destination. It allocates nothing per wait or splice.
type queued struct {
	rc     syscall.RawConn
	ready  func(fd uintptr) bool // q.check, bound once
	lr     io.LimitedReader      // of src, for ReadFrom
	onCopy func(dst io.Writer, src io.Reader)

	n    int            // bytes queued (SIOCINQ)
	poll [1]unix.PollFd // for EOF and errors, when nothing is queued
	eof  bool           // src sent FIN and every byte before it was moved
	err  error          // the socket's error, if any
}

// init readies q to wait on src. onCopy, if not nil, sees every splice.
func (q *queued) init(src *net.TCPConn, onCopy func(dst io.Writer, src io.Reader)) error {
	rc, err := src.SyscallConn()
	if err != nil {
		return err
	}
	*q = queued{rc: rc, lr: io.LimitedReader{R: src}, onCopy: onCopy}
	q.ready = q.check
	return nil
}

// spliceTo waits until src has bytes queued and moves them to dst, or
// sets q.eof. It returns the bytes moved and the error that ended the wait
// or the splice (os.ErrDeadlineExceeded for src's read deadline).
func (q *queued) spliceTo(dst *net.TCPConn) (int64, error) {
	q.n, q.err = 0, nil
	if err := q.rc.Read(q.ready); err != nil {
		return 0, err
	}
	if q.err != nil {
		return 0, q.err
	}
	if q.n == 0 {
		q.eof = true
		return 0, nil
	}
	q.lr.N = int64(q.n)
	if q.onCopy != nil {
		q.onCopy(dst, &q.lr)
	}
	return dst.ReadFrom(&q.lr)
}

// check is the RawConn.Read callback: it returns false, to wait for the
// socket to become readable, while nothing is queued and no EOF or error
// arrived.
func (q *queued) check(fd uintptr) bool {
	for {
		if q.n, q.err = unix.IoctlGetInt(int(fd), unix.SIOCINQ); q.err != nil || q.n > 0 {
			return true
		}
		// Nothing queued: either nothing came yet, or EOF, or an error,
		// which poll tells apart without reading.
		q.poll[0] = unix.PollFd{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}
		if _, err := unix.Poll(q.poll[:], 0); err != nil {
			if err == unix.EINTR {
				continue
			}
			q.err = err
			return true
		}
		ev := q.poll[0].Revents
		switch {
		case ev&unix.POLLERR != 0:
			// A reset: the error a read would return, taken from the
			// socket. None left (taken already): EOF.
			if errno, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR); err != nil {
				q.err = err
			} else if errno != 0 {
				q.err = unix.Errno(errno)
			}
			return true
		case ev&(unix.POLLRDHUP|unix.POLLHUP) != 0:
			// FIN. Bytes that came before it, between the two calls, go
			// first; none can come after it.
			q.n, q.err = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
			return true // EOF if q.n == 0
		case ev&unix.POLLIN != 0:
			// A byte arrived between the two calls: count again.
		default:
			return false
		}
	}
}

// IsClosed reports whether err only says that a connection was closed or
// reset, which ends a tunnel normally enough not to be worth a warning.
func IsClosed(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// quiet drops errors that only say the connection was closed or reset.
func quiet(err error) error {
	if IsClosed(err) {
		return nil
	}
	return err
}
