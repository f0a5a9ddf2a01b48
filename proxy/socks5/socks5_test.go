package socks5

import (
	"bytes"
	"errors"
	"io"
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
// handshake: greeting, credentials if offered, request. It must never panic,
// and a request it accepts must give a dialable host:port.
func FuzzHandshake(f *testing.F) {
	f.Add([]byte{5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80})
	f.Add(cat([]byte{5, 2, 0, 2, 1, 9}, "session-k", []byte{1}, "x", []byte{5, 1, 0, 3, 13}, "upstream.test", []byte{1, 187}))
	f.Add(cat([]byte{5, 1, 0, 5, 1, 0, 4}, []byte{15: 1}, []byte{0, 22}))
	f.Add([]byte{5, 0})
	f.Add([]byte{4, 1, 0, 80, 1, 2, 3, 4, 0})
	f.Add([]byte{5, 1, 0, 5, 2, 0, 1, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{5, 1, 0, 5, 1, 0, 3, 0, 0, 80})
	f.Add([]byte{5, 1, 0, 5, 1, 0, 9})
	f.Add([]byte{5, 1, 2, 1, 0})
	f.Add([]byte{5, 255})
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		methods, err := ReadGreeting(r)
		if err != nil {
			return
		}
		if bytes.IndexByte(methods, MethodUserPass) >= 0 {
			if _, _, err := ReadUserPass(r); err != nil {
				return
			}
		}
		q, err := ReadRequest(r)
		if err != nil {
			var re *RequestError
			if errors.As(err, &re) && re.Reply == ReplySucceeded {
				t.Fatalf("error %v with a success reply", err)
			}
			return
		}
		if q.Port == 0 || q.Host == "" {
			t.Fatalf("accepted request %+v", q)
		}
		if !strings.HasSuffix(q.Addr(), ":"+strconv.Itoa(int(q.Port))) {
			t.Fatalf("Addr %q of %+v", q.Addr(), q)
		}
	})
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
