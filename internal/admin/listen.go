package admin

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Listen opens the admin listener at addr: a unix socket of mode 0600 (its
// directory is made if missing) when IsUnix(addr), else a TCP address. A
// socket left by an egressd that was killed is replaced; one that answers
// belongs to an egressd that still runs, and is an error.
func Listen(addr string) (net.Listener, error) {
	if !IsUnix(addr) {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, listenError("admin listener", addr, err)
		}
		return ln, nil
	}
	if err := os.MkdirAll(filepath.Dir(addr), 0o755); err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", addr, err)
	}
	if c, err := net.DialTimeout("unix", addr, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("admin socket %s is in use: another egressd runs (give this one its own -admin)", addr)
	} else if errors.Is(err, syscall.ECONNREFUSED) {
		if err := os.Remove(addr); err != nil {
			return nil, fmt.Errorf("admin socket %s: removing the stale socket: %w", addr, err)
		}
	}
	// The umask makes the socket 0600 from its creation on, with no window
	// in which others could connect. Nothing else creates files now.
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", addr)
	syscall.Umask(old)
	if err != nil {
		return nil, listenError("admin socket", addr, err)
	}
	return ln, nil
}

// listenError names what failed to listen, with the cause of err alone
// (a *net.OpError's "listen tcp ADDR:" prefix repeats what the line says).
func listenError(what, addr string, err error) error {
	if op, ok := errors.AsType[*net.OpError](err); ok && op.Err != nil {
		err = op.Err
	}
	return fmt.Errorf("%s %s: %w", what, addr, err)
}
