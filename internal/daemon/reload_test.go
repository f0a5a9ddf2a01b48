package daemon

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/bcrypt"
	"golang.org/x/sys/unix"
)

// notifySocket listens on a unixgram socket named name (a path, or @ and an
// abstract name), points NOTIFY_SOCKET at it, and returns a function that
// reads the next message.
func notifySocket(t *testing.T, name string) func() string {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", name)
	return func() string {
		t.Helper()
		buf := make([]byte, 4096)
		require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
		n, err := c.Read(buf)
		require.NoError(t, err)
		return string(buf[:n])
	}
}

func TestNotify(t *testing.T) {
	for _, name := range []string{
		filepath.Join(t.TempDir(), "notify"),
		fmt.Sprintf("@egressd-test-%d", os.Getpid()), // abstract, as systemd's own
	} {
		t.Run(name, func(t *testing.T) {
			next := notifySocket(t, name)
			n, err := newNotifier()
			require.NoError(t, err)
			defer n.Close()
			require.NoError(t, n.send("READY=1", "STATUS=serving"))
			assert.Equal(t, "READY=1\nSTATUS=serving", next())

			var before [2]int64
			before[0] = monotonicUsec(t)
			require.NoError(t, n.send(reloading()...))
			before[1] = monotonicUsec(t)
			msg := next()
			lines := strings.Split(msg, "\n")
			require.Len(t, lines, 2, msg)
			assert.Equal(t, "RELOADING=1", lines[0])
			usec, err := strconv.ParseInt(strings.TrimPrefix(lines[1], "MONOTONIC_USEC="), 10, 64)
			require.NoError(t, err, msg)
			assert.True(t, before[0] <= usec && usec <= before[1], "MONOTONIC_USEC %d is CLOCK_MONOTONIC now (%d..%d)", usec, before[0], before[1])
		})
	}

	t.Setenv("NOTIFY_SOCKET", "")
	n, err := newNotifier()
	require.NoError(t, err)
	assert.NoError(t, n.send("READY=1"), "nothing to tell without systemd")

	t.Setenv("NOTIFY_SOCKET", "relative/path")
	_, err = newNotifier()
	assert.EqualError(t, err, `NOTIFY_SOCKET "relative/path": not a unix socket path or @abstract name`)
}

// monotonicUsec reads CLOCK_MONOTONIC in microseconds.
func monotonicUsec(t *testing.T) int64 {
	t.Helper()
	var ts unix.Timespec
	require.NoError(t, unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts))
	return ts.Nano() / 1000
}

// htpasswd returns an htpasswd line for user and pass (bcrypt, lowest cost).
func htpasswd(t *testing.T, user, pass string) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(pass), bcrypt.MinCost)
	require.NoError(t, err)
	return user + ":" + string(h) + "\n"
}

