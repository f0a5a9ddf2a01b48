package socks5

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestReadGreeting(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		methods []byte
		err     error // errors.Is target; nil: success
	}{
		{name: "no auth", in: []byte{5, 1, 0}, methods: []byte{0}},
		{name: "both", in: []byte{5, 2, 0, 2}, methods: []byte{0, 2}},
		{name: "trailing bytes stay unread", in: []byte{5, 1, 2, 1, 2, 3}, methods: []byte{2}},
		{name: "socks4", in: []byte{4, 1, 0, 80, 1, 2, 3, 4, 0}, err: ErrVersion},
		{name: "http", in: []byte("GET / HTTP/1.1\r\n"), err: ErrVersion},
		{name: "zero methods", in: []byte{5, 0}, err: ErrNoMethods},
		{name: "empty", in: nil, err: io.EOF},
		{name: "truncated header", in: []byte{5}, err: io.ErrUnexpectedEOF},
		{name: "truncated methods", in: []byte{5, 3, 0, 2}, err: io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := bytes.NewReader(tt.in)
			got, err := ReadGreeting(r)
			if tt.err != nil {
				assert.ErrorIs(t, err, tt.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.methods, got)
			assert.Equal(t, len(tt.in)-2-len(tt.methods), r.Len(), "read exactly the greeting")
		})
	}
}

func TestReadUserPass(t *testing.T) {
	long := strings.Repeat("u", 255)
	tests := []struct {
		name       string
		in         []byte
		user, pass string
		err        error
	}{
		{name: "session", in: cat([]byte{1, 13}, "session-build", []byte{2}, "pw"), user: "session-build", pass: "pw"},
		{name: "empty password", in: cat([]byte{1, 4}, "user", []byte{0}), user: "user"},
		{name: "longest", in: cat([]byte{1, 255}, long, []byte{255}, long), user: long, pass: long},
		{name: "wrong version", in: cat([]byte{5, 4}, "user", []byte{0}), err: ErrVersion},
		{name: "empty user", in: []byte{1, 0, 2, 'p', 'w'}, err: ErrMalformed},
		{name: "truncated user", in: cat([]byte{1, 10}, "user"), err: io.ErrUnexpectedEOF},
		{name: "no password length", in: cat([]byte{1, 4}, "user"), err: io.ErrUnexpectedEOF},
		{name: "truncated password", in: cat([]byte{1, 4}, "user", []byte{9}, "pw"), err: io.ErrUnexpectedEOF},
		{name: "empty", in: nil, err: io.EOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			user, pass, err := ReadUserPass(bytes.NewReader(tt.in))
			if tt.err != nil {
				assert.ErrorIs(t, err, tt.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.user, user)
			assert.Equal(t, tt.pass, pass)
		})
	}
}

