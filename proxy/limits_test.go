package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/proxy/socks5"
	"github.com/egressd/egressd/proxy/stats"
)

func withLimits(l Limits) proxyOpt { return func(c *Config) { c.Limits = l } }

func withClientTimeout(d time.Duration) proxyOpt { return func(c *Config) { c.ClientTimeout = d } }

// withJSONLog logs to logs as JSON lines, for accessLines.
func withJSONLog(logs *logBuffer) proxyOpt {
	return withLogger(slog.New(slog.NewJSONHandler(logs, nil)))
}

// accessLines returns the access log lines ("request") in logs that keep
// accepts.
func accessLines(t testing.TB, logs *logBuffer, keep func(map[string]any) bool) []map[string]any {
	t.Helper()
	var recs []map[string]any
	for line := range strings.Lines(logs.String()) {
		var rec map[string]any
		require.NoError(t, json.Unmarshal([]byte(line), &rec), "%s", line)
		if rec["msg"] == "request" && (keep == nil || keep(rec)) {
			recs = append(recs, rec)
		}
	}
	return recs
}

// waitAccessLines waits until logs hold n access lines that keep accepts.
func waitAccessLines(t testing.TB, logs *logBuffer, n int, keep func(map[string]any) bool) []map[string]any {
	t.Helper()
	require.Eventually(t, func() bool { return len(accessLines(t, logs, keep)) >= n }, 10*time.Second, 10*time.Millisecond,
		"%d access lines; log:\n%s", n, logs.String())
	return accessLines(t, logs, keep)
}

func withStatus(status int) func(map[string]any) bool {
	return func(rec map[string]any) bool { return rec["status"] == float64(status) }
}

// dialFrom opens a connection to addr from the loopback address src
// (127.0.0.1, 127.0.0.2, ...: each is a client address of its own).
func dialFrom(t testing.TB, src, addr string) *net.TCPConn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp4", addr)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	require.NoError(t, c.SetDeadline(time.Now().Add(20*time.Second)))
	return c.(*net.TCPConn)
}

// readAnswer reads an HTTP response from c, with its whole body.
func readAnswer(t testing.TB, c net.Conn, method string) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: method})
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, string(body)
}

// assertRefusal checks an answer of egressd's own: status, Proxy-Status
// type and reason, and the reason as the one-line body.
func assertRefusal(t testing.TB, resp *http.Response, body string, status int, typ, reason string) {
	t.Helper()
	assert.Equal(t, status, resp.StatusCode, "body %q", body)
	assert.Equal(t, reason+"\n", body)
	assert.Equal(t, "egressd; error="+typ+"; details="+sfString(reason), resp.Header.Get("Proxy-Status"))
}

// getVia sends a plain GET for url on c and returns the answer.
func getVia(t testing.TB, c net.Conn, url string) (*http.Response, string) {
	t.Helper()
	host := strings.TrimPrefix(url, "http://")
	host, _, _ = strings.Cut(host, "/")
	_, err := io.WriteString(c, "GET "+url+" HTTP/1.1\r\nHost: "+host+"\r\nConnection: close\r\n\r\n")
	require.NoError(t, err)
	return readAnswer(t, c, http.MethodGet)
}

// waitRefusals waits until no refusal of a connection over a cap is being
// answered, so that none outlives its test.
func waitRefusals(t testing.TB, p *testProxy) {
	t.Helper()
	require.Eventually(t, func() bool { return len(p.refusing) == 0 }, 10*time.Second, 10*time.Millisecond)
}

