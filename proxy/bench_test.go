package proxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func BenchmarkPlainGET(b *testing.B) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok")
	}))
	b.Cleanup(up.Close)
	p := startProxy(b, nil)
	c := p.client(b)

	b.ReportAllocs()
	for b.Loop() {
		resp, err := c.Get(up.URL)
		if err != nil {
			b.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}

// BenchmarkTunnel measures a CONNECT tunnel's throughput: each operation
// sends a chunk through it and reads it back from an echoing upstream.
func BenchmarkTunnel(b *testing.B) {
	u := startTCPUpstream(b)
	p := startProxy(b, nil)
	c, br, resp := p.connect(b, u.addr, nil)
	if resp.StatusCode != http.StatusOK {
		b.Fatalf("CONNECT: %s", resp.Status)
	}
	s := u.accept(b)
	_ = s.SetDeadline(noDeadline)
	_ = c.SetDeadline(noDeadline)
	go func() { _, _ = io.Copy(s, s) }()

	chunk := pattern(256 << 10)
	back := make([]byte, len(chunk))
	b.SetBytes(int64(2 * len(chunk)))
	b.ReportAllocs()
	for b.Loop() {
		errc := make(chan error, 1)
		go func() {
			_, err := c.Write(chunk)
			errc <- err
		}()
		if _, err := io.ReadFull(br, back); err != nil {
			b.Fatal(err)
		}
		if err := <-errc; err != nil {
			b.Fatal(err)
		}
	}
}

// idleTunnels is how many tunnels BenchmarkIdleTunnels holds open at once:
// each costs the process 4 descriptors besides the proxy's own (the test's
// client and upstream ends), well under the 20,000 the machine allows.
const idleTunnels = 1000

// BenchmarkIdleTunnels measures what an idle CONNECT tunnel costs the
// proxy: it opens idleTunnels tunnels through a real Server, moves one byte
// each way through each, and reports the growth of the process's resident
// memory (rss-B/tunnel), of the Go heap and stacks (heap+stack-B/tunnel)
// and of its open descriptors (fds/tunnel), less what the test's own ends
// of the same number of loopback connection pairs cost.
func BenchmarkIdleTunnels(b *testing.B) {
	u := startTCPUpstream(b)
	// One client holds them all: its caps are raised to fit.
	p := startProxy(b, nil, withLimits(Limits{MaxConnsPerClient: 2 * idleTunnels, MaxAddrsPerClient: idleTunnels}))

	var rss, heap, fds float64
	for b.Loop() {
		// The test's own ends: idleTunnels direct pairs.
		before := takeFootprint(b)
		direct := openPairs(b, u, idleTunnels, "")
		own := takeFootprint(b).minus(before)
		closeAll(direct)

		before = takeFootprint(b)
		tunnels := openPairs(b, u, idleTunnels, p.addr)
		total := takeFootprint(b).minus(before)
		closeAll(tunnels)
		require.Eventually(b, func() bool { return p.Active() == 0 }, 10*time.Second, 10*time.Millisecond)

		rss += (total.rss - own.rss) / idleTunnels
		heap += (total.heap - own.heap) / idleTunnels
		fds += (total.fds - own.fds) / idleTunnels
	}
	n := float64(b.N)
	b.ReportMetric(rss/n, "rss-B/tunnel")
	b.ReportMetric(heap/n, "heap+stack-B/tunnel")
	b.ReportMetric(fds/n, "fds/tunnel")
	b.ReportMetric(0, "ns/op") // the time to open them says nothing here
}

// footprint is what the process holds: resident memory, Go heap in use
// plus goroutine stacks, and open descriptors.
type footprint struct{ rss, heap, fds float64 }

func (f footprint) minus(g footprint) footprint {
	return footprint{f.rss - g.rss, f.heap - g.heap, f.fds - g.fds}
}

// takeFootprint measures the process after returning freed memory to the
// kernel, so that what remains is what is held.
func takeFootprint(b *testing.B) footprint {
	b.Helper()
	time.Sleep(100 * time.Millisecond) // let handlers and relays reach their idle wait
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	status, err := os.ReadFile("/proc/self/status")
	require.NoError(b, err)
	var rssKB float64
	for line := range strings.Lines(string(status)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			rssKB, err = strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			require.NoError(b, err)
		}
	}
	fds, err := os.ReadDir("/proc/self/fd")
	require.NoError(b, err)
	return footprint{rss: rssKB * 1024, heap: float64(ms.HeapInuse + ms.StackInuse), fds: float64(len(fds))}
}

