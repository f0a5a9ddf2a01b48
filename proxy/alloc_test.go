package proxy

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The per-request functions of the plain HTTP and CONNECT paths allocate
// nothing in the usual case. (The whole paths are measured by the
// benchmarks in bench_test.go; their allocations are net/http's and
// goproxy's.)
func TestHotPathAllocs(t *testing.T) {
	head := []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
	resp := http.Header{
		"Content-Type":   {"text/plain"},
		"Connection":     {"close"},
		"Content-Length": {"2"},
		"Keep-Alive":     {"timeout=5"},
	}
	connect, err := http.NewRequest(http.MethodConnect, "http://example.test:443", nil)
	require.NoError(t, err)
	connect.URL.Scheme, connect.URL.Path = "", "" // as the server parses "CONNECT example.test:443"

	var st fwdState
	sniffer := headSniffer{st: &st}
	h := make(http.Header, 8)

	tests := []struct {
		name string
		f    func()
	}{
		{"headSniffer.sniff, head in one read", func() {
			sniffer.done = false
			sniffer.sniff(head)
			if got := st.getConnection(); len(got) != 1 {
				t.Fatalf("Connection: %q", got)
			}
		}},
		{"removeHopByHop", func() {
			clear(h)
			for k, v := range resp {
				h[k] = v
			}
			removeHopByHop(h, closeOnly, false)
			if len(h) != 2 {
				t.Fatalf("left %v", h)
			}
		}},
		{"connectTarget", func() {
			if _, addr, err := connectTarget(connect); err != nil || addr != "example.test:443" {
				t.Fatalf("connectTarget: %q, %v", addr, err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Zero(t, testing.AllocsPerRun(100, tt.f))
		})
	}
}