// TestConnLimits: past -max-conns-per-client a client address's new
// connection is answered 503 at once (HTTP, without a request; SOCKS5, with
// the general failure after the method negotiation), while another address
// is still served; past -max-conns anyone's is; a closed connection frees
// its place. Each refusal is logged and counted.
func TestConnLimits(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }))
	t.Cleanup(up.Close)
	var logs logBuffer
	p := startProxy(t, nil, withLimits(Limits{MaxConns: 4, MaxConnsPerClient: 2}), withJSONLog(&logs))
	socksAddr := p.serveSOCKS(t)

	a1 := dialFrom(t, "127.0.0.1", p.addr)
	dialFrom(t, "127.0.0.1", socksAddr) // HTTP and SOCKS5 count together
	require.Eventually(t, func() bool { return p.ClientStats().Connections == 2 }, 10*time.Second, time.Millisecond)

	resp, body := readAnswer(t, dialFrom(t, "127.0.0.1", p.addr), http.MethodGet)
	assertRefusal(t, resp, body, http.StatusServiceUnavailable, typeConnLimit, "this client has too many connections open (-max-conns-per-client)")
	assert.True(t, resp.Close)
	rep, _ := socksConnect(t, dialFrom(t, "127.0.0.1", socksAddr), "", "192.0.2.1:443")
	assert.EqualValues(t, socks5.ReplyGeneralFailure, rep, "SOCKS5 over the cap")

	// Another address is another client.
	b1 := dialFrom(t, "127.0.0.2", p.addr)
	resp, body = getVia(t, b1, up.URL+"/")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "ok", body)

	// The total: b1 is closing, b2 and b3 make four.
	dialFrom(t, "127.0.0.3", p.addr)
	dialFrom(t, "127.0.0.3", p.addr)
	require.Eventually(t, func() bool { return p.ClientStats().Connections == 4 }, 10*time.Second, time.Millisecond)
	resp, body = readAnswer(t, dialFrom(t, "127.0.0.4", p.addr), http.MethodGet)
	assertRefusal(t, resp, body, http.StatusServiceUnavailable, typeConnLimit, "egressd has too many client connections open (-max-conns)")

	// A closed connection frees its place.
	require.NoError(t, a1.Close())
	require.Eventually(t, func() bool { return p.ClientStats().Connections == 3 }, 10*time.Second, time.Millisecond)
	resp, _ = getVia(t, dialFrom(t, "127.0.0.1", p.addr), up.URL+"/")
	assert.Equal(t, http.StatusOK, resp.StatusCode)

	waitRefusals(t, p)
	cs := p.ClientStats()
	assert.Equal(t, uint64(2), cs.Refused["max_conns_per_client"])
	assert.Equal(t, uint64(1), cs.Refused["max_conns"])
	lines := waitAccessLines(t, &logs, 3, withStatus(http.StatusServiceUnavailable))
	for _, rec := range lines {
		assert.Contains(t, rec["reason"], "too many", "%v", rec)
	}
	assert.Len(t, accessLines(t, &logs, func(rec map[string]any) bool { return rec["method"] == "SOCKS5" }), 1)
}

// TestAddrsPerClient: past -max-addrs-per-client a client's next request or
// tunnel is answered 503 with the reason, by HTTP, CONNECT and SOCKS5 alike,
// while another client is still served; the refusal is no upstream error;
// a tunnel that ends gives its address back.
func TestAddrsPerClient(t *testing.T) {
	u := startTCPUpstream(t)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }))
	t.Cleanup(up.Close)
	var logs logBuffer
	p := startProxy(t, nil, withLimits(Limits{MaxAddrsPerClient: 2}), withJSONLog(&logs))
	socksAddr := p.serveSOCKS(t)

	connect := func(src string) (*net.TCPConn, *http.Response, string) {
		c := dialFrom(t, src, p.addr)
		_, err := io.WriteString(c, "CONNECT "+u.addr+" HTTP/1.1\r\nHost: "+u.addr+"\r\n\r\n")
		require.NoError(t, err)
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
		require.NoError(t, err)
		var body string
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(resp.Body)
			body = string(b)
		}
		return c, resp, body
	}
	t1, resp, _ := connect("127.0.0.1")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	s1 := u.accept(t)
	_, resp, _ = connect("127.0.0.1")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	u.accept(t)

	const reason = "this client holds 2 egress addresses (-max-addrs-per-client)"
	_, resp, body := connect("127.0.0.1")
	assertRefusal(t, resp, body, http.StatusServiceUnavailable, typeConnLimit, reason)
	resp, body = getVia(t, dialFrom(t, "127.0.0.1", p.addr), up.URL+"/")
	assertRefusal(t, resp, body, http.StatusServiceUnavailable, typeConnLimit, reason)
	rep, _ := socksConnect(t, dialFrom(t, "127.0.0.1", socksAddr), "", u.addr)
	assert.EqualValues(t, socks5.ReplyGeneralFailure, rep)

	// Another client is served.
	_, resp, _ = connect("127.0.0.2")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	u.accept(t)

	// A tunnel that ends gives its address back.
	require.NoError(t, t1.Close())
	require.NoError(t, s1.Close())
	require.Eventually(t, func() bool {
		c, resp, _ := connect("127.0.0.1")
		_ = c.Close()
		return resp.StatusCode == http.StatusOK
	}, 10*time.Second, 20*time.Millisecond)
	u.accept(t)

	for _, ups := range p.Upstreams() {
		assert.Zero(t, ups.Errors, "a refusal of the client is no upstream error: %+v", ups)
	}
	lines := waitAccessLines(t, &logs, 3, withStatus(http.StatusServiceUnavailable))
	for _, rec := range lines {
		assert.Equal(t, reason, rec["reason"])
		assert.Empty(t, rec["egress"])
	}
	assert.GreaterOrEqual(t, p.ClientStats().Refused["max_addrs_per_client"], uint64(3))
}

