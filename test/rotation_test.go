package test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/internal/admin"
	"github.com/egressd/egressd/test/echo"
	"github.com/egressd/egressd/test/nstest"
)

// TestRotateOnDemand: under -rotate session, session k keeps its address
// until it asks for a new one, and after each way of asking its requests
// leave from a new address: X-Egress-Rotate: 1 on plain HTTP (curl -H) and
// on CONNECT (curl --proxy-header), the user name session-k-rotate over
// SOCKS5 (curl --socks5-hostname) and as the HTTP proxy's user, egressctl
// rotate k, and POST /sessions/k/rotate on the admin API (curl
// --unix-socket). The stats count each way; unknown keys get a 404.
func TestRotateOnDemand(t *testing.T) {
	t.Parallel()
	e := start(t, "-rotate", "session", "-socks5", socksAddr)
	ctl := binary(t, "./cmd/egressctl")
	curlAddr := func(args ...string) netip.Addr {
		t.Helper()
		out := e.tp.Host.Run(t, "curl", append([]string{"-q", "-sS", "--fail", "--max-time", "30", "--cacert", e.up.CAFile}, args...)...)
		a, err := netip.ParseAddr(strings.TrimSpace(out))
		require.NoError(t, err, "upstream answer %q", out)
		return a
	}
	viaProxy := []string{"-x", "http://" + proxyAddr}
	session := func(extra ...string) netip.Addr {
		t.Helper()
		return curlAddr(append(append(viaProxy, "-H", "X-Egress-Session: k"), append(extra, e.up.HTTPURL)...)...)
	}
	var seen []netip.Addr
	asked := func(how string, got netip.Addr) {
		t.Helper()
		assert.NotContains(t, seen, got, "%s: a new address", how)
		seen = append(seen, got)
		for range 2 {
			assert.Equal(t, got, session(), "after %s, requests that do not ask keep the new address", how)
		}
	}

	first := session()
	seen = append(seen, first)
	assert.Equal(t, first, session(), "no ask, same address")

	asked("X-Egress-Rotate: 1", session("-H", "X-Egress-Rotate: 1"))

	asked("X-Egress-Rotate: 1 on CONNECT", curlAddr(append(viaProxy,
		"--proxy-header", "X-Egress-Session: k", "--proxy-header", "X-Egress-Rotate: 1", e.up.HTTPSURL)...))
	assert.Equal(t, seen[len(seen)-1], curlAddr(append(viaProxy, "--proxy-header", "X-Egress-Session: k", e.up.HTTPSURL)...),
		"CONNECT of session k without asking")

	viaSOCKS := []string{"--socks5-hostname", socksAddr}
	asked("SOCKS5 user session-k-rotate", curlAddr(append(viaSOCKS, "-U", "session-k-rotate:x", e.up.HTTPURL)...))
	assert.Equal(t, seen[len(seen)-1], curlAddr(append(viaSOCKS, "-U", "session-k:x", e.up.HTTPURL)...), "SOCKS5 user session-k")

	asked("proxy user session-k-rotate", curlAddr("-x", "http://session-k-rotate:x@"+proxyAddr, e.up.HTTPURL))

	out := e.tp.Host.Run(t, ctl, "-admin", e.ed.Admin, "rotate", "k")
	assert.Equal(t, `session "k" gave up `+seen[len(seen)-1].String()+
		": its next connection leaves from a new address; connections open from the old one keep going\n", out)
	asked("egressctl rotate k", session())

	out = e.tp.Host.Run(t, "curl", "-q", "-sS", "--fail", "--max-time", "30", "--unix-socket", e.ed.Admin,
		"-X", "POST", "http://egressd/sessions/k/rotate")
	var res admin.RotateResult
	require.NoError(t, json.Unmarshal([]byte(out), &res), out)
	assert.True(t, res.OK && res.Rotated, out)
	assert.Equal(t, seen[len(seen)-1].String(), res.Old)
	asked("POST /sessions/k/rotate", session())

	assertFresh(t, seen, 7)

	// An unknown key: 404 with one line, egressctl exit 1; nothing rotates.
	code, _, err := e.tp.Host.CurlStatus("--unix-socket", e.ed.Admin, "-X", "POST", "http://egressd/sessions/nosuch/rotate")
	require.NoError(t, err)
	assert.Equal(t, "404", code)
	out, err = e.tp.Host.Output(ctl, "-admin", e.ed.Admin, "rotate", "nosuch")
	assert.Empty(t, out)
	assert.ErrorContains(t, err, `egressctl: no session "nosuch" is open`)
	// A bad ask: 400 with its reason, and nothing rotates.
	code, body := curlBody(t, e.tp.Host, proxyAddr, "-H", "X-Egress-Session: k", "-H", "X-Egress-Rotate: yes", e.up.HTTPURL)
	assert.Equal(t, "400", code)
	assert.Equal(t, `X-Egress-Rotate must be 1, not "yes"`, strings.TrimSpace(body))
	assert.Equal(t, seen[len(seen)-1], session())

	s := ctlStats(t, e).Sessions
	assert.Equal(t, 1, s.Open)
	assert.Equal(t, map[string]uint64{"header": 2, "user_name": 2, "admin": 2, "status": 0}, s.Rotations)
	text := e.tp.Host.Run(t, ctl, "-admin", e.ed.Admin, "stats")
	assert.Contains(t, text, "\nsessions: 1 open; rotated: 2 header, 2 user_name, 2 admin\n")
	metrics := e.tp.Host.Run(t, "curl", "-q", "-sS", "--fail", "--unix-socket", e.ed.Admin, "http://egressd/metrics")
	assert.Contains(t, metrics, `egress_session_rotations_total{reason="user_name"} 2`+"\n")
	assert.Contains(t, metrics, "egress_session_open 1\n")
}

