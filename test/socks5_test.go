package test

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

const socksAddr = "127.0.0.1:1080"

// TestSOCKS5: curl through -socks5, names resolved by egressd
// (--socks5-hostname), HTTP and HTTPS, with and without a user name and
// password: every connection leaves from its own address, the access log
// says SOCKS5, and egressctl counts them under the upstream.
func TestSOCKS5(t *testing.T) {
	t.Parallel()
	e := start(t, "-socks5", socksAddr)
	const runs = 10

	total := 0
	for _, scheme := range []string{"http", "https"} {
		for _, user := range []string{"", "session-k1:pw"} {
			name := scheme + " no auth"
			if user != "" {
				name = scheme + " user/password"
			}
			t.Run(name, func(t *testing.T) {
				e.up.Reset()
				url := e.up.HTTPURL
				if scheme == "https" {
					url = e.up.HTTPSURL
				}
				var bodies []netip.Addr
				for i := range runs {
					// One curl per request: curl would reuse a tunnel for
					// several URLs, and a tunnel has one address.
					args := []string{"-q", "-sS", "--max-time", "30", "--socks5-hostname", socksAddr,
						"--cacert", e.up.CAFile}
					if user != "" {
						args = append(args, "-U", user)
					}
					out := e.tp.Host.Run(t, "curl", append(args, fmt.Sprintf("%s?i=%d", url, i))...)
					bodies = append(bodies, parseBodies(t, out)...)
				}
				peers := e.up.Peers()
				assertFresh(t, peers, runs)
				assert.Equal(t, peers, bodies)
				total += runs

				recs := waitRequestLogs(t, e.ed, runs, egressIn(peers))
				assert.Len(t, recs, runs, "one access line per connection")
				var egress []string
				port := "80"
				if scheme == "https" {
					port = "443"
				}
				for _, rec := range recs {
					assert.Equal(t, "SOCKS5", rec["method"])
					assert.Equal(t, nstest.UpstreamName+":"+port, rec["host"], "the name, as the client sent it")
					assert.Equal(t, "200", rec["status"])
					assert.Equal(t, "0", rec["socks_reply"])
					egress = append(egress, rec["egress"])
				}
				var want []string
				for _, p := range peers {
					want = append(want, p.String())
				}
				assert.ElementsMatch(t, want, egress)
			})
		}
	}

	s := ctlStats(t, e)
	u := nstest.UpstreamStats(t, s, nstest.UpstreamName)
	assert.EqualValues(t, total, u.Requests, "egressctl counts every SOCKS5 connection")
	assert.Zero(t, u.Errors)
	assert.Zero(t, u.InFlight)
	assert.Positive(t, u.BytesDown)
	assert.Positive(t, u.BytesUp)
}

// TestSOCKS5Errors: a name that does not resolve is "host unreachable",
// and SOCKS5 is off without -socks5.
func TestSOCKS5Errors(t *testing.T) {
	t.Parallel()
	e := start(t, "-socks5", socksAddr)
	_, err := e.tp.Host.Output("curl", "-q", "-sS", "--max-time", "30", "--socks5-hostname", socksAddr, "http://nosuch.test/")
	require.Error(t, err)
	rec := waitRequestLogs(t, e.ed, 1, nil)[0]
	assert.Equal(t, "SOCKS5", rec["method"])
	assert.Equal(t, "nosuch.test:80", rec["host"])
	assert.Equal(t, "502", rec["status"])
	assert.Equal(t, "4", rec["socks_reply"])

	plain := start(t) // its own topology, without -socks5
	out, err := plain.tp.Host.Output("curl", "-q", "-sS", "--max-time", "30", "--socks5-hostname", socksAddr, plain.up.HTTPURL)
	require.Error(t, err, "nothing listens on %s: %s", socksAddr, out)
}

// TestSOCKS5Session: under -rotate session, a SOCKS5 user name session-KEY
// keeps one address per key, different keys get different addresses, and the
// key is the same as the HTTP proxy's (X-Egress-Session).
func TestSOCKS5Session(t *testing.T) {
	t.Parallel()
	e := start(t, "-socks5", socksAddr, "-rotate", "session")
	via := func(user string) string {
		t.Helper()
		out := e.tp.Host.Run(t, "curl", "-q", "-sS", "--max-time", "30", "--socks5-hostname", socksAddr,
			"-U", user, e.up.HTTPURL)
		return strings.TrimSpace(out)
	}
	a1, a2 := via("session-a:x"), via("session-a:y")
	b := via("session-b:x")
	assert.Equal(t, a1, a2, "one address per session key")
	assert.NotEqual(t, a1, b, "different keys, different addresses")

	req, err := http.NewRequestWithContext(guardCtx(t), http.MethodGet, e.up.HTTPURL, nil)
	require.NoError(t, err)
	req.Header.Set("X-Egress-Session", "a")
	resp, err := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false).Do(req)
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, a1, strings.TrimSpace(string(body)), "SOCKS5 and HTTP share session keys")
}