// TestAddrsPerClientRotate: with -rotate session the sessions a client
// opened count against it, with -rotate connection its connections' held
// addresses; a session that ends gives its place back.
func TestAddrsPerClientRotate(t *testing.T) {
	up := startConnUpstream(t)
	t.Run("session", func(t *testing.T) {
		h := &fakeHold{}
		p := startProxy(t, nil, withRotate(RotateSession, h), withLimits(Limits{MaxAddrsPerClient: 2}),
			func(c *Config) { c.SessionIdle = 200 * time.Millisecond })
		status := func(src, key string) int {
			c := dialFrom(t, src, p.addr)
			_, err := io.WriteString(c, "GET http://"+up.addr+"/ HTTP/1.1\r\nHost: "+up.addr+"\r\n"+SessionHeader+": "+key+"\r\nConnection: close\r\n\r\n")
			require.NoError(t, err)
			resp, _ := readAnswer(t, c, http.MethodGet)
			return resp.StatusCode
		}
		assert.Equal(t, http.StatusOK, status("127.0.0.1", "a"))
		assert.Equal(t, http.StatusOK, status("127.0.0.1", "b"))
		assert.Equal(t, http.StatusOK, status("127.0.0.1", "a"), "a session it holds")
		assert.Equal(t, http.StatusServiceUnavailable, status("127.0.0.1", "c"), "a third session")
		assert.Equal(t, http.StatusOK, status("127.0.0.2", "c"), "another client")
		// Idle sessions end and give their places back.
		require.Eventually(t, func() bool { return status("127.0.0.1", "d") == http.StatusOK }, 10*time.Second, 50*time.Millisecond)
	})
	t.Run("connection", func(t *testing.T) {
		h := &fakeHold{}
		p := startProxy(t, nil, withRotate(RotateConnection, h), withLimits(Limits{MaxAddrsPerClient: 1}))
		first := dialFrom(t, "127.0.0.1", p.addr)
		request := func(c net.Conn) int {
			_, err := io.WriteString(c, "GET http://"+up.addr+"/ HTTP/1.1\r\nHost: "+up.addr+"\r\n\r\n")
			require.NoError(t, err)
			resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodGet})
			require.NoError(t, err)
			_, _ = io.Copy(io.Discard, resp.Body)
			return resp.StatusCode
		}
		assert.Equal(t, http.StatusOK, request(first))
		assert.Equal(t, http.StatusOK, request(first), "the connection's address, again")
		second := dialFrom(t, "127.0.0.1", p.addr)
		assert.Equal(t, http.StatusServiceUnavailable, request(second))
		require.NoError(t, first.Close())
		require.Eventually(t, func() bool { return request(dialFrom(t, "127.0.0.1", p.addr)) == http.StatusOK },
			10*time.Second, 20*time.Millisecond, "a closed connection gives its address back")
	})
}

