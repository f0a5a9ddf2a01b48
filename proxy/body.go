package proxy

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/egressd/egressd/proxy/relay"
	"github.com/egressd/egressd/proxy/stats"
)

// maxBufferedBody is the largest request body read whole before the
// upstream is dialed, as nginx buffers request bodies: a client that stalls
// in such a body, or sends a malformed one, is answered before any
// upstream connection or egress address is spent on it. Larger bodies
// stream to the upstream as they come.
const maxBufferedBody = 64 << 10

// clientBody is a request body as read from the client: it counts the bytes
// (the transport reads from its own goroutine, hence the atomics), bounds
// every read by ClientTimeout so that a body that stalls is cut off, and
// keeps the first error of the client's making (a stall, a malformed
// chunked encoding, a body that ends early), so that it is answered as the
// client's fault, not the upstream's.
type clientBody struct {
	io.ReadCloser
	conn    *clientConn // nil: the request came through no listener of ours
	timeout time.Duration

	n    atomic.Int64
	err  atomic.Pointer[Error]
	done atomic.Bool // read to its end, or failed
}

// aLongTimeAgo is a deadline that has passed.
var aLongTimeAgo = time.Unix(1, 0)

func (b *clientBody) Read(p []byte) (int, error) {
	if b.conn != nil {
		_ = b.conn.SetReadDeadline(time.Now().Add(b.timeout))
	}
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	if err != nil {
		b.done.Store(true)
		if err != io.EOF {
			b.err.CompareAndSwap(nil, bodyError(err, b.timeout))
		}
		if b.conn != nil {
			// At the end, net/http reads on, to notice a client that goes
			// away, and that read must not time out. A broken body is
			// never read to its end: net/http's attempt to (to reuse the
			// connection) must fail at once, not wait for the client.
			deadline := time.Time{}
			if err != io.EOF {
				deadline = aLongTimeAgo
			}
			_ = b.conn.SetReadDeadline(deadline)
		}
	}
	return n, err
}

// bodyError is what the client is told of an error reading its body.
func bodyError(err error, timeout time.Duration) *Error {
	switch {
	case isTimeout(err):
		return clientRefusal(stats.RefusedBodyTimeout, http.StatusRequestTimeout, typeRequestError,
			"request body stalled for %v (-client-timeout)", timeout)
	case errors.Is(err, io.ErrUnexpectedEOF) || relay.IsClosed(err):
		return clientRefusal(stats.RefusedBadBody, http.StatusBadRequest, typeRequestError,
			"request body ended early (shorter than its Content-Length, or its chunks)")
	}
	return clientRefusal(stats.RefusedBadBody, http.StatusBadRequest, typeRequestError,
		"malformed request body: %s", oneLineText(strings.TrimPrefix(err.Error(), "http: ")))
}

// bufferBody reads the body of r whole if it is at most maxBufferedBody
// long, and makes it r's body, with its length known (a chunked body is
// sent upstream with a Content-Length). A longer one (known by its
// Content-Length, or once more than maxBufferedBody came) streams: what was
// read goes first. It returns the client's error, if reading failed.
func bufferBody(r *http.Request, body *clientBody) *Error {
	if r.ContentLength > maxBufferedBody {
		return nil
	}
	size := int(r.ContentLength) + 1 // room for the read that finds EOF
	if r.ContentLength < 0 {
		size = 512
	}
	buf := make([]byte, 0, size)
	for {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, min(cap(buf), maxBufferedBody+1-len(buf)))
		}
		n, err := body.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			return body.err.Load()
		}
		if len(buf) > maxBufferedBody {
			r.Body = &prefixedBody{Reader: io.MultiReader(bytes.NewReader(buf), body), body: body}
			return nil
		}
	}
	// Whole: the upstream gets it at once, with no need to wait for its
	// 100 Continue.
	r.ContentLength = int64(len(buf))
	r.TransferEncoding = nil
	r.Header.Del("Expect")
	if len(buf) == 0 {
		r.Body = http.NoBody
	} else {
		r.Body = &prefixedBody{Reader: bytes.NewReader(buf), body: body}
	}
	return nil
}

// prefixedBody is a request body of which bufferBody read the start, or
// all: Close closes the client's body.
type prefixedBody struct {
	io.Reader
	body io.Closer
}

func (b *prefixedBody) Close() error { return b.body.Close() }

// settle waits a moment for a read under way to finish, so that its error,
// if any, is known: when a body times out, net/http cancels the request
// (which ends the round trip) within the same read that returns the error.
func (b *clientBody) settle() {
	for range 50 {
		if b.done.Load() {
			return
		}
		time.Sleep(time.Millisecond)
	}
}