// openPairs opens n connections to the upstream u, through a CONNECT
// tunnel of the proxy at proxyAddr or directly if it is empty, and moves a
// byte each way through each. It returns every connection, both ends.
func openPairs(b *testing.B, u *tcpUpstream, n int, proxyAddr string) []net.Conn {
	b.Helper()
	conns := make([]net.Conn, 0, 2*n)
	const established = "HTTP/1.1 200 Connection established\r\n\r\n"
	var buf [len(established)]byte
	for range n {
		dial := u.addr
		if proxyAddr != "" {
			dial = proxyAddr
		}
		c, err := net.Dial("tcp4", dial)
		require.NoError(b, err)
		conns = append(conns, c)
		require.NoError(b, c.SetDeadline(time.Now().Add(10*time.Second)))
		if proxyAddr != "" {
			_, err = io.WriteString(c, "CONNECT "+u.addr+" HTTP/1.1\r\nHost: "+u.addr+"\r\n\r\n")
			require.NoError(b, err)
			_, err = io.ReadFull(c, buf[:])
			require.NoError(b, err)
			require.Equal(b, established, string(buf[:]))
		}
		var s *net.TCPConn
		select {
		case s = <-u.conns:
		case <-time.After(10 * time.Second):
			b.Fatal("upstream accepted no connection")
		}
		conns = append(conns, s)
		for _, dir := range [][2]net.Conn{{c, s}, {s, c}} {
			_, err = dir[0].Write(buf[:1])
			require.NoError(b, err)
			_, err = io.ReadFull(dir[1], buf[:1])
			require.NoError(b, err)
		}
		require.NoError(b, c.SetDeadline(noDeadline))
	}
	return conns
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		_ = c.Close()
	}
}

// BenchmarkPlainGETSession is BenchmarkPlainGET with -rotate session: the
// keep-alive client's requests share a session, and so its held address
// and its upstream keep-alive connection.
func BenchmarkPlainGETSession(b *testing.B) {
	benchPlainGETHeld(b, RotateSession, "bench")
}

// BenchmarkPlainGETConnection is BenchmarkPlainGET with -rotate
// connection: the keep-alive client's requests share its connection's held
// address and upstream keep-alive connection.
func BenchmarkPlainGETConnection(b *testing.B) {
	benchPlainGETHeld(b, RotateConnection, "")
}

// benchPlainGETHeld is BenchmarkPlainGET from a held address under rotate,
// with the session key key (none if "").
func benchPlainGETHeld(b *testing.B, rotate Rotate, key string) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok")
	}))
	b.Cleanup(up.Close)
	var d net.Dialer
	hold := func(context.Context) (DialFunc, func(), error) {
		return func(ctx context.Context, _, addr string) (net.Conn, error) {
			c, err := d.DialContext(ctx, "tcp4", addr)
			if err != nil {
				return nil, err
			}
			return boundConn{c.(*net.TCPConn)}, nil
		}, func() {}, nil
	}
	p := startProxy(b, nil, func(c *Config) { c.Rotate, c.Hold = rotate, hold })
	c := p.client(b)
	req, err := http.NewRequest(http.MethodGet, up.URL, nil)
	require.NoError(b, err)
	if key != "" {
		req.Header.Set(SessionHeader, key)
	}

	b.ReportAllocs()
	for b.Loop() {
		resp, err := c.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}

// BenchmarkConnectPerRequest opens a CONNECT tunnel per operation, as an
// HTTPS client without keep-alive does: connect to the proxy, CONNECT, one
// byte each way, close.
func BenchmarkConnectPerRequest(b *testing.B) {
	up := tcpEchoUpstream(b, "127.0.0.1")
	p := startProxy(b, nil)
	req := []byte("CONNECT " + up + " HTTP/1.1\r\nHost: " + up + "\r\n\r\n")
	const established = "HTTP/1.1 200 Connection established\r\n\r\n"
	buf := make([]byte, len(established))

	b.ReportAllocs()
	for b.Loop() {
		c, err := net.Dial("tcp4", p.addr)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != established {
			b.Fatalf("CONNECT: %q, %v", buf, err)
		}
		if _, err := c.Write(buf[:1]); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf[:1]); err != nil {
			b.Fatal(err)
		}
		_ = c.Close()
	}
}
