package test

import (
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

// notifyListener is the socket systemd would give egressd as
// NOTIFY_SOCKET: a unixgram socket in a directory of the test's own.
type notifyListener struct {
	path string
	c    *net.UnixConn
}

func listenNotify(t *testing.T) *notifyListener {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return &notifyListener{path: path, c: c}
}

// next returns the next message, waiting at most nstest.Guard.
func (n *notifyListener) next(t *testing.T) string {
	t.Helper()
	buf := make([]byte, 4096)
	require.NoError(t, n.c.SetReadDeadline(time.Now().Add(nstest.Guard)))
	k, err := n.c.Read(buf)
	require.NoError(t, err, "waiting for a notification")
	return string(buf[:k])
}

// serveTCP accepts connections on ln, in R or H, and hands each to handle
// on a goroutine of its own, until the test ends.
func serveTCP(t *testing.T, ln net.Listener, handle func(net.Conn)) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
}

// echoPort is where startTCPEcho listens; tunnels to it need
// -connect-ports to name it.
const echoPort = "8007"

// startTCPEcho runs an echo server on the upstream's address, port
// echoPort, in R.
func startTCPEcho(t *testing.T, tp *nstest.Topo) string {
	t.Helper()
	addr := net.JoinHostPort(nstest.UpstreamAddr.String(), echoPort)
	ln, err := tp.Router.Listen("tcp", addr)
	require.NoError(t, err)
	serveTCP(t, ln, func(c net.Conn) {
		defer c.Close()
		io.Copy(c, c)
	})
	return addr
}

// assertEchoes sends msg through tunnel, a tunnel to startTCPEcho's
// server, and checks that it comes back.
func assertEchoes(t *testing.T, tunnel net.Conn, msg string) {
	t.Helper()
	require.NoError(t, tunnel.SetDeadline(time.Now().Add(nstest.Guard)))
	_, err := io.WriteString(tunnel, msg)
	require.NoError(t, err)
	got := make([]byte, len(msg))
	_, err = io.ReadFull(tunnel, got)
	require.NoError(t, err)
	assert.Equal(t, msg, string(got))
}

// TestReload: egressd under a NOTIFY_SOCKET tells READY=1 once it listens.
// A SIGHUP with a new -limit rule in the config file applies to the next
// request, while a CONNECT tunnel opened before keeps moving bytes; the
// reload is framed by RELOADING=1 (with MONOTONIC_USEC) and READY=1. A
// broken config on SIGHUP is refused with a logged line and the old rule
// stays; egressctl reload says the same, exit 1, and then applies a good
// one. SIGTERM tells STOPPING=1.
func TestReload(t *testing.T) {
	t.Parallel()
	e := setup(t)
	ctl := binary(t, "./cmd/egressctl")
	echo := startTCPEcho(t, e.tp)
	conf := filepath.Join(t.TempDir(), "egressd.yaml")
	write := func(body string) { require.NoError(t, os.WriteFile(conf, []byte(body), 0o644)) }
	write("log-level: info\n")
	notify := listenNotify(t)
	admin := filepath.Join(t.TempDir(), "admin.sock")
	e.ed = e.tp.Host.Start(t, []string{"NOTIFY_SOCKET=" + notify.path}, e.bin,
		egressdArgs(e.tp, "-config", conf, "-admin", admin, "-connect-ports", "443,80,"+echoPort)...)
	assert.Equal(t, "READY=1\nSTATUS=serving", notify.next(t))
	// READY=1 comes after every listener is up: nothing to wait for.
	client := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false)
	get := func() int {
		t.Helper()
		code, _, err := client.Fetch(guardCtx(t), e.up.HTTPURL)
		require.NoError(t, err)
		return code
	}
	for range 3 {
		require.Equal(t, http.StatusOK, get(), "no limit yet")
	}

	tunnel, resp, err := e.tp.Host.Connect(guardCtx(t), proxyAddr, echo)
	require.NoError(t, err)
	defer tunnel.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	echoes := func(msg string) {
		t.Helper()
		assertEchoes(t, tunnel, msg)
	}
	echoes("before the reload")

	reloaded := func(msg string) map[string]string {
		t.Helper()
		var rec map[string]string
		nstest.WaitFor(t, "log line "+msg, func() bool {
			for line := range strings.Lines(e.ed.Stderr()) {
				if r := nstest.ParseLogLine(line); strings.HasPrefix(r["msg"], msg) {
					rec = r
				}
			}
			return rec != nil
		})
		return rec
	}
	hup := func() {
		t.Helper()
		require.NoError(t, e.ed.Signal(syscall.SIGHUP))
		msg := notify.next(t)
		assert.True(t, strings.HasPrefix(msg, "RELOADING=1\nMONOTONIC_USEC="), "%q", msg)
		assert.Equal(t, "READY=1\nSTATUS=serving", notify.next(t))
	}

	write("log-level: info\nlimit: [\"" + nstest.UpstreamName + "=1r/h,burst=1,wait=1s\"]\n")
	hup()
	rec := reloaded("config reloaded")
	assert.Equal(t, "limit", rec["changed"])
	assert.Equal(t, http.StatusOK, get(), "the new rule's one token")
	assert.Equal(t, http.StatusTooManyRequests, get(), "the new rule applies to the next request")
	echoes("after the reload: the tunnel still moves bytes")

	// A broken config: refused, the old rule stays.
	write("limit: [\"" + nstest.UpstreamName + "=fast\"]\n")
	hup()
	rec = reloaded("reload refused, the running config stays: ")
	assert.Contains(t, rec["msg"], `key "limit"`)
	assert.Equal(t, "ERROR", rec["level"])
	assert.Equal(t, http.StatusTooManyRequests, get(), "the old rule still holds")
	echoes("after a refused reload")

	// egressctl reload: refused, then applied.
	out, err := e.tp.Host.Output(ctl, "-admin", admin, "reload")
	require.Error(t, err, "exit 1 for a refused config")
	assert.Empty(t, out)
	assert.Contains(t, err.Error(), "egressctl: reload refused, the running config stays: config "+conf+": line 1: key \"limit\"")
	assert.Contains(t, notify.next(t), "RELOADING=1")
	assert.Equal(t, "READY=1\nSTATUS=serving", notify.next(t))

	write("log-level: info\n-interface: x\n")
	_, err = e.tp.Host.Output(ctl, "-admin", admin, "reload")
	assert.ErrorContains(t, err, `unknown key "-interface"`)
	notify.next(t)
	notify.next(t)

	write("grace: 5s\nlog-level: warn\nmax-addrs: 900\n") // -log-level debug on the command line wins
	out, err = e.tp.Host.Output(ctl, "-admin", admin, "reload")
	require.NoError(t, err)
	assert.Equal(t, "reloaded: grace, limit changed; restart to apply max-addrs (the running values stay)\n", out)
	notify.next(t)
	notify.next(t)
	assert.Equal(t, http.StatusOK, get(), "no limit any more")
	echoes("after egressctl reload")
	require.NoError(t, tunnel.Close())

	require.NoError(t, e.ed.Signal(syscall.SIGTERM))
	assert.Equal(t, "STOPPING=1\nSTATUS=shutting down", notify.next(t))
	assert.Equal(t, 0, e.ed.Wait(t))
	stopping := e.ed.Log("shutting down")
	require.Len(t, stopping, 1)
	assert.Equal(t, "5s", stopping[0]["grace"], "the reloaded grace period")
}
