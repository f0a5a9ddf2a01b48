package test

import (
	"maps"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

// TestAllow: egressd on H's link address, as on a container bridge, with
// -allow naming R's address only. A client in R gets through over HTTP,
// CONNECT and SOCKS5; a client in H, whose connection comes from H's own
// address, gets 403 for plain HTTP and for CONNECT, and the SOCKS5 reply
// "not allowed by ruleset", and the upstream sees nothing of it.
func TestAllow(t *testing.T) {
	t.Parallel()
	link := net.JoinHostPort(nstest.HostAddr.String(), "3128")
	socks := net.JoinHostPort(nstest.HostAddr.String(), "1080")
	e := setup(t)
	e.ed = e.tp.StartEgressd(t, e.bin, egressdArgs(e.tp, "-listen", link, "-socks5", socks,
		"-allow", nstest.RouterAddr.String()+"/128")...)
	e.ed.WaitListening(t, 3) // loopback (from egressdArgs), link, SOCKS5
	proxyURL := "http://" + link

	// From R: admitted.
	code, _, err := e.tp.Router.CurlStatus("-x", proxyURL, e.up.HTTPURL)
	require.NoError(t, err)
	assert.Equal(t, "200", code, "plain HTTP from an allowed address")
	code, connect, err := e.tp.Router.CurlStatus("-x", proxyURL, "--cacert", e.up.CAFile, e.up.HTTPSURL)
	require.NoError(t, err)
	assert.Equal(t, "200", code, "HTTPS from an allowed address")
	assert.Equal(t, "200", connect)
	code, _, err = e.tp.Router.CurlStatus("--socks5-hostname", socks, e.up.HTTPURL)
	require.NoError(t, err)
	assert.Equal(t, "200", code, "SOCKS5 from an allowed address")
	require.Len(t, e.up.Peers(), 3)

	// From H's own address: refused.
	e.up.Reset()
	code, _, err = e.tp.Host.CurlStatus("-x", proxyURL, e.up.HTTPURL)
	require.NoError(t, err)
	assert.Equal(t, "403", code, "plain HTTP from an address not allowed")
	_, connect, err = e.tp.Host.CurlStatus("-x", proxyURL, "--cacert", e.up.CAFile, e.up.HTTPSURL)
	assert.Error(t, err, "curl fails when the tunnel is refused")
	assert.Equal(t, "403", connect, "CONNECT from an address not allowed")
	_, _, err = e.tp.Host.CurlStatus("--socks5-hostname", socks, e.up.HTTPURL)
	require.Error(t, err, "SOCKS5 from an address not allowed")
	assert.Contains(t, err.Error(), "(97)", "curl's exit status for a SOCKS5 refusal")
	assert.Empty(t, e.up.Peers(), "nothing reached the upstream")

	// The admitted requests above were answered 200: the 403 lines are
	// the refusals'.
	methods := map[string]map[string]string{}
	for _, rec := range waitRequestLogs(t, e.ed, 3, statusIs("403")) {
		methods[rec["method"]] = rec
		assert.Empty(t, rec["egress"], "no egress address taken")
		assert.True(t, strings.HasPrefix(rec["client"], "["+nstest.HostAddr.String()+"]:"), "%v", rec)
	}
	assert.ElementsMatch(t, []string{"GET", "CONNECT", "SOCKS5"}, slices.Collect(maps.Keys(methods)), "the refusals' access lines")
	assert.Equal(t, "2", methods["SOCKS5"]["socks_reply"], "SOCKS5: connection not allowed by ruleset")
}

// TestAuth: with -auth-file, curl without credentials or with wrong ones
// gets 407 for plain HTTP and CONNECT and is refused by SOCKS5; with the
// right ones it gets through all three, also from another address (R) when
// egressd listens off loopback with no -allow. A session key rides in the
// user name. The upstream never sees Proxy-Authorization, and the log never
// holds a password.
func TestAuth(t *testing.T) {
	t.Parallel()
	const pass = "s3cret-Pa55"
	users := filepath.Join(t.TempDir(), "users")
	nstest.HTPasswd(t, users, map[string]string{"alice": pass, "bob": "other"})
	link := net.JoinHostPort(nstest.HostAddr.String(), "3128")
	e := setup(t)
	e.ed = e.tp.StartEgressd(t, e.bin, egressdArgs(e.tp, "-listen", link,
		"-auth-file", users, "-socks5", socksAddr, "-rotate", "session")...)
	e.ed.WaitListening(t, 3)
	var mu sync.Mutex
	var seen []string // Proxy-Authorization as the upstream saw it
	e.up.Handle("/headers", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("Proxy-Authorization"))
		mu.Unlock()
		w.Write([]byte("ok\n"))
	}))
	httpURL, httpsURL := e.up.HTTPURL+"headers", e.up.HTTPSURL+"headers"
	proxyURL := "http://" + proxyAddr

	for _, tt := range []struct {
		name string
		user []string // curl's --proxy-user, -U for SOCKS5
		ok   bool
	}{
		{"missing", nil, false},
		{"wrong password", []string{"alice:badpass-9"}, false},
		{"unknown user", []string{"carol:" + pass}, false},
		{"another user's password", []string{"bob:" + pass}, false},
		{"right", []string{"alice:" + pass}, true},
		{"right, with a session key", []string{"alice-session-k1:" + pass}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var creds, socksCreds []string
			if tt.user != nil {
				creds = []string{"--proxy-user", tt.user[0]}
				socksCreds = []string{"-U", tt.user[0]}
			}
			code, _, err := e.tp.Host.CurlStatus(append(creds, "-x", proxyURL, httpURL)...)
			require.NoError(t, err)
			_, connect, connectErr := e.tp.Host.CurlStatus(append(creds, "-x", proxyURL, "--cacert", e.up.CAFile, httpsURL)...)
			socksCode, _, socksErr := e.tp.Host.CurlStatus(append(socksCreds, "--socks5-hostname", socksAddr, httpURL)...)
			if tt.ok {
				assert.Equal(t, "200", code, "HTTP")
				assert.NoError(t, connectErr, "CONNECT")
				assert.Equal(t, "200", connect, "CONNECT")
				assert.NoError(t, socksErr, "SOCKS5")
				assert.Equal(t, "200", socksCode, "SOCKS5")
				return
			}
			assert.Equal(t, "407", code, "HTTP")
			assert.Error(t, connectErr, "CONNECT")
			assert.Equal(t, "407", connect, "CONNECT")
			assert.Error(t, socksErr, "SOCKS5")
		})
	}
	// Off loopback with -auth-file and no -allow: any address that
	// authenticates, as from R.
	code, _, err := e.tp.Router.CurlStatus("-x", "http://"+link, httpURL)
	require.NoError(t, err)
	assert.Equal(t, "407", code, "from R without credentials")
	code, _, err = e.tp.Router.CurlStatus("--proxy-user", "alice:"+pass, "-x", "http://"+link, httpURL)
	require.NoError(t, err)
	assert.Equal(t, "200", code, "from R with credentials")

	mu.Lock()
	assert.Len(t, seen, 7, "three requests each for the two right credentials, one from R")
	for _, h := range seen {
		assert.Empty(t, h, "the upstream saw Proxy-Authorization")
	}
	mu.Unlock()

	// The proxy answers 407 with a Basic challenge, which curl's
	// --proxy-anyauth answers.
	out, err := e.tp.Host.Output("curl", "-q", "-sS", "-o", "/dev/null", "-D", "-", "-x", proxyURL, httpURL)
	require.NoError(t, err)
	assert.Contains(t, out, "Proxy-Authenticate: Basic realm=\"egressd\"")
	out, err = e.tp.Host.Output("curl", "-q", "-sS", "--proxy-anyauth", "--proxy-user", "alice:"+pass, "-x", proxyURL, e.up.HTTPURL)
	require.NoError(t, err)
	assert.True(t, nstest.Prefix.Contains(parseBodies(t, out)[0]), "through after the challenge: %s", out)

	// The session key in the user name keeps one address, on HTTP and
	// SOCKS5 alike.
	addr := func(args ...string) string {
		out, err := e.tp.Host.Output("curl", append([]string{"-q", "-sS", "--max-time", "30"}, append(args, e.up.HTTPURL)...)...)
		require.NoError(t, err)
		return strings.TrimSpace(out)
	}
	a1 := addr("--proxy-user", "alice-session-k2:"+pass, "-x", proxyURL)
	a2 := addr("-U", "alice-session-k2:"+pass, "--socks5-hostname", socksAddr)
	b := addr("--proxy-user", "alice-session-k3:"+pass, "-x", proxyURL)
	assert.Equal(t, a1, a2, "one address per session key")
	assert.NotEqual(t, a1, b, "another key, another address")

	stderr := e.ed.Stderr()
	assert.NotContains(t, stderr, pass, "a password in the log")
	assert.NotContains(t, stderr, "badpass-9", "a password in the log")
	var users200 []string
	for _, rec := range e.ed.Log("request") {
		if rec["status"] == "200" {
			users200 = append(users200, rec["user"])
		}
	}
	assert.NotEmpty(t, users200)
	for _, u := range users200 {
		assert.Equal(t, "alice", u, "the access log names the user, without the session key")
	}
}

