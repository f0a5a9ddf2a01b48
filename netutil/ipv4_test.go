package netutil

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/dns/dnsmessage"
)

// fakeDNS is a DNS server on UDP loopback that answers from a table, for a
// resolver that reaches nothing else (see resolver). A name in records
// exists, with the A and AAAA records listed for it; a name in servfail gets
// SERVFAIL for AAAA queries; any other name does not exist.
type fakeDNS struct {
	records  map[string][]netip.Addr // by lower-case name without the final dot
	servfail map[string]bool
	resolver *net.Resolver

	mu      sync.Mutex
	queries []string // "AAAA name", "A name", in arrival order
}

func startFakeDNS(t *testing.T, records map[string][]netip.Addr, servfail ...string) *fakeDNS {
	t.Helper()
	f := &fakeDNS{records: records, servfail: map[string]bool{}}
	for _, n := range servfail {
		f.servfail[n] = true
	}
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if resp, ok := f.answer(buf[:n]); ok {
				_, _ = pc.WriteTo(resp, from)
			}
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		<-done
	})
	addr := pc.LocalAddr().String()
	f.resolver = &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "udp4", addr)
		},
	}
	return f
}

func (f *fakeDNS) answer(req []byte) ([]byte, bool) {
	var p dnsmessage.Parser
	h, err := p.Start(req)
	if err != nil {
		return nil, false
	}
	q, err := p.Question()
	if err != nil {
		return nil, false
	}
	name := strings.ToLower(strings.TrimSuffix(q.Name.String(), "."))
	f.mu.Lock()
	f.queries = append(f.queries, strings.TrimPrefix(q.Type.String(), "Type")+" "+name)
	f.mu.Unlock()

	addrs, exists := f.records[name]
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionAvailable: true}
	switch {
	case f.servfail[name] && q.Type == dnsmessage.TypeAAAA:
		rh.RCode = dnsmessage.RCodeServerFailure
	case !exists && !f.servfail[name]:
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	if b.StartQuestions() != nil || b.Question(q) != nil || b.StartAnswers() != nil {
		return nil, false
	}
	if rh.RCode == dnsmessage.RCodeSuccess {
		rrh := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 60}
		for _, a := range addrs {
			switch {
			case q.Type == dnsmessage.TypeA && a.Is4():
				err = b.AResource(rrh, dnsmessage.AResource{A: a.As4()})
			case q.Type == dnsmessage.TypeAAAA && a.Is6():
				err = b.AAAAResource(rrh, dnsmessage.AAAAResource{AAAA: a.As16()})
			}
			if err != nil {
				return nil, false
			}
		}
	}
	resp, err := b.Finish()
	return resp, err == nil
}

// Resolver returns a pure-Go resolver whose every query goes to the fake
// server. Names of the .test TLD are in no /etc/hosts.
func (f *fakeDNS) Resolver() *net.Resolver { return f.resolver }

func (f *fakeDNS) Queries() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.queries...)
}

// echo4 is an echo server on 127.0.0.1 that reports every connection it
// accepts.
type echo4 struct {
	net.Listener
	accepted chan net.Addr
}

