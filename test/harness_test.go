package test

import (
	"errors"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

// TestHarness checks the topology itself, without egressd: from H the
// upstream is reached through the default route and sees H's own address,
// and cleanup leaves no namespace, file or process behind.
func TestHarness(t *testing.T) {
	t.Parallel()
	nstest.RequireRoot(t)
	var (
		names   []string
		tracked int
		stray   *exec.Cmd
	)
	t.Run("topology", func(t *testing.T) {
		tp := nstest.New(t)
		up := tp.StartUpstream(t)
		names = []string{tp.Host.Name, tp.Router.Name}

		t.Run("curl http", func(t *testing.T) {
			up.Reset()
			out := tp.Host.Run(t, "curl", "-q", "-sS", "--max-time", "30", up.HTTPURL)
			assert.Equal(t, nstest.HostAddr.String()+"\n", out)
			assert.Equal(t, []netip.Addr{nstest.HostAddr}, up.Peers())
		})
		t.Run("curl https", func(t *testing.T) {
			up.Reset()
			out := tp.Host.Run(t, "curl", "-q", "-sS", "--max-time", "30", "--cacert", up.CAFile, up.HTTPSURL)
			assert.Equal(t, nstest.HostAddr.String()+"\n", out)
			assert.Equal(t, []netip.Addr{nstest.HostAddr}, up.Peers())
		})
		t.Run("go dial in H", func(t *testing.T) {
			conn, err := tp.Host.DialContext(guardCtx(t), "tcp", net.JoinHostPort(nstest.UpstreamAddr.String(), "80"))
			require.NoError(t, err)
			defer conn.Close()
			local := netip.MustParseAddrPort(conn.LocalAddr().String()).Addr()
			assert.Equal(t, nstest.HostAddr, local)
		})
		t.Run("resolver in H", func(t *testing.T) {
			out := tp.Host.Run(t, "getent", "ahosts", nstest.UpstreamName)
			require.NotEmpty(t, out)
			for line := range strings.Lines(out) {
				addr := strings.Fields(line)[0]
				assert.Equal(t, nstest.UpstreamAddr.String(), addr, "upstream.test must have one address, IPv6")
			}
		})
		t.Run("addresses on H's veth", func(t *testing.T) {
			var six []string
			for _, a := range hostAddrs(t, tp) {
				if ip := nstest.AddrOf(a); ip.Is6() && !ip.IsLinkLocalUnicast() {
					six = append(six, a.IPNet.String())
				}
			}
			assert.Equal(t, []string{nstest.HostAddr.String() + "/64"}, six)
		})

		// Background processes: one tracked by Start, one the harness does
		// not know about; cleanup must end both.
		p := tp.Host.Start(t, nil, "sleep", "600")
		tracked = p.Pid
		stray = exec.Command("ip", "netns", "exec", tp.Router.Name, "sleep", "600")
		require.NoError(t, stray.Start())
	})

	require.Len(t, names, 2, "the topology subtest did not get far enough")
	list, err := exec.Command("ip", "netns", "list").Output()
	require.NoError(t, err)
	for _, n := range names {
		assert.NotContains(t, string(list), n, "namespace left behind")
		_, err := os.Stat(filepath.Join("/etc/netns", n))
		assert.True(t, errors.Is(err, os.ErrNotExist), "/etc/netns/%s left behind", n)
	}
	assert.ErrorIs(t, syscall.Kill(tracked, 0), syscall.ESRCH, "tracked process %d still runs", tracked)
	if stray != nil {
		err := stray.Wait() // reaps it; it must have been killed
		var exit *exec.ExitError
		require.ErrorAs(t, err, &exit, "stray process was not killed")
		assert.Equal(t, "signal: killed", exit.Error())
	}
}

// TestEchoUpstreamBinary checks the demo's upstream command, run in R like the
// demo does.
func TestEchoUpstreamBinary(t *testing.T) {
	t.Parallel()
	bin := binary(t, "./test/upstream")
	tp := nstest.New(t)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	up := tp.Router.Start(t, nil, bin,
		"-listen", "["+nstest.UpstreamAddr.String()+"]:80",
		"-tls-listen", "["+nstest.UpstreamAddr.String()+"]:443",
		"-cert-out", ca, "-v")
	up.WaitListening(t, 2)

	out := tp.Host.Run(t, "curl", "-q", "-sS", "--max-time", "30", "http://"+nstest.UpstreamName+"/")
	assert.Equal(t, nstest.HostAddr.String()+"\n", out)
	out = tp.Host.Run(t, "curl", "-q", "-sS", "--max-time", "30", "--cacert", ca, "https://"+nstest.UpstreamName+"/")
	assert.Equal(t, nstest.HostAddr.String()+"\n", out)
	nstest.WaitFor(t, "two request log lines", func() bool { return len(up.Log("request")) == 2 })
	for _, rec := range up.Log("request") {
		assert.Equal(t, nstest.HostAddr.String(), rec["peer"])
	}

	require.NoError(t, up.Signal(syscall.SIGTERM))
	assert.Equal(t, 0, up.Wait(t), "echo-upstream exit status")
}

// TestFetchBinary checks the Go client helper without a proxy: with no proxy
// variables it connects directly, from H's own address.
func TestFetchBinary(t *testing.T) {
	t.Parallel()
	bin := binary(t, "./test/fetch")
	tp := nstest.New(t)
	up := tp.StartUpstream(t)
	out := tp.Host.Run(t, bin, "-cacert", up.CAFile, up.HTTPURL, up.HTTPSURL)
	assert.Equal(t, strings.Repeat(nstest.HostAddr.String()+"\n", 2), out)
	assert.Equal(t, []netip.Addr{nstest.HostAddr, nstest.HostAddr}, up.Peers())

	// And a non-200 answer is an error.
	up.Handle("/teapot", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "short and stout", http.StatusTeapot)
	}))
	_, err := tp.Host.Output(bin, up.HTTPURL+"teapot")
	assert.ErrorContains(t, err, "418")
}