// TestRotateOnStatus: with -rotate-on 429, an upstream 429 to a plain HTTP
// request of session k moves its next request to a new address, while a
// CONNECT tunnel of k opened before keeps echoing from the old one, which
// stays in use until the tunnel closes and only then is given back. A 429
// to a request without a session, or a status not listed, moves nothing.
func TestRotateOnStatus(t *testing.T) {
	t.Parallel()
	e := setup(t)
	echoAddr := startTCPEcho(t, e.tp)
	e.restart(t, "-rotate", "session", "-rotate-on", "429", "-connect-ports", "443,80,"+echoPort)
	e.up.Handle("/status/{code}", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var code int
		switch r.PathValue("code") {
		case "429":
			code = http.StatusTooManyRequests
		case "403":
			code = http.StatusForbidden
		default:
			code = http.StatusOK
		}
		peer, err := echo.PeerAddr(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.WriteHeader(code)
		io.WriteString(w, peer.String()+"\n")
	}))
	get := func(key, code string) netip.Addr {
		t.Helper()
		args := []string{e.up.HTTPURL + "status/" + code}
		if key != "" {
			args = append([]string{"-H", "X-Egress-Session: " + key}, args...)
		}
		got, body := curlBody(t, e.tp.Host, proxyAddr, args...)
		require.Equal(t, code, got, body)
		a, err := netip.ParseAddr(strings.TrimSpace(body))
		require.NoError(t, err, body)
		return a
	}

	old := get("k", "200")
	tunnel, resp, err := e.tp.Host.ConnectWith(guardCtx(t), proxyAddr, echoAddr, http.Header{"X-Egress-Session": {"k"}})
	require.NoError(t, err)
	defer tunnel.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assertEchoes(t, tunnel, "before the 429")

	assert.Equal(t, old, get("k", "403"), "403 is not in -rotate-on")
	assert.Equal(t, old, get("k", "429"), "the 429 came to the old address")
	next := get("k", "200")
	assert.NotEqual(t, old, next, "after a 429, the next request of the session leaves from a new address")
	assert.Equal(t, next, get("k", "200"))
	assertEchoes(t, tunnel, "after the 429: the tunnel keeps its address and moves bytes")

	assert.Equal(t, "in-use", ctlAddrs(t, e)[old], "the open tunnel still holds the old address")
	require.NoError(t, tunnel.Close())
	nstest.WaitFor(t, "the old address to be given back once the tunnel closed", func() bool {
		return ctlAddrs(t, e)[old] != "in-use"
	})
	assert.Equal(t, "in-use", ctlAddrs(t, e)[next], "the session holds its new address")

	none := get("", "429")
	assert.NotContains(t, []netip.Addr{old, next}, none)
	assert.Equal(t, next, get("k", "200"), "a 429 without a session moves no session")
	assert.Equal(t, uint64(1), ctlStats(t, e).Sessions.Rotations["status"])
}