func TestReadRequest(t *testing.T) {
	long := strings.Repeat("a", 255)
	tests := []struct {
		name  string
		in    []byte
		want  Request
		addr  string
		reply int   // -1: no reply, just close; else the *RequestError's code
		err   error // errors.Is target for failures without a reply
	}{
		{name: "ipv4", in: []byte{5, 1, 0, 1, 192, 0, 2, 1, 0, 80},
			want: Request{Host: "192.0.2.1", Port: 80}, addr: "192.0.2.1:80"},
		{name: "ipv6", in: cat([]byte{5, 1, 0, 4}, []byte{0x20, 0x01, 0x0d, 0xb8, 15: 1}, []byte{1, 187}),
			want: Request{Host: "2001:db8::1", Port: 443}, addr: "[2001:db8::1]:443"},
		{name: "ipv4-mapped ipv6", in: cat([]byte{5, 1, 0, 4}, []byte{10: 0xff, 11: 0xff, 12: 192, 13: 0, 14: 2, 15: 7}, []byte{0, 80}),
			want: Request{Host: "192.0.2.7", Port: 80}, addr: "192.0.2.7:80"},
		{name: "domain", in: cat([]byte{5, 1, 0, 3, 13}, "upstream.test", []byte{1, 187}),
			want: Request{Host: "upstream.test", Port: 443, Domain: true}, addr: "upstream.test:443"},
		{name: "longest domain", in: cat([]byte{5, 1, 0, 3, 255}, long, []byte{0, 80}),
			want: Request{Host: long, Port: 80, Domain: true}, addr: long + ":80"},
		{name: "ip literal as domain", in: cat([]byte{5, 1, 0, 3, 3}, "::1", []byte{0, 80}),
			want: Request{Host: "::1", Port: 80, Domain: true}, addr: "[::1]:80"},
		{name: "reserved byte ignored", in: []byte{5, 1, 7, 1, 192, 0, 2, 1, 0, 80},
			want: Request{Host: "192.0.2.1", Port: 80}, addr: "192.0.2.1:80"},

		{name: "wrong version", in: []byte{4, 1, 0, 1, 192, 0, 2, 1, 0, 80}, reply: ReplyGeneralFailure},
		{name: "bind", in: []byte{5, 2, 0, 1, 192, 0, 2, 1, 0, 80}, reply: ReplyCommandNotSupported},
		{name: "udp associate", in: []byte{5, 3, 0, 1, 0, 0, 0, 0, 0, 0}, reply: ReplyCommandNotSupported},
		{name: "unknown command", in: []byte{5, 9, 0, 1, 192, 0, 2, 1, 0, 80}, reply: ReplyCommandNotSupported},
		{name: "bad atyp", in: []byte{5, 1, 0, 2, 192, 0, 2, 1, 0, 80}, reply: ReplyAddrNotSupported},
		{name: "empty domain", in: []byte{5, 1, 0, 3, 0, 0, 80}, reply: ReplyGeneralFailure},
		{name: "port zero", in: []byte{5, 1, 0, 1, 192, 0, 2, 1, 0, 0}, reply: ReplyGeneralFailure},

		{name: "empty", in: nil, reply: -1, err: io.EOF},
		{name: "truncated header", in: []byte{5, 1, 0}, reply: -1, err: io.ErrUnexpectedEOF},
		{name: "truncated ipv4", in: []byte{5, 1, 0, 1, 192, 0}, reply: -1, err: io.ErrUnexpectedEOF},
		{name: "truncated ipv6", in: []byte{5, 1, 0, 4, 0x20, 1}, reply: -1, err: io.ErrUnexpectedEOF},
		{name: "no domain length", in: []byte{5, 1, 0, 3}, reply: -1, err: io.EOF},
		{name: "domain longer than sent", in: cat([]byte{5, 1, 0, 3, 200}, "short.test", []byte{0, 80}), reply: -1, err: io.ErrUnexpectedEOF},
		{name: "no port", in: cat([]byte{5, 1, 0, 3, 4}, "a.io"), reply: -1, err: io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := tt.in
			if tt.reply == 0 {
				in = cat(in, "early data") // what a client sends after the request
			}
			r := bytes.NewReader(in)
			q, err := ReadRequest(r)
			switch {
			case tt.reply > 0:
				var re *RequestError
				require.ErrorAs(t, err, &re)
				assert.EqualValues(t, tt.reply, re.Reply)
			case tt.reply < 0:
				assert.ErrorIs(t, err, tt.err)
				assert.False(t, errors.As(err, new(*RequestError)), "a truncated request gets no reply")
			default:
				require.NoError(t, err)
				assert.Equal(t, tt.want, q)
				assert.Equal(t, tt.addr, q.Addr())
				assert.Equal(t, len("early data"), r.Len(), "bytes after the request stay unread")
			}
		})
	}
}

func TestWrite(t *testing.T) {
	var b bytes.Buffer
	require.NoError(t, WriteMethod(&b, MethodUserPass))
	require.NoError(t, WriteUserPassStatus(&b, true))
	require.NoError(t, WriteUserPassStatus(&b, false))
	require.NoError(t, WriteReply(&b, ReplyHostUnreachable))
	assert.Equal(t, []byte{5, 2, 1, 0, 1, 1, 5, 4, 0, 1, 0, 0, 0, 0, 0, 0}, b.Bytes())
}