// TestHeaderTimeout: a client that does not finish its request head within
// ClientTimeout (a slowloris), or sends nothing at all, is cut off, logged
// with 408 and counted; nothing is dialed for it. A keep-alive connection
// that idles between requests is not.
func TestHeaderTimeout(t *testing.T) {
	var logs logBuffer
	p := startProxy(t, nil, withClientTimeout(300*time.Millisecond), withJSONLog(&logs))

	slow := dialFrom(t, "127.0.0.1", p.addr)
	_, err := io.WriteString(slow, "GET http://example.test/ HTTP/1.1\r\nHost: exa")
	require.NoError(t, err)
	silent := dialFrom(t, "127.0.0.1", p.addr)
	for _, c := range []net.Conn{slow, silent} {
		_, err := c.Read(make([]byte, 1))
		assert.ErrorIs(t, err, io.EOF, "closed by egressd without an answer")
	}
	lines := waitAccessLines(t, &logs, 2, withStatus(http.StatusRequestTimeout))
	reasons := map[string]string{}
	for _, rec := range lines {
		reasons[rec["method"].(string)] = rec["reason"].(string)
	}
	assert.Equal(t, map[string]string{
		"GET": "request head not complete within 300ms (-client-timeout)",
		"-":   "no request within 300ms (-client-timeout)",
	}, reasons)
	assert.Equal(t, uint64(2), p.ClientStats().Refused["header_timeout"])
	assert.Zero(t, p.dialer.calls())
}

// TestBodyTimeout: a client that stalls in its request body for
// ClientTimeout gets 408, is logged and counted, and the upstream is not
// blamed. A small body (up to 64 KiB) is read before anything is dialed; a
// larger one streams, and its upstream connection is closed at once.
func TestBodyTimeout(t *testing.T) {
	upClosed := make(chan struct{}, 1)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, err := io.Copy(io.Discard, r.Body)
		if err != nil {
			upClosed <- struct{}{}
		}
	}))
	t.Cleanup(up.Close)
	host := strings.TrimPrefix(up.URL, "http://")

	for _, tt := range []struct {
		name        string
		length, got int // Content-Length, and the bytes sent before stalling
		dialed      bool
	}{
		{"small", 1000, 10, false},
		{"large", 200 << 10, 70 << 10, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var logs logBuffer
			p := startProxy(t, nil, withClientTimeout(300*time.Millisecond), withJSONLog(&logs))
			c := dialFrom(t, "127.0.0.1", p.addr)
			head := "POST " + up.URL + "/ HTTP/1.1\r\nHost: " + host + "\r\nContent-Length: " + strconv.Itoa(tt.length) + "\r\n\r\n"
			_, err := c.Write(append([]byte(head), bytes.Repeat([]byte("x"), tt.got)...))
			require.NoError(t, err)
			resp, body := readAnswer(t, c, http.MethodPost)
			assertRefusal(t, resp, body, http.StatusRequestTimeout, typeRequestError, "request body stalled for 300ms (-client-timeout)")
			assert.True(t, resp.Close)
			if tt.dialed {
				assert.Equal(t, 1, p.dialer.calls())
				select {
				case <-upClosed:
				case <-time.After(10 * time.Second):
					t.Fatal("the upstream connection stayed open")
				}
			} else {
				assert.Zero(t, p.dialer.calls(), "nothing dialed for a small body that stalled")
			}
			rec := waitAccessLines(t, &logs, 1, withStatus(http.StatusRequestTimeout))[0]
			assert.Equal(t, "request body stalled for 300ms (-client-timeout)", rec["reason"])
			assert.Equal(t, float64(tt.got), rec["bytes_up"])
			assert.Equal(t, uint64(1), p.ClientStats().Refused["body_timeout"])
			for _, u := range p.Upstreams() {
				assert.Zero(t, u.Errors, "not the upstream's fault")
			}
		})
	}
}

