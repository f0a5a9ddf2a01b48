package daemon

import (
	"fmt"
	"net"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// notifier tells systemd (Type=notify, or Type=notify-reload) how egressd is
// doing: READY=1 once every listener is up, RELOADING=1 and READY=1 around a
// reload, STOPPING=1 when shutdown begins, with STATUS= lines for
// `systemctl status`. The protocol is one datagram per message on the unix
// socket NOTIFY_SOCKET names (sd_notify(3)); a library would be more code to
// review than these lines.
type notifier struct {
	conn *net.UnixConn // nil: not started by systemd, nothing to tell
}

// newNotifier connects to $NOTIFY_SOCKET, if it is set. A name starting with
// @ is an abstract socket, which Go's net package understands as such.
func newNotifier() (*notifier, error) {
	name := os.Getenv("NOTIFY_SOCKET")
	if name == "" {
		return &notifier{}, nil
	}
	if !strings.HasPrefix(name, "/") && !strings.HasPrefix(name, "@") {
		return nil, fmt.Errorf("NOTIFY_SOCKET %q: not a unix socket path or @abstract name", name)
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("NOTIFY_SOCKET %s: %w", name, unwrapOp(err))
	}
	return &notifier{conn: c}, nil
}

// send sends one message: newline-separated VAR=value lines.
func (n *notifier) send(lines ...string) error {
	if n.conn == nil {
		return nil
	}
	_, err := n.conn.Write([]byte(strings.Join(lines, "\n")))
	return err
}

// reloading is the message that starts a reload: systemd's notify-reload
// wants the time it began, on CLOCK_MONOTONIC.
func reloading() []string {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) // cannot fail for this clock
	return []string{"RELOADING=1", fmt.Sprintf("MONOTONIC_USEC=%d", ts.Nano()/1000)}
}

func (n *notifier) Close() error {
	if n.conn == nil {
		return nil
	}
	return n.conn.Close()
}