func TestReload(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "egressd.yaml")
	users := filepath.Join(dir, "users")
	write := func(path, body string) { require.NoError(t, os.WriteFile(path, []byte(body), 0o600)) }
	write(users, htpasswd(t, "alice", "pw"))
	write(file, "limit: [\"a.test=1r/s\"]\nauth-file: "+users+"\nlog-level: warn\n")
	// The command line goes over the file at each reload, as at start.
	args := []string{"-config", file, "-grace", "7s", "-listen", "127.0.0.1:3128"}
	cfg, err := LoadConfig(args)
	require.NoError(t, err)
	l, err := newLive(cfg, nil)
	require.NoError(t, err)
	srv, err := proxy.New(proxy.Config{
		Dial:   func(context.Context, string, string) (net.Conn, error) { return nil, os.ErrPermission },
		Access: l.access, Shaper: l.shaper, Logger: slog.New(slog.DiscardHandler),
	})
	require.NoError(t, err)
	level := new(slog.LevelVar)
	level.Set(cfg.LogLevel)
	var logs bytes.Buffer
	next := notifySocket(t, filepath.Join(dir, "notify"))
	notify, err := newNotifier()
	require.NoError(t, err)
	t.Cleanup(func() { notify.Close() })
	guard := netutil.NewGuard(nil, cfg.AllowDest)
	rl := &reloader{srv: srv, guard: guard, level: level, log: slog.New(slog.NewTextHandler(&logs, nil)), notify: notify, cfg: cfg, live: l}

	reload := func() (string, error) {
		t.Helper()
		msg, err := rl.Reload()
		assert.True(t, strings.HasPrefix(next(), "RELOADING=1\nMONOTONIC_USEC="))
		assert.Equal(t, "READY=1\nSTATUS=serving", next(), "READY=1 after a reload, refused or not")
		return msg, err
	}

	msg, err := reload()
	require.NoError(t, err)
	assert.Equal(t, "reloaded: nothing changed", msg)
	assert.Same(t, l.access.Users, rl.live.access.Users, "same file: the users and their cache stay")
	assert.Same(t, l.shaper, rl.live.shaper, "same rules: the shaper and its buckets stay")

	// New rules, an allow list, a log level; a listener the file cannot
	// change (the command line wins) and a mode that needs a restart.
	internal := netip.MustParseAddr("10.0.9.7")
	require.ErrorIs(t, guard.Check(internal), netutil.ErrDenied)
	changed := "limit: [\"a.test=2r/s\", \"b.test=1r/m\"]\nallow: [10.0.5.0/24]\nauth-file: " + users +
		"\nlog-level: debug\nlisten: [\"127.0.0.1:9999\"]\nmode: routed\nmax-addrs: 9\n" +
		"allow-dest: [10.0.9.0/24]\nconnect-ports: [443, 8443]\n"
	write(file, changed)
	msg, err = reload()
	require.NoError(t, err)
	assert.Equal(t, "reloaded: allow, allow-dest, connect-ports, limit, log-level changed; restart to apply max-addrs, mode (the running values stay)", msg)
	assert.NoError(t, guard.Check(internal), "allow-dest applies at once")
	assert.Equal(t, "443,8443", rl.live.access.ConnectPorts.String())
	cur := rl.current()
	assert.Len(t, cur.Limits, 2)
	assert.Equal(t, "10.0.5.0/24", allowList(cur.allowed()))
	assert.Equal(t, slog.LevelDebug, level.Level())
	assert.Equal(t, modeOnLink, cur.Mode, "kept until a restart")
	assert.Equal(t, defaultConfig().MaxAddrs, cur.MaxAddrs, "kept until a restart")
	assert.Equal(t, []string{"127.0.0.1:3128"}, cur.Listen, "the command line still wins")
	assert.Equal(t, 7*time.Second, cur.Grace)
	assert.NotSame(t, l.shaper, rl.live.shaper)
	assert.Contains(t, logs.String(), `level=WARN msg="config reloaded, but some settings need a restart: running with the old values for those" restart=max-addrs,mode changed=allow,allow-dest,connect-ports,limit,log-level`)

	// Only the auth file's content changed: new users.
	before := rl.live.access.Users
	write(users, htpasswd(t, "alice", "pw")+htpasswd(t, "bob", "pw2"))
	msg, err = reload()
	require.NoError(t, err)
	assert.Equal(t, "reloaded: auth-file changed; restart to apply max-addrs, mode (the running values stay)", msg)
	assert.NotSame(t, before, rl.live.access.Users)
	assert.Equal(t, 2, rl.live.access.Users.Len())
	assert.Contains(t, logs.String(), `level=WARN msg="auth-file has bcrypt hashes cheap to guess: make them again with htpasswd -B -C 10" file=`+users+` users=alice,bob cost=4 want_cost=10`)

	// The client limits apply at once; -max-addrs-per-client's default
	// follows the running -max-addrs, not the file's.
	assert.Equal(t, proxy.Limits{MaxConns: 16384, MaxConnsPerClient: 4096, MaxAddrsPerClient: 256}, srv.Limits())
	write(file, changed+"max-conns: 100\nmax-conns-per-client: 5\n")
	msg, err = reload()
	require.NoError(t, err)
	assert.Equal(t, "reloaded: max-conns, max-conns-per-client changed; restart to apply max-addrs, mode (the running values stay)", msg)
	assert.Equal(t, proxy.Limits{MaxConns: 100, MaxConnsPerClient: 5, MaxAddrsPerClient: 256}, srv.Limits())

	// Broken configs are refused and change nothing.
	good := rl.current()
	goodLive := rl.live
	for _, tt := range []struct {
		name, file, users, want string
	}{
		{"syntax", "limit: [\n", "", "reload refused, the running config stays: config " + file + ":"},
		{"bad rule", "limit: [\"a.test=fast\"]\n", "", `key "limit"`},
		{"unreadable auth file", "auth-file: " + filepath.Join(dir, "missing") + "\n", "", "auth-file: open " + filepath.Join(dir, "missing")},
		{"bad auth file", "auth-file: " + users + "\n", "carol:$apr1$MkRrVlzU$lhrBqbBQ58YMUtC8xBMTs.\n", "auth file " + users + `:1: user "carol": not a bcrypt hash`},
		{"open proxy", "listen: [\"10.0.5.1:3128\"]\n", "", ""}, // the command line's -listen wins: not refused
	} {
		t.Run(tt.name, func(t *testing.T) {
			write(file, tt.file)
			if tt.users != "" {
				write(users, tt.users)
			}
			logs.Reset()
			msg, err := reload()
			if tt.want == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err, msg)
			assert.Contains(t, err.Error(), tt.want)
			assert.NotContains(t, err.Error(), "\n")
			assert.Equal(t, good, rl.current())
			assert.Equal(t, goodLive, rl.live)
			assert.Equal(t, slog.LevelDebug, level.Level())
			assert.Contains(t, logs.String(), "level=ERROR msg=\"reload refused, the running config stays: ")
			assert.Equal(t, 1, strings.Count(logs.String(), "\n"), "one log line")
		})
	}

	// Once shutdown began, no reload, and no READY=1 after STOPPING=1.
	rl.stop()
	assert.Equal(t, "STOPPING=1\nSTATUS=shutting down", next())
	_, err = rl.Reload()
	assert.EqualError(t, err, "reload refused: egressd is shutting down")
}