// TestBadBody: a malformed chunked body, or one that ends early, gets 400
// with the reason, costs no dial when small, and is not counted as an
// upstream error. A good small body, chunked, reaches the upstream whole
// with its length.
func TestBadBody(t *testing.T) {
	var got atomic.Value
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got.Store(r.Header.Get("Content-Length") + " " + string(b) + " " + strings.Join(r.TransferEncoding, ","))
	}))
	t.Cleanup(up.Close)
	host := strings.TrimPrefix(up.URL, "http://")
	for _, tt := range []struct {
		name, head, body string
		status           int
		reason           string
	}{
		{"malformed chunk", "Transfer-Encoding: chunked\r\n", "5\r\nhello\r\nzz\r\n", http.StatusBadRequest, "malformed request body: invalid byte in chunk length"},
		{"chunk ends early", "Transfer-Encoding: chunked\r\n", "5\r\nhel", http.StatusBadRequest, "request body ended early (shorter than its Content-Length, or its chunks)"},
		{"shorter than its length", "Content-Length: 10\r\n", "hello", http.StatusBadRequest, "request body ended early (shorter than its Content-Length, or its chunks)"},
		{"good chunked", "Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n", http.StatusOK, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var logs logBuffer
			p := startProxy(t, nil, withJSONLog(&logs))
			c := dialFrom(t, "127.0.0.1", p.addr)
			_, err := io.WriteString(c, "POST "+up.URL+"/ HTTP/1.1\r\nHost: "+host+"\r\n"+tt.head+"\r\n"+tt.body)
			require.NoError(t, err)
			if tt.status != http.StatusOK {
				require.NoError(t, c.CloseWrite()) // the body ends here
			}
			resp, body := readAnswer(t, c, http.MethodPost)
			if tt.status == http.StatusOK {
				assert.Equal(t, http.StatusOK, resp.StatusCode)
				assert.Equal(t, "5 hello ", got.Load(), "sent with its length")
				return
			}
			assertRefusal(t, resp, body, tt.status, typeRequestError, tt.reason)
			assert.Zero(t, p.dialer.calls(), "nothing dialed")
			rec := waitAccessLines(t, &logs, 1, withStatus(tt.status))[0]
			assert.Equal(t, tt.reason, rec["reason"])
			assert.Equal(t, uint64(1), p.ClientStats().Refused["bad_body"])
			assert.NotContains(t, logs.String(), "upstream failed")
		})
	}
}