func listenLoopback4(t *testing.T) *echo4 {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	e := &echo4{Listener: ln, accepted: make(chan net.Addr, 16)}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			e.accepted <- c.RemoteAddr()
			wg.Go(func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return e
}

// waitAccept waits for the listener to report a connection it accepted.
func (e *echo4) waitAccept(t *testing.T) {
	t.Helper()
	select {
	case <-e.accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream saw no connection")
	}
}

func (e *echo4) port() string {
	return strconv.Itoa(e.Addr().(*net.TCPAddr).Port)
}

func TestDialerIPv4Direct(t *testing.T) {
	up := listenLoopback4(t)
	dns := startFakeDNS(t, map[string][]netip.Addr{
		"v4only.test": {netip.MustParseAddr("127.0.0.1")},
	})
	for _, host := range []string{"127.0.0.1", "::ffff:127.0.0.1", "v4only.test"} {
		t.Run(host, func(t *testing.T) {
			d, p := loopbackDialer(t)
			d.IPv4 = IPv4Direct
			d.Resolver = dns.Resolver()

			c, err := d.DialContext(context.Background(), "tcp", net.JoinHostPort(host, up.port()))
			require.NoError(t, err)
			conn, ok := c.(*Conn)
			require.True(t, ok, "a *Conn: %T", c)
			assert.True(t, conn.DirectIPv4())
			assert.Equal(t, netip.MustParseAddr("127.0.0.1"), conn.Egress(), "the host's own address")
			_, isTCP := conn.NetConn().(*net.TCPConn)
			assert.True(t, isTCP)
			assert.Zero(t, p.Stats().Added, "no lease for a direct IPv4 connection")
			up.waitAccept(t)

			// Echo and half-close pass through, and Close works without a
			// lease.
			_, err = c.Write([]byte("ping"))
			require.NoError(t, err)
			require.NoError(t, conn.CloseWrite())
			got, err := io.ReadAll(c)
			require.NoError(t, err)
			assert.Equal(t, "ping", string(got))
			require.NoError(t, c.Close())
			assert.Zero(t, p.Stats().Live)
		})
	}
}

// TestDialerIPv4EachRecord: the A records are tried in turn, the first
// refuses.
func TestDialerIPv4EachRecord(t *testing.T) {
	up := listenLoopback4(t)
	d, _ := loopbackDialer(t)
	d.IPv4 = IPv4Direct
	port, err := strconv.ParseUint(up.port(), 10, 16)
	require.NoError(t, err)
	// 127.0.0.2 is loopback too, and nothing listens there on that port.
	ips := []netip.Addr{netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.1")}
	c, err := d.dialIPv4(context.Background(), ips, uint16(port))
	require.NoError(t, err)
	defer c.Close()
	assert.Equal(t, up.Addr().String(), c.RemoteAddr().String())
	assert.True(t, c.(*Conn).DirectIPv4())
}

// TestDialerResolution checks which names go over IPv6, which over IPv4 and
// which fail, under both policies, with real lookups answered by the fake
// DNS server.
func TestDialerResolution(t *testing.T) {
	if ln, err := net.Listen("tcp6", "[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	} else {
		ln.Close()
	}
	up4 := listenLoopback4(t)
	up6 := listenLoopback(t)
	port6 := strconv.Itoa(up6.Addr().(*net.TCPAddr).Port)
	loop4, loop6 := netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")
	dns := startFakeDNS(t, map[string][]netip.Addr{
		"v4only.test": {loop4},
		"v6only.test": {loop6},
		"dual.test":   {loop6, loop4},
		"empty.test":  nil, // exists, no address
	}, "flaky.test")

	type want int
	const (
		ipv6    want = iota // connected from the leased ::1
		ipv4                // connected directly over IPv4
		noIPv6              // ErrNoIPv6
		noHost              // *net.DNSError, IsNotFound
		failure             // some other error, no IPv4
	)
	tests := []struct {
		name    string
		policy  IPv4Policy
		network string
		addr    string
		want    want
	}{
		{"aaaa only", IPv4Direct, "tcp", "v6only.test:" + port6, ipv6},
		{"a only, direct", IPv4Direct, "tcp", "v4only.test:" + up4.port(), ipv4},
		{"a only, deny", IPv4Deny, "tcp", "v4only.test:" + up4.port(), noIPv6},
		{"a only, zero policy", "", "tcp", "v4only.test:" + up4.port(), noIPv6},
		{"a only, tcp6", IPv4Direct, "tcp6", "v4only.test:" + up4.port(), noIPv6},
		{"ipv4 literal, deny", IPv4Deny, "tcp", "127.0.0.1:" + up4.port(), noIPv6},
		{"both, direct", IPv4Direct, "tcp", "dual.test:" + port6, ipv6},
		// The IPv6 dial is refused: no fallback to the A record, although
		// the IPv4 listener would answer on that port.
		{"both, ipv6 refused", IPv4Direct, "tcp", "dual.test:" + up4.port(), failure},
		{"no such name, direct", IPv4Direct, "tcp", "nxdomain.test:80", noHost},
		{"no such name, deny", IPv4Deny, "tcp", "nxdomain.test:80", noHost},
		{"no address at all", IPv4Direct, "tcp", "empty.test:80", noHost},
		// A failed AAAA lookup is not an answer that there is none.
		{"aaaa lookup fails", IPv4Direct, "tcp", "flaky.test:" + up4.port(), failure},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, p := loopbackDialer(t)
			d.IPv4 = tt.policy
			d.Resolver = dns.Resolver()

			c, err := d.DialContext(context.Background(), tt.network, tt.addr)
			if c != nil {
				defer c.Close()
			}
			switch tt.want {
			case ipv6:
				require.NoError(t, err)
				assert.False(t, c.(*Conn).DirectIPv4())
				assert.Equal(t, loop6, c.(*Conn).Egress())
				assert.Equal(t, 1, p.Stats().InUse)
			case ipv4:
				require.NoError(t, err)
				assert.True(t, c.(*Conn).DirectIPv4())
				assert.Equal(t, loop4, c.(*Conn).Egress())
				up4.waitAccept(t)
			case noIPv6:
				require.ErrorIs(t, err, ErrNoIPv6)
				assert.NotErrorIs(t, err, ErrNoAddress)
			case noHost:
				require.Error(t, err)
				dnsErr, ok := errors.AsType[*net.DNSError](err)
				require.True(t, ok, "a *net.DNSError: %v", err)
				assert.True(t, dnsErr.IsNotFound, "%v", err)
				assert.NotErrorIs(t, err, ErrNoIPv6)
			case failure:
				require.Error(t, err)
				assert.NotErrorIs(t, err, ErrNoIPv6)
				if dnsErr, ok := errors.AsType[*net.DNSError](err); ok {
					assert.False(t, dnsErr.IsNotFound, "%v", err)
				}
			}
			if tt.want != ipv4 {
				assert.Empty(t, up4.accepted, "nothing reached the IPv4 listener")
			}
			if tt.want != ipv6 {
				assert.Zero(t, p.Stats().InUse)
			}
		})
	}

	// A name with AAAA records is never looked up for A records.
	queried := dns.Queries()
	assert.Contains(t, queried, "AAAA dual.test")
	assert.NotContains(t, queried, "A dual.test")
	assert.Contains(t, queried, "AAAA flaky.test")
	assert.NotContains(t, queried, "A flaky.test")
}
