package proxy

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/textproto"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode"

	"github.com/egressd/egressd/proxy/auth"
	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/stats"
)

// The fuzz targets of the parsers in this package that read what clients
// and upstreams send. Their seeds are in testdata/fuzz/NAME, real inputs of
// users and attackers; `go test` runs them, `make fuzz` fuzzes each target.

// readConnect reads a CONNECT request for target as the server does, or
// returns nil when net/http refuses it (and answers 400 itself).
func readConnect(target string) *http.Request {
	r, err := http.ReadRequest(bufio.NewReader(strings.NewReader("CONNECT " + target + " HTTP/1.1\r\n\r\n")))
	if err != nil || r.Method != http.MethodConnect {
		return nil
	}
	return r
}

// FuzzConnectTarget feeds request targets of CONNECT requests through
// net/http's request parser and connectTarget. An accepted target has a
// port from 1 to 65535 and a host that is a valid host name or an unzoned
// IPv6 address; its host:port is that host and port, and reads back as
// itself, unless it is a zoned address, which checkDest refuses. Every
// name validHostname accepts is accepted as it is.
func FuzzConnectTarget(f *testing.F) {
	f.Fuzz(func(t *testing.T, target string) {
		if validHostname(target) {
			r := readConnect(target + ":443")
			if r == nil {
				t.Fatalf("valid host name %q: net/http refuses CONNECT %[1]q:443", target)
			}
			host, addr, err := connectTarget(r)
			if err != nil || host != target || addr != target+":443" {
				t.Fatalf("valid host name %q: CONNECT %[1]s:443 gives %q, %q, %v", target, host, addr, err)
			}
		}

		r := readConnect(target)
		if r == nil {
			return
		}
		host, addr, err := connectTarget(r)
		if err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error of more than one line: %q", err)
			}
			return
		}
		h, port, err := net.SplitHostPort(addr)
		if err != nil || h != host {
			t.Fatalf("CONNECT %q: host %q, addr %q: split as %q, %v", target, host, addr, h, err)
		}
		if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
			t.Fatalf("CONNECT %q: accepted port %q", target, port)
		}
		if strings.Contains(host, ":") {
			ip, err := netip.ParseAddr(host)
			if err != nil || !ip.Is6() {
				t.Fatalf("CONNECT %q: accepted address %q (%v)", target, host, err)
			}
			if ip.Zone() != "" {
				// A zoned address is a destination refused before
				// anything is spent on it, whatever the port.
				if e := checkDest(host, uint16(mustPort(port)), allPorts, "tunnels", "connect-ports"); e == nil || e.Type != typeDestProhibited {
					t.Fatalf("CONNECT %q: zoned address %q not refused: %v", target, host, e)
				}
				return
			}
		} else if !validHostname(host) {
			t.Fatalf("CONNECT %q: accepted host %q", target, host)
		}
		if want := net.JoinHostPort(host, port); addr != want {
			t.Fatalf("CONNECT %q: addr %q, want %q", target, addr, want)
		}
		r2 := readConnect(addr)
		if r2 == nil {
			t.Fatalf("CONNECT %q: net/http refuses its addr %q", target, addr)
		}
		host2, addr2, err := connectTarget(r2)
		if err != nil || host2 != host || addr2 != addr {
			t.Fatalf("CONNECT %q: its addr %q reads as %q, %q, %v", target, addr, host2, addr2, err)
		}
	})
}

// FuzzProxyCredentials feeds Proxy-Authorization values through
// proxyCredentials, and what it returns, and the raw value as a SOCKS5 user
// name would be, through splitSessionUser and sessionFromUser. Credentials
// it accepts were Basic, case aside, and encode back to a value that reads as
// the same. A session key is split off a user name at the first
// "-session-", and a user name the auth file accepts always comes back
// whole from USER-session-KEY; a key ending in "-rotate" asks for a new
// address for the key before it, and is refused when there is none.
func FuzzProxyCredentials(f *testing.F) {
	f.Fuzz(func(t *testing.T, value string) {
		user, pass, ok := proxyCredentials(http.Header{"Proxy-Authorization": {value}})
		if ok {
			if len(value) < len("Basic ") || !strings.EqualFold(value[:len("Basic ")], "Basic ") || strings.Contains(user, ":") {
				t.Fatalf("%q read as %q:%q", value, user, pass)
			}
			again := "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
			u2, p2, ok2 := proxyCredentials(http.Header{"Proxy-Authorization": {again}})
			if !ok2 || u2 != user || p2 != pass {
				t.Fatalf("%q read as %q:%q, its encoding %q as %q:%q (%v)", value, user, pass, again, u2, p2, ok2)
			}
			checkSessionUser(t, user)
		}
		checkSessionUser(t, value)
	})
}