// TestMalformedRequests: every request net/http refuses by itself gets
// egressd's answer instead (the same status, a reason, Proxy-Status), one
// access log line with the method it could read, and a count; so do those
// egressd refuses for their head (too many fields, HTTP/2).
func TestMalformedRequests(t *testing.T) {
	const ok = "GET http://example.test/ HTTP/1.1\r\nHost: example.test\r\n"
	many := ok
	for i := range maxHeaderFields {
		many += "X-F" + strconv.Itoa(i) + ": 1\r\n"
	}
	for _, tt := range []struct {
		name, req string
		status    int
		method    string
		reason    string
		refused   stats.Refusal
	}{
		{"two Content-Lengths", "POST http://example.test/ HTTP/1.1\r\nHost: example.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
			400, "POST", "malformed request: conflicting Content-Length headers", stats.RefusedMalformed},
		{"bad Content-Length", "POST http://example.test/ HTTP/1.1\r\nHost: example.test\r\nContent-Length: -1\r\n\r\n",
			400, "POST", "malformed request: bad Content-Length", stats.RefusedMalformed},
		{"Transfer-Encoding gzip", "POST http://example.test/ HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: gzip\r\n\r\n",
			501, "POST", "unsupported Transfer-Encoding: egressd takes chunked only, in one header field", stats.RefusedMalformed},
		{"two Transfer-Encodings", "POST http://example.test/ HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
			501, "POST", "unsupported Transfer-Encoding: egressd takes chunked only, in one header field", stats.RefusedMalformed},
		{"bad request line", "GET http://example.test/\r\nHost: example.test\r\n\r\n", 400, "GET", "malformed request: bad request line", stats.RefusedMalformed},
		{"bad method", "G(T http://example.test/ HTTP/1.1\r\nHost: example.test\r\n\r\n", 400, "-", "malformed request: invalid method", stats.RefusedMalformed},
		{"bad version", "GET http://example.test/ HTTP/x.y\r\nHost: example.test\r\n\r\n", 400, "GET", "malformed request: malformed HTTP version", stats.RefusedMalformed},
		{"HTTP/3", "GET http://example.test/ HTTP/3.0\r\nHost: example.test\r\n\r\n", 505, "GET", "unsupported HTTP version: egressd speaks HTTP/1.x", stats.RefusedMalformed},
		{"no Host", "GET http://example.test/ HTTP/1.1\r\n\r\n", 400, "GET", "malformed request: missing required Host header", stats.RefusedMalformed},
		{"two Hosts", ok + "Host: other.test\r\n\r\n", 400, "GET", "malformed request: more than one Host header", stats.RefusedMalformed},
		{"bad Host", "GET http://example.test/ HTTP/1.1\r\nHost: exa mple\r\n\r\n", 400, "GET", "malformed request: malformed Host header", stats.RefusedMalformed},
		{"bad header name", ok + "X Y: 1\r\n\r\n", 400, "GET", "malformed request: invalid header name", stats.RefusedMalformed},
		{"bad header value", ok + "X-Y: a\x01b\r\n\r\n", 400, "GET", "malformed request: malformed header line", stats.RefusedMalformed},
		{"header line without colon", ok + "nocolon\r\n\r\n", 400, "GET", "malformed request: malformed header line", stats.RefusedMalformed},
		{"bad target", "GET ht%tp://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "GET", "malformed request: bad request target", stats.RefusedMalformed},
		{"Expect", "POST http://example.test/ HTTP/1.1\r\nHost: example.test\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\n",
			417, "POST", "unsupported Expect: egressd supports 100-continue only", stats.RefusedMalformed},
		{"1 MB header", ok + "X-Big: " + strings.Repeat("a", 1<<20) + "\r\n\r\n", 431, "GET", "request head larger than 64 KiB", stats.RefusedHeaderTooLarge},
		{"101 fields", many + "\r\n", 431, "GET", "request head with more than 100 header fields", stats.RefusedHeaderTooLarge},
		{"HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "PRI", "egressd speaks HTTP/1.1 only: send requests without the HTTP/2 preface", stats.RefusedMalformed},
		{"incomplete head", "GET http://example.test/ HTTP/1.1\r\nHost: exa", 400, "GET", "malformed request: incomplete request head (the client stopped sending it)", stats.RefusedMalformed},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var logs logBuffer
			p := startProxy(t, nil, withJSONLog(&logs))
			c := dialFrom(t, "127.0.0.1", p.addr)
			go func() {
				_, _ = io.WriteString(c, tt.req)
				if strings.HasSuffix(tt.name, "incomplete head") {
					_ = c.CloseWrite()
				}
			}()
			method := tt.method
			if method == "-" {
				method = http.MethodGet
			}
			resp, body := readAnswer(t, c, method)
			typ := typeRequestError
			if tt.name == "HTTP/2 preface" {
				typ = typeProtocolError
			}
			assertRefusal(t, resp, body, tt.status, typ, tt.reason)
			assert.True(t, resp.Close, "the connection closes")
			recs := waitAccessLines(t, &logs, 1, nil)
			require.Len(t, recs, 1, "one access line")
			assert.Equal(t, float64(tt.status), recs[0]["status"])
			assert.Equal(t, tt.method, recs[0]["method"])
			assert.Equal(t, tt.reason, recs[0]["reason"])
			assert.Equal(t, uint64(1), p.ClientStats().Refused[tt.refused.String()])
			assert.Zero(t, p.dialer.calls())
		})
	}
}

// TestWriteTimeout: a download to a client that stopped reading ends after
// ClientTimeout without progress: the response is aborted, the upstream
// connection closed (giving its address back), the line logged and
// counted.
func TestWriteTimeout(t *testing.T) {
	upDone := make(chan error, 1)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		chunk := bytes.Repeat([]byte("d"), 64<<10)
		for {
			if _, err := w.Write(chunk); err != nil {
				upDone <- err
				return
			}
		}
	}))
	t.Cleanup(up.Close)
	var logs logBuffer
	p := startProxy(t, nil, withClientTimeout(300*time.Millisecond), withJSONLog(&logs))
	c := dialFrom(t, "127.0.0.1", p.addr)
	require.NoError(t, c.SetReadBuffer(4096))
	_, err := io.WriteString(c, "GET "+up.URL+"/ HTTP/1.1\r\nHost: "+strings.TrimPrefix(up.URL, "http://")+"\r\n\r\n")
	require.NoError(t, err)
	// The client reads nothing.
	select {
	case err := <-upDone:
		assert.Error(t, err, "the upstream's writes fail once egressd closed its connection")
	case <-time.After(20 * time.Second):
		t.Fatal("the upstream connection stayed open")
	}
	rec := waitAccessLines(t, &logs, 1, nil)[0]
	assert.Equal(t, "client read nothing for 300ms (-client-timeout): response aborted", rec["reason"])
	assert.Equal(t, float64(http.StatusOK), rec["status"], "the status it had been sent")
	assert.Equal(t, uint64(1), p.ClientStats().Refused["write_timeout"])
	require.Eventually(t, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond)
}