// FuzzHandshake feeds arbitrary bytes through the whole server-side
// handshake, as egressd reads it: greeting, credentials when user/password
// is offered, request. Each reader must take exactly the message it returns
// from the stream (what the client sends after it stays unread), the message
// must encode back to those bytes, and its errors must be the documented
// ones. An accepted request has a port from 1 to 65535, and a host that is
// an unzoned address in canonical form (ATYP IPv4 or IPv6) or the name as
// sent (ATYP domain; checking it is the server's part). The seeds are in
// testdata/fuzz.
func FuzzHandshake(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		read := func() int { return len(in) - r.Len() }

		methods, err := ReadGreeting(r)
		if err != nil {
			requireErrorIs(t, err, ErrVersion, ErrNoMethods)
			return
		}
		msg := cat([]byte{Version, byte(len(methods))}, methods)
		if len(methods) == 0 || !bytes.Equal(in[:read()], msg) {
			t.Fatalf("greeting %x read as methods %x", in[:read()], methods)
		}

		if bytes.IndexByte(methods, MethodUserPass) >= 0 {
			start := read()
			user, pass, err := ReadUserPass(r)
			if err != nil {
				requireErrorIs(t, err, ErrVersion, ErrMalformed)
				return
			}
			if user == "" || len(user) > 255 || len(pass) > 255 {
				t.Fatalf("credentials %q:%q", user, pass)
			}
			msg := cat([]byte{UserPassVersion, byte(len(user))}, user, []byte{byte(len(pass))}, pass)
			if !bytes.Equal(in[start:read()], msg) {
				t.Fatalf("credentials %x read as %q:%q", in[start:read()], user, pass)
			}
		}

		start := read()
		q, err := ReadRequest(r)
		if err != nil {
			if re, ok := errors.AsType[*RequestError](err); ok {
				if re.Reply == ReplySucceeded || re.Reply > ReplyAddrNotSupported {
					t.Fatalf("error %v with reply %#02x", err, re.Reply)
				}
				return
			}
			requireErrorIs(t, err)
			return
		}
		got := in[start:read()]
		if q.Port == 0 {
			t.Fatalf("accepted port 0: %+v", q)
		}
		// Addr splits back into the host and port, but for a name with
		// brackets, which is passed on as sent (the server refuses it:
		// it is neither an address nor a host name).
		host, port, err := net.SplitHostPort(q.Addr())
		if (err != nil || host != q.Host || port != strconv.Itoa(int(q.Port))) &&
			!(q.Domain && strings.ContainsAny(q.Host, "[]")) {
			t.Fatalf("Addr %q of %+v: %q, %q, %v", q.Addr(), q, host, port, err)
		}
		// Encode the request again, with the reserved byte as sent.
		msg = []byte{Version, CmdConnect, got[2]}
		if q.Domain {
			if q.Host == "" || len(q.Host) > 255 {
				t.Fatalf("accepted name %q", q.Host)
			}
			msg = append(append(msg, AtypDomain, byte(len(q.Host))), q.Host...)
		} else {
			ip, err := netip.ParseAddr(q.Host)
			if err != nil || ip.Zone() != "" || ip.String() != q.Host || ip.Is4In6() {
				t.Fatalf("accepted address %q: %v", q.Host, err)
			}
			switch atyp := got[3]; {
			case atyp == AtypIPv4 && ip.Is4():
				a := ip.As4()
				msg = append(append(msg, AtypIPv4), a[:]...)
			case atyp == AtypIPv6: // an IPv4-mapped address comes back unmapped
				a := ip.As16()
				msg = append(append(msg, AtypIPv6), a[:]...)
			default:
				t.Fatalf("ATYP %d read as %q", atyp, q.Host)
			}
		}
		msg = binary.BigEndian.AppendUint16(msg, q.Port)
		if !bytes.Equal(got, msg) {
			t.Fatalf("request %x read as %+v, which encodes as %x", got, q, msg)
		}
	})
}

// requireErrorIs fails unless err is a short read (io.EOF or
// io.ErrUnexpectedEOF, wrapped) or one of targets.
func requireErrorIs(t *testing.T, err error, targets ...error) {
	t.Helper()
	for _, target := range append(targets, io.EOF, io.ErrUnexpectedEOF) {
		if errors.Is(err, target) {
			return
		}
	}
	t.Fatalf("unexpected error %v", err)
}

func cat(parts ...any) []byte {
	var b []byte
	for _, p := range parts {
		switch p := p.(type) {
		case []byte:
			b = append(b, p...)
		case string:
			b = append(b, p...)
		}
	}
	return b
}