// TestOpenProxyRefused: listening off loopback with neither -allow nor
// -auth-file is refused with one line and exit status 1, for HTTP and for
// SOCKS5; a bad auth file is one line naming file:line.
func TestOpenProxyRefused(t *testing.T) {
	t.Parallel()
	bin := binary(t, "./cmd/egressd")
	tp := nstest.New(t)
	link := net.JoinHostPort(nstest.HostAddr.String(), "3128")
	md5 := filepath.Join(t.TempDir(), "md5")
	out, err := exec.Command("htpasswd", "-m", "-b", "-c", md5, "alice", "pw").CombinedOutput()
	require.NoError(t, err, "%s", out)

	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"http", []string{"-listen", link}, "egressd: listen " + link + " is not a loopback address: give -allow CIDR (the clients' networks) or -auth-file FILE, or egressd would be an open proxy\n"},
		{"all addresses", []string{"-listen", ":3128"}, "egressd: listen :3128 is not a loopback address"},
		{"socks5", []string{"-listen", proxyAddr, "-socks5", "[::]:1080"}, "egressd: socks5 [::]:1080 is not a loopback address"},
		{"bad auth file", []string{"-listen", link, "-auth-file", md5}, "egressd: auth file " + md5 + `:1: user "alice": not a bcrypt hash (make one with htpasswd -B)` + "\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := tp.Host.Start(t, nil, bin, append([]string{"-interface", tp.HostLink, "-prefix", nstest.Prefix.String(),
				"-admin", filepath.Join(t.TempDir(), "admin.sock")}, tt.args...)...)
			assert.Equal(t, 1, p.Wait(t), "exit status")
			assert.Equal(t, 1, strings.Count(p.Stderr(), "\n"), "one line: %s", p.Stderr())
			assert.True(t, strings.HasPrefix(p.Stderr(), tt.want), "stderr %q, want %q", p.Stderr(), tt.want)
		})
	}
}