// checkSessionUser checks how a proxy user name name is split.
func checkSessionUser(t *testing.T, name string) {
	t.Helper()
	user, key := splitSessionUser(name)
	switch {
	case strings.Contains(user, auth.ReservedInfix):
		t.Fatalf("%q split as user %q", name, user)
	case strings.Contains(name, auth.ReservedInfix) && user+auth.ReservedInfix+key != name:
		t.Fatalf("%q split as %q and key %q", name, user, key)
	case !strings.Contains(name, auth.ReservedInfix) && (user != name || key != ""):
		t.Fatalf("%q split as %q and key %q", name, user, key)
	}
	// A user of the auth file logs in as USER-session-KEY with any key.
	if authAccepts(user) {
		for _, k := range []string{key, "build42", ""} {
			if u, k2 := splitSessionUser(user + auth.ReservedInfix + k); u != user || k2 != k {
				t.Fatalf("user %q with session key %q: %q split as %q and key %q",
					user, k, user+auth.ReservedInfix+k, u, k2)
			}
		}
	}

	key, ok := sessionFromUser(name)
	if ok != (key != "") || (ok && "session-"+key != name) || (!ok && len(name) > len("session-") && strings.HasPrefix(name, "session-")) {
		t.Fatalf("sessionFromUser(%q) = %q, %v", name, key, ok)
	}
	checkRotateKey(t, key)
	_, key = splitSessionUser(name)
	checkRotateKey(t, key)
	if authAccepts(user) {
		// USER-session-KEY-rotate asks for a new address for KEY, any KEY.
		k, _ := cutRotate(key)
		if u, k2 := splitSessionUser(user + auth.ReservedInfix + k + rotateSuffix); u != user || k2 != k+rotateSuffix {
			t.Fatalf("user %q asking to rotate key %q: split as %q and key %q", user, k, u, k2)
		}
	}
}

// checkRotateKey checks how the session key of a user name is split into
// the key and the ask for a new address: a key ending in -rotate asks, and
// the key is what comes before; asking without a key is refused with a 400.
func checkRotateKey(t *testing.T, key string) {
	t.Helper()
	k, rotate := cutRotate(key)
	switch {
	case rotate != strings.HasSuffix(key, rotateSuffix),
		rotate && k+rotateSuffix != key,
		!rotate && k != key:
		t.Fatalf("cutRotate(%q) = %q, %v", key, k, rotate)
	}
	reason, e := askedRotation(nil, k, rotate)
	switch {
	case rotate && k == "" && (e == nil || e.Status != http.StatusBadRequest || strings.Contains(e.Reason, "\n")):
		t.Fatalf("key %q: asking to rotate no key: %v", key, e)
	case rotate && k != "" && (e != nil || reason != stats.RotatedUserName):
		t.Fatalf("key %q: asking to rotate %q: %v, %v", key, k, reason, e)
	case !rotate && (e != nil || reason != 0):
		t.Fatalf("key %q: no ask to rotate, yet %v, %v", key, reason, e)
	}
}

// authAccepts reports whether an auth file may name user.
func authAccepts(user string) bool {
	if user != strings.TrimLeftFunc(user, unicode.IsSpace) || strings.ContainsAny(user, "\r\n") {
		return false // a line of the file cannot hold it
	}
	const hash = "$2y$10$O.FCM1Blpi6ItDv4yM8MBOvpmxFBbfqOu41qDKXf3.vRb/.cCZqfG"
	u, err := auth.Parse(strings.NewReader(user+":"+hash+"\n"), "fuzz")
	return err == nil && u.Len() == 1
}

