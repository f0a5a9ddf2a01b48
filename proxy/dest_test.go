package proxy

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy/socks5"
)

func TestPorts(t *testing.T) {
	p, err := ParsePorts("443, 80,8000-8010,25")
	require.NoError(t, err)
	assert.Equal(t, "443,80,8000-8010,25", p.String())
	for port, want := range map[uint16]bool{443: true, 80: true, 8000: true, 8010: true, 8011: false, 25: true, 22: false, 1: false} {
		assert.Equal(t, want, p.Contains(port), "port %d", port)
	}
	// A range never covers a bad port; naming it alone does.
	wide := MustParsePorts(DefaultHTTPPorts)
	for port, want := range map[uint16]bool{80: true, 443: true, 8080: true, 1024: true, 65535: true, 22: false, 25: false,
		6000: false, 6667: false, 6379: false, 11211: false, 2049: false, 8443: true, 1023: false} {
		assert.Equal(t, want, wide.Contains(port), "port %d", port)
	}
	assert.True(t, MustParsePorts("6379").Contains(6379))
	assert.False(t, (*Ports)(nil).Contains(443))

	for _, bad := range []string{"", "0", "65536", "80-", "-80", "90-80", "http", "80,,443", "1-2-3"} {
		_, err := ParsePorts(bad)
		assert.Error(t, err, "%q", bad)
	}
}

// TestDestPolicy: CONNECT, SOCKS5 and plain HTTP to a port the lists leave
// out, or to a zoned address, are refused with 403 (SOCKS5: "not allowed by
// ruleset") before anything is dialed or counted; the answer names the
// reason in its body and in Proxy-Status, and so does the access log line.
// A refusal of the dialer's guard is answered the same way.
func TestDestPolicy(t *testing.T) {
	var logs logBuffer
	p := startProxy(t, nil, withLogger(slog.New(slog.NewTextHandler(&logs, nil))),
		withAccess(Access{ConnectPorts: MustParsePorts(DefaultConnectPorts), HTTPPorts: MustParsePorts(DefaultHTTPPorts)}))
	socksAddr := p.serveSOCKS(t)

	for _, tt := range []struct {
		name, head string
		status     int
		typ        string
		reason     string
	}{
		{"connect smtp", "CONNECT mail.test:25 HTTP/1.1\r\nHost: mail.test:25\r\n\r\n", 403, typeRequestDenied, "port 25 not allowed for tunnels (-connect-ports 443,80)"},
		{"connect ssh", "CONNECT h.test:22 HTTP/1.1\r\nHost: h.test:22\r\n\r\n", 403, typeRequestDenied, "port 22 not allowed for tunnels"},
		{"http smtp", "GET http://mail.test:25/ HTTP/1.1\r\nHost: mail.test:25\r\n\r\n", 403, typeRequestDenied, "port 25 not allowed for plain HTTP (-http-ports 80,443,1024-65535)"},
		{"http redis", "GET http://h.test:6379/ HTTP/1.1\r\nHost: h.test:6379\r\n\r\n", 403, typeRequestDenied, "port 6379 not allowed for plain HTTP"},
		{"http zoned loopback", "GET http://[::1%25lo]:8001/ HTTP/1.1\r\nHost: [::1%25lo]:8001\r\n\r\n", 403, typeDestProhibited, "a zoned address"},
		{"http zoned unspecified", "GET http://[::%25lo]:8001/ HTTP/1.1\r\nHost: x\r\n\r\n", 403, typeDestProhibited, "a zoned address"},
		{"http zoned link-local", "GET http://[fe80::1%25hv]/ HTTP/1.1\r\nHost: x\r\n\r\n", 403, typeDestProhibited, "a zoned address"},
		{"connect zoned", "CONNECT [fe80::1%25eth0]:443 HTTP/1.1\r\nHost: x\r\n\r\n", 403, typeDestProhibited, "a zoned address"},
		{"http bad port", "GET http://h.test:99999/ HTTP/1.1\r\nHost: h.test\r\n\r\n", 400, typeRequestError, "bad port 99999 in the URL"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			resp := proxyRequest(t, p, tt.head)
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			assert.Equal(t, tt.status, resp.StatusCode, "%s", body)
			assert.Contains(t, string(body), tt.reason)
			assertCleanErrorBody(t, string(body))
			ps := resp.Header.Get("Proxy-Status")
			assert.True(t, strings.HasPrefix(ps, "egressd; error="+tt.typ+"; details=\""), "Proxy-Status %q", ps)
			assert.Contains(t, ps, tt.reason)
		})
	}
	assert.Zero(t, p.dialer.calls(), "nothing refused was dialed")
	assert.Empty(t, p.Upstreams(), "nothing refused was counted for an upstream")

	// SOCKS5: ports and zones alike.
	for _, target := range []string{"mail.test:25", "h.test:22", "[::1%lo]:443"} {
		c := socksClient(t, socksAddr)
		rep, _ := socksConnect(t, c, "", target)
		assert.Equal(t, byte(socks5.ReplyNotAllowed), rep, target)
	}
	assert.Zero(t, p.dialer.calls(), "nothing refused was dialed")

	// The dialer's guard refuses an address a name resolved to.
	p.dialer.fail = func(_ context.Context, addr string) error {
		return &netutil.DeniedError{Addr: netip.MustParseAddr("10.0.0.7"), Reason: "a private network (RFC 1918)", Special: true}
	}
	resp := proxyRequest(t, p, "CONNECT internal.test:443 HTTP/1.1\r\nHost: internal.test:443\r\n\r\n")
	body, _ := io.ReadAll(resp.Body)
	assert.Equal(t, http.StatusForbidden, resp.StatusCode)
	const want = "destination internal.test (10.0.0.7) not allowed: a private network (RFC 1918); -allow-dest re-admits it"
	assert.Equal(t, want+"\n", string(body))
	assert.Equal(t, `egressd; error=destination_ip_prohibited; details="`+want+`"`, resp.Header.Get("Proxy-Status"))
	resp = proxyRequest(t, p, "GET http://internal.test/ HTTP/1.1\r\nHost: internal.test\r\n\r\n")
	body, _ = io.ReadAll(resp.Body)
	assert.Equal(t, http.StatusForbidden, resp.StatusCode)
	assert.Equal(t, want+"\n", string(body))
	assert.Contains(t, resp.Header.Get("Proxy-Status"), "destination_ip_prohibited")
	c := socksClient(t, socksAddr)
	rep, _ := socksConnect(t, c, "", "internal.test:443")
	assert.Equal(t, byte(socks5.ReplyNotAllowed), rep)

	// Every refusal's access line says why.
	require.Eventually(t, func() bool { return strings.Count(logs.String(), "msg=request") >= 15 }, 10*time.Second, 10*time.Millisecond)
	for line := range strings.Lines(logs.String()) {
		if strings.Contains(line, "msg=request") {
			assert.Contains(t, line, " reason=", "access line without a reason: %s", line)
		}
	}
	assert.Contains(t, logs.String(), `reason="port 25 not allowed for tunnels (-connect-ports 443,80)"`)
}

func TestSFString(t *testing.T) {
	assert.Equal(t, `"a \"b\" \\ c?"`, sfString("a \"b\" \\ c\n"))
	assert.Equal(t, `"??"`, sfString("é"))
}
