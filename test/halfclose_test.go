package test

import (
	"context"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

// TestHalfClosedClients: clients that half-close right after their request,
// as people type them, are served: nc -N (HTTP/1.0, and CONNECT with a
// request inside the tunnel) and socat (HTTP/1.1). Each answer comes whole,
// from a fresh address, and each access line says 200.
func TestHalfClosedClients(t *testing.T) {
	t.Parallel()
	e := start(t)
	send := func(stdin string, name string, args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), nstest.Guard)
		defer cancel()
		cmd := e.tp.Host.Command(ctx, name, args...)
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s %v: %s", name, args, out)
		return string(out)
	}
	host, port := "127.0.0.1", "3128"

	out := send("GET "+e.up.HTTPURL+" HTTP/1.0\r\n\r\n", "nc.openbsd", "-N", host, port)
	assert.Contains(t, out, " 200 OK\r\n", "nc -N, HTTP/1.0")
	assertFreshBody(t, out)

	// socat half-closes on stdin's EOF and waits -t seconds for the rest.
	out = send("GET "+e.up.HTTPURL+" HTTP/1.1\r\nHost: "+nstest.UpstreamName+"\r\n\r\n", "socat", "-t", "30", "-", "TCP:"+proxyAddr)
	assert.True(t, strings.HasPrefix(out, "HTTP/1.1 200 OK\r\n"), "socat, HTTP/1.1: %s", out)
	assertFreshBody(t, out)

	out = send("CONNECT "+nstest.UpstreamName+":80 HTTP/1.1\r\nHost: "+nstest.UpstreamName+":80\r\n\r\n"+
		"GET / HTTP/1.0\r\nHost: "+nstest.UpstreamName+"\r\n\r\n", "nc.openbsd", "-N", host, port)
	assert.True(t, strings.HasPrefix(out, "HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.0 200 OK\r\n"), "nc -N, CONNECT: %s", out)
	assertFreshBody(t, out)

	// A TLS tunnel whose client half-closes at once gets its 200 and an
	// end of tunnel, not a resolver error.
	out = send("CONNECT "+nstest.UpstreamName+":443 HTTP/1.1\r\nHost: "+nstest.UpstreamName+":443\r\n\r\n", "nc.openbsd", "-N", host, port)
	assert.True(t, strings.HasPrefix(out, "HTTP/1.1 200 Connection established\r\n"), "nc -N, CONNECT :443: %s", out)

	for _, rec := range waitRequestLogs(t, e.ed, 4, nil) {
		assert.Equal(t, "200", rec["status"], "%v", rec)
		assert.NotEmpty(t, rec["egress"], "%v", rec)
	}
}

// assertFreshBody checks that a raw HTTP answer ends with the echo
// upstream's body: a source address inside the egress prefix.
func assertFreshBody(t *testing.T, out string) {
	t.Helper()
	_, body, ok := strings.Cut(out, "\r\n\r\n")
	if strings.HasPrefix(body, "HTTP/") { // a tunnel: the upstream's own answer follows
		_, body, ok = strings.Cut(body, "\r\n\r\n")
	}
	require.True(t, ok, "no body in %q", out)
	assert.True(t, nstest.Prefix.Contains(parseBodies(t, body)[0]), "%q", body)
}
