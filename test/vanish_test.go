package test

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

// TestUpstreamResetMidBody: an upstream that resets its connection halfway
// through a response body leaves curl with a response it knows is
// incomplete (never a short one that looks whole), egressd logs the
// failure, gives the address back, and serves the next request; through a
// tunnel the reset reaches the client as the end of the tunnel.
func TestUpstreamResetMidBody(t *testing.T) {
	t.Parallel()
	e := start(t)
	const size = 1 << 20
	e.up.Handle("/reset", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(size))
		w.WriteHeader(http.StatusOK)
		w.Write(make([]byte, size/2))
		w.(http.Flusher).Flush()
		c, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0) // a reset, not a clean close
		}
		c.Close()
	}))

	for _, url := range []string{e.up.HTTPURL + "reset", e.up.HTTPSURL + "reset"} {
		out, err := e.tp.Host.Output("curl", "-q", "-sS", "-o", "/dev/null", "--max-time", "30",
			"-x", "http://"+proxyAddr, "--cacert", e.up.CAFile, url)
		require.Error(t, err, "curl must see the response as incomplete: %s", out)
		assert.Regexp(t, `\((18|56|92)\)`, err.Error(), "curl: partial file, or a receive failure")
	}
	waitRequestLogs(t, e.ed, 2, func(rec map[string]string) bool { return strings.Contains(rec["host"], "upstream.test") })
	assert.NotEmpty(t, e.ed.Log("upstream response body failed: aborting the response"), "the plain-HTTP failure is logged")
	nstest.WaitFor(t, "the addresses back", func() bool { return ctlStats(t, e).Addresses.InUse == 0 })

	code, _, err := e.tp.Host.CurlStatus("-x", "http://"+proxyAddr, e.up.HTTPURL)
	require.NoError(t, err)
	assert.Equal(t, "200", code, "served after the reset")
}

// TestClientVanishesMidRequest: a client that resets its connection while
// its request waits for a slow upstream, or in the middle of its request
// body, ends the upstream request (the upstream sees its connection go),
// gives the egress address back, and is logged as gone (499) or as a bad
// body, never as an upstream failure.
func TestClientVanishesMidRequest(t *testing.T) {
	t.Parallel()
	e := start(t)
	var arrived, ended atomic.Int64
	e.up.Handle("/slow", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived.Add(1)
		// A body that breaks off, or a context canceled once the body is
		// read: egressd closed the upstream connection.
		if _, err := io.Copy(io.Discard, r.Body); err != nil {
			ended.Add(1)
			return
		}
		select {
		case <-r.Context().Done():
			ended.Add(1)
		case <-time.After(nstest.Guard):
		}
	}))

	dial := func() net.Conn {
		c, err := e.tp.Host.DialContext(guardCtx(t), "tcp", proxyAddr)
		require.NoError(t, err)
		return c
	}
	reset := func(c net.Conn) {
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}

	// Waiting for the upstream's answer.
	c := dial()
	_, err := io.WriteString(c, "GET "+e.up.HTTPURL+"slow HTTP/1.1\r\nHost: "+nstest.UpstreamName+"\r\n\r\n")
	require.NoError(t, err)
	nstest.WaitFor(t, "the request upstream", func() bool { return arrived.Load() == 1 })
	reset(c)
	nstest.WaitFor(t, "the upstream request to end", func() bool { return ended.Load() == 1 })

	// In the middle of a body larger than egressd reads before it dials.
	c = dial()
	_, err = io.WriteString(c, "POST "+e.up.HTTPURL+"slow HTTP/1.1\r\nHost: "+nstest.UpstreamName+"\r\nContent-Length: 1000000\r\n\r\n")
	require.NoError(t, err)
	_, err = c.Write(make([]byte, 200_000))
	require.NoError(t, err)
	nstest.WaitFor(t, "the second request upstream", func() bool { return arrived.Load() == 2 })
	reset(c)
	nstest.WaitFor(t, "the second upstream request to end", func() bool { return ended.Load() == 2 })

	nstest.WaitFor(t, "the addresses back", func() bool { return ctlStats(t, e).Addresses.InUse == 0 })
	recs := waitRequestLogs(t, e.ed, 2, func(rec map[string]string) bool { return strings.HasSuffix(rec["host"], ":80") })
	for _, rec := range recs {
		assert.NotEqual(t, "502", rec["status"], "a vanished client blamed on the upstream: %v", rec)
	}
	assert.Zero(t, nstest.UpstreamStats(t, ctlStats(t, e), nstest.UpstreamName).Errors, "counted as an upstream error")

	// egressd still serves.
	c = dial()
	defer c.Close()
	_, err = io.WriteString(c, "GET "+e.up.HTTPURL+" HTTP/1.1\r\nHost: "+nstest.UpstreamName+"\r\n\r\n")
	require.NoError(t, err)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
}