// FuzzHeadSniffer feeds upstream response streams, cut into reads at
// arbitrary places, through headSniffer, and response heads through
// headEnd and connectionValues. How a stream is cut changes nothing; the
// Connection header found is the one net/textproto reads from the first
// final head, when it can read it; headEnd finds the end of a head where
// textproto does.
func FuzzHeadSniffer(f *testing.F) {
	f.Fuzz(func(t *testing.T, stream, cuts []byte) {
		// The transport reuses its read buffer: sniff must keep no part
		// of the one it is given.
		read := func(c *headSniffer, b []byte) {
			p := slices.Clone(b)
			c.sniff(p)
			for i := range p {
				p[i] = 'X'
			}
		}
		whole := &headSniffer{st: &fwdState{}}
		read(whole, stream)
		cut := &headSniffer{st: &fwdState{}}
		for i, b := 0, stream; len(b) > 0; i++ {
			n := len(b)
			if len(cuts) > 0 {
				n = min(int(cuts[i%len(cuts)])+1, len(b))
			}
			read(cut, b[:n])
			b = b[n:]
		}
		got := whole.st.getConnection()
		if cut.done != whole.done || !slices.Equal(cut.st.getConnection(), got) {
			t.Fatalf("cut by %v: done %v, connection %q; whole: done %v, connection %q",
				cuts, cut.done, cut.st.getConnection(), whole.done, got)
		}
		if whole.done && (whole.buf != nil || cut.buf != nil) {
			t.Fatal("done, but holds bytes")
		}

		// The heads as net/http's client reads them: status lines as
		// http.ReadResponse does, headers with net/textproto.
		src := &countingSource{r: bytes.NewReader(stream)}
		tp := textproto.NewReader(bufio.NewReader(src))
		for at := 0; ; {
			status, err := tp.ReadLine()
			if err != nil {
				return
			}
			proto, rest, ok := strings.Cut(status, " ")
			code, _, _ := strings.Cut(strings.TrimLeft(rest, " "), " ")
			if _, _, okProto := http.ParseHTTPVersion(proto); !ok || !okProto || len(code) != 3 {
				return
			}
			n, err := strconv.Atoi(code)
			if err != nil || n < 0 {
				return
			}
			h, err := tp.ReadMIMEHeader()
			if err != nil {
				return
			}
			end := headEnd(stream[at:])
			if consumed := src.n - tp.R.Buffered(); end < 0 || at+end != consumed {
				t.Fatalf("head at %d of %q ends at %d; textproto read to %d", at, stream, at+end, consumed)
			}
			head := stream[at : at+end]
			at += end
			lines := head[bytes.IndexByte(head, '\n')+1:]
			if vals := connectionValues(lines); !slices.Equal(vals, h["Connection"]) {
				t.Fatalf("connection values %q in %q; textproto reads %q", vals, lines, h["Connection"])
			}
			if 100 <= n && n <= 199 && n != http.StatusSwitchingProtocols {
				continue // interim: the client reads the next head
			}
			if !whole.done || !slices.Equal(got, h["Connection"]) {
				t.Fatalf("%q: sniffed connection %q (done %v), the final head's is %q", stream, got, whole.done, h["Connection"])
			}
			return
		}
	})
}

// countingSource counts the bytes read from r.
type countingSource struct {
	r io.Reader
	n int
}

func (c *countingSource) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// FuzzParseRetryAfter feeds Retry-After values, at any time now, through
// parseRetryAfter. It never returns a negative duration, nor one for a
// value it refuses; delay-seconds are exact, and an HTTP-date is the time
// from now until then.
func FuzzParseRetryAfter(f *testing.F) {
	f.Fuzz(func(t *testing.T, v string, nowUnix int64) {
		now := time.Unix(nowUnix, 0)
		d, ok := parseRetryAfter(v, now)
		switch {
		case d < 0:
			t.Fatalf("%q at %v: negative %v", v, now, d)
		case !ok && d != 0:
			t.Fatalf("%q at %v: refused, with %v", v, now, d)
		case !ok:
			return
		}
		v = strings.TrimSpace(v)
		if n, err := strconv.ParseUint(v, 10, 32); err == nil {
			if d != time.Duration(n)*time.Second {
				t.Fatalf("%q: %v", v, d)
			}
			return
		}
		when, err := http.ParseTime(v)
		if err != nil {
			t.Fatalf("%q accepted as %v, neither seconds nor a date", v, d)
		}
		if want := max(when.Sub(now), 0); d != want {
			t.Fatalf("%q (%v) at %v: %v, want %v", v, when, now, d, want)
		}
		if s := shape.RetryAfterSeconds(min(d, shape.MaxHold)); s < 1 || time.Duration(s)*time.Second < min(d, shape.MaxHold) {
			t.Fatalf("%v sent back as %d s", d, s)
		}
	})
}

func mustPort(s string) uint64 {
	n, _ := strconv.ParseUint(s, 10, 16)
	return n
}