// TestLoginThrottle: after 10 failed logins in a row from one address,
// attempts before the address's turn (one every 6 s) are answered 429 with
// Retry-After without checking the password, the right one included; a
// login remembered from before still works; other addresses are not held;
// a right password at the address's turn lets it in and forgets its
// failures. SOCKS5 gets the failure status.
func TestLoginThrottle(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }))
	t.Cleanup(up.Close)
	var logs logBuffer
	p := startProxy(t, nil, withAccess(Access{Users: testUsers(t, "alice", "pw")}), withJSONLog(&logs))
	socksAddr := p.serveSOCKS(t)
	var now atomic.Int64
	now.Store(time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC).UnixNano())
	p.logins.now = func() time.Time { return time.Unix(0, now.Load()) }

	try := func(src, creds string) *http.Response {
		c := dialFrom(t, src, p.addr)
		host := strings.TrimPrefix(up.URL, "http://")
		_, err := io.WriteString(c, "GET "+up.URL+"/ HTTP/1.1\r\nHost: "+host+"\r\nProxy-Authorization: "+basicAuth(creds)+"\r\nConnection: close\r\n\r\n")
		require.NoError(t, err)
		resp, _ := readAnswer(t, c, http.MethodGet)
		return resp
	}
	// A second user name and password remembered before the flood.
	assert.Equal(t, http.StatusOK, try("127.0.0.1", "alice:pw").StatusCode)
	for i := range loginFreeFailures {
		assert.Equal(t, http.StatusProxyAuthRequired, try("127.0.0.1", "alice:guess"+strconv.Itoa(i)).StatusCode, "failure %d", i+1)
	}
	resp := try("127.0.0.1", "alice:guess-more")
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.Equal(t, "6", resp.Header.Get("Retry-After"))
	now.Add(int64(2 * time.Second))
	resp = try("127.0.0.1", "bob:pw")
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode, "not checked before its turn")
	assert.Equal(t, "4", resp.Header.Get("Retry-After"))
	assert.Equal(t, http.StatusOK, try("127.0.0.1", "alice:pw").StatusCode, "a remembered login still works")
	assert.Equal(t, http.StatusProxyAuthRequired, try("127.0.0.2", "alice:guess").StatusCode, "another address is not held")

	c := dialFrom(t, "127.0.0.1", socksAddr)
	_, err := c.Write([]byte{5, 1, socks5.MethodUserPass, 1, 5, 'a', 'l', 'i', 'c', 'e', 2, 'n', 'o'})
	require.NoError(t, err)
	assert.Equal(t, []byte{5, socks5.MethodUserPass, 1, 1}, readFull(t, c, 4), "SOCKS5: the failure status")

	// Its turn: a wrong password is checked (407), and the next waits again.
	now.Add(int64(4 * time.Second))
	assert.Equal(t, http.StatusProxyAuthRequired, try("127.0.0.1", "alice:guess-at-turn").StatusCode)
	assert.Equal(t, http.StatusTooManyRequests, try("127.0.0.1", "alice:pw2").StatusCode)
	// At the next turn the right password (a new one, not remembered: the
	// cache is emptied) lets it in, and its failures are forgotten.
	now.Add(int64(6 * time.Second))
	p.SetAccess(Access{Users: testUsers(t, "alice", "pw2")})
	assert.Equal(t, http.StatusOK, try("127.0.0.1", "alice:pw2").StatusCode)
	assert.Equal(t, http.StatusProxyAuthRequired, try("127.0.0.1", "alice:guess").StatusCode, "a fresh start")

	lines := waitAccessLines(t, &logs, 4, withStatus(http.StatusTooManyRequests)) // 3 HTTP, 1 SOCKS5
	cs := p.ClientStats()
	assert.Equal(t, uint64(4), cs.Refused["login_throttled"])
	assert.Equal(t, uint64(13), cs.Refused["login_failed"])
	assert.Equal(t, "too many failed logins from this address: try again in 6 s", lines[0]["reason"])
}

