package proxy

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
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
