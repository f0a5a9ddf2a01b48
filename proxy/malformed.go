package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/egressd/egressd/proxy/stats"
)

// Limits on a request head. maxHeaderBytes is Squid's
// request_header_max_size; net/http answers a larger head 431 by itself
// (taken over by clientConn), ServeHTTP one with too many fields.
const (
	maxHeaderBytes  = 64 << 10
	maxHeaderFields = 100
)

var (
	errHeadTooLarge = clientRefusal(stats.RefusedHeaderTooLarge, http.StatusRequestHeaderFieldsTooLarge, typeRequestError,
		"request head larger than %d KiB", maxHeaderBytes>>10)
	errTooManyFields = clientRefusal(stats.RefusedHeaderTooLarge, http.StatusRequestHeaderFieldsTooLarge, typeRequestError,
		"request head with more than %d header fields", maxHeaderFields)
	errHTTP2 = clientRefusal(stats.RefusedMalformed, http.StatusHTTPVersionNotSupported, typeProtocolError,
		"egressd speaks HTTP/1.1 only: send requests without the HTTP/2 preface")
)

// malformed is egressd's answer to a request it cannot take.
func malformed(status int, format string, args ...any) *Error {
	return clientRefusal(stats.RefusedMalformed, status, typeRequestError, format, args...)
}

// netHTTPRefusal is egressd's answer in place of the one net/http wrote by
// itself, resp, to the request whose head (as far as it was read) is head:
// the same status, and a reason that says what was wrong with the request.
// net/http's text says it for some (a missing Host header, an unsupported
// HTTP version); for the plain "400 Bad Request" the head is parsed again,
// as net/http parsed it, to find out why.
func netHTTPRefusal(resp, head []byte) *Error {
	status, text := statusLine(resp)
	switch status {
	case http.StatusRequestHeaderFieldsTooLarge:
		return errHeadTooLarge
	case http.StatusNotImplemented:
		// net/http takes a single Transfer-Encoding: chunked only, as nginx
		// does (request smuggling hides in the others).
		return malformed(status, "unsupported Transfer-Encoding: egressd takes chunked only, in one header field")
	case http.StatusExpectationFailed:
		return malformed(status, "unsupported Expect: egressd supports 100-continue only")
	case http.StatusHTTPVersionNotSupported:
		return malformed(status, "unsupported HTTP version: egressd speaks HTTP/1.x")
	case 0:
		status = http.StatusBadRequest
	}
	// A statusError of net/http: "400 Bad Request: missing required Host header".
	if _, detail, ok := strings.Cut(text, ": "); ok && detail != "" {
		return malformed(status, "malformed request: %s", oneLineText(detail))
	}
	return malformed(status, "malformed request: %s", parseProblem(head))
}

// statusLine returns the status code and the text after it of a response's
// first line, or 0 if it has none.
func statusLine(resp []byte) (int, string) {
	line, _, _ := bytes.Cut(resp, []byte("\r\n"))
	_, rest, ok := bytes.Cut(line, []byte(" ")) // after "HTTP/1.1"
	if !ok || len(rest) < 3 {
		return 0, ""
	}
	code, err := strconv.Atoi(string(rest[:3]))
	if err != nil {
		return 0, ""
	}
	return code, strings.TrimSpace(string(rest[3:]))
}

// parseProblem parses a request head as net/http does and says in a few
// words what is wrong with it, without echoing the client's bytes.
func parseProblem(head []byte) string {
	_, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(head)))
	if err == nil {
		return "not HTTP/1.x"
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return "incomplete request head (the client stopped sending it)"
	}
	if _, ok := errors.AsType[*url.Error](err); ok {
		return "bad request target"
	}
	msg := err.Error()
	for _, p := range []struct{ contains, says string }{
		{"malformed HTTP request", "bad request line"},
		{"invalid method", "invalid method"},
		{"malformed HTTP version", "malformed HTTP version"},
		{"malformed MIME header", "malformed header line"},
		{"too many Host headers", "more than one Host header"},
		{"multiple Content-Length", "conflicting Content-Length headers"},
		{"Content-Length", "bad Content-Length"},
	} {
		if strings.Contains(msg, p.contains) {
			return p.says
		}
	}
	return "not HTTP/1.x"
}

// headMethod returns the method of a request head, or "-" when none can be
// read: the first word, if it is a short token.
func headMethod(head []byte) string {
	word, _, ok := bytes.Cut(head, []byte(" "))
	if !ok || len(word) == 0 || len(word) > 24 {
		return "-"
	}
	for _, c := range word {
		if !isTokenChar(c) {
			return "-"
		}
	}
	return string(word)
}

// isTokenChar reports whether c may appear in an HTTP token (RFC 9110
// section 5.6.2).
func isTokenChar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// oneLineText makes a short text fit one line of printable ASCII.
func oneLineText(s string) string {
	if len(s) > 120 {
		s = s[:120]
	}
	b := []byte(s)
	for i, c := range b {
		if c < 0x20 || c > 0x7e {
			b[i] = '?'
		}
	}
	return string(b)
}

// headerFields counts the header fields of a request as it came: every
// value of every field, and Host, which net/http takes out of the header.
func headerFields(r *http.Request) int {
	n := 0
	if r.Host != "" {
		n++
	}
	for _, vv := range r.Header {
		n += len(vv)
	}
	return n
}