// TestLoginSlots: no more bcrypt checks run at once than there are slots.
func TestLoginSlots(t *testing.T) {
	g := newLoginGuard()
	var running, most atomic.Int32
	done := make(chan struct{})
	for range 4 * cap(g.slots) {
		go func() {
			defer func() { done <- struct{}{} }()
			g.check(context.Background(), func() bool {
				n := running.Add(1)
				for {
					m := most.Load()
					if n <= m || most.CompareAndSwap(m, n) {
						break
					}
				}
				time.Sleep(5 * time.Millisecond)
				running.Add(-1)
				return false
			})
		}()
	}
	for range 4 * cap(g.slots) {
		<-done
	}
	assert.LessOrEqual(t, int(most.Load()), cap(g.slots))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for range cap(g.slots) {
		g.slots <- struct{}{}
	}
	ok, ran := g.check(ctx, func() bool { return true })
	assert.False(t, ok || ran, "a client gone while waiting for a slot is not checked")
}

// flakyListener fails its first accepts as a process out of file
// descriptors does.
type flakyListener struct {
	net.Listener
	fails atomic.Int32
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.fails.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return l.Listener.Accept()
}

// TestAcceptBackoff: failed accepts (EMFILE) back off instead of spinning,
// are counted, logged once per episode, and accepting resumes by itself;
// the spare descriptor accepts a waiting client and answers it 503.
func TestAcceptBackoff(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }))
	t.Cleanup(up.Close)
	start := func(fails int32) (*testProxy, *logBuffer) {
		var logs logBuffer
		p := startProxy(t, func(ln net.Listener) net.Listener {
			fl := &flakyListener{Listener: ln}
			fl.fails.Store(fails)
			return fl
		}, withJSONLog(&logs))
		return p, &logs
	}

	t.Run("backoff", func(t *testing.T) {
		// Each failure in the accept loop is followed by one of the
		// spare descriptor's accept: 4 failures counted, 5+10+20+40 ms
		// waited.
		begin := time.Now()
		p, logs := start(8)
		resp, body := getVia(t, dialFrom(t, "127.0.0.1", p.addr), up.URL+"/")
		require.Equal(t, http.StatusOK, resp.StatusCode, body)
		assert.GreaterOrEqual(t, time.Since(begin), 75*time.Millisecond, "backed off; a spinning accept takes no time")
		assert.Equal(t, uint64(4), p.ClientStats().AcceptErrors)
		assert.Equal(t, 1, strings.Count(logs.String(), "accepting client connections failed"), "one line per episode")
	})
	t.Run("spare descriptor", func(t *testing.T) {
		p, logs := start(1)
		resp, body := readAnswer(t, dialFrom(t, "127.0.0.1", p.addr), http.MethodGet)
		assertRefusal(t, resp, body, http.StatusServiceUnavailable, typeConnLimit, "egressd has run out of file descriptors: try again later")
		resp, body = getVia(t, dialFrom(t, "127.0.0.1", p.addr), up.URL+"/")
		require.Equal(t, http.StatusOK, resp.StatusCode, body)
		assert.Equal(t, uint64(1), p.ClientStats().Refused["fds_exhausted"])
		waitAccessLines(t, logs, 1, withStatus(http.StatusServiceUnavailable))
	})
}

// TestTunnelClientStopsReading: a tunnel whose client stops reading while
// the upstream sends is closed by the tunnel's idle timeout, also when the
// client has half-closed its side.
func TestTunnelClientStopsReading(t *testing.T) {
	for _, halfClose := range []bool{false, true} {
		t.Run(map[bool]string{false: "open", true: "half-closed"}[halfClose], func(t *testing.T) {
			u := startTCPUpstream(t)
			p := startProxy(t, nil, withIdle(300*time.Millisecond))
			c, _, resp := p.connect(t, u.addr, nil)
			require.Equal(t, http.StatusOK, resp.StatusCode)
			require.NoError(t, c.SetReadBuffer(4096))
			s := u.accept(t)
			if halfClose {
				require.NoError(t, c.CloseWrite())
			}
			chunk := make([]byte, 64<<10)
			var err error
			for err == nil {
				_, err = s.Write(chunk)
			}
			assert.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the upstream side was closed, not timed out: %v", err)
			require.Eventually(t, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond)
		})
	}
}
