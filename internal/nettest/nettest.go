// Package nettest holds what the tests of netutil and netutil/kernel share:
// unnamed network namespaces with a veth pair in them (New), running code
// inside one (In), an echo server and a check of it, a logger that keeps
// its lines, and a background runner stopped at the end of a test. The
// namespaces have no name (nothing shows in `ip netns list`) and disappear
// when their last handle closes, in t.Cleanup.
//
// It imports neither netutil nor netutil/kernel, so that the tests inside
// those packages can use it.
package nettest

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Guard bounds what a test waits for; a failure guard, not a timing
// assertion.
const Guard = 30 * time.Second

// The addresses of the namespace New makes.
var (
	HostAddr = netip.MustParsePrefix("2001:db8:1:2::2/64") // on eg0
	Gateway  = netip.MustParseAddr("2001:db8:1:2::1")      // of the default route
	Prefix64 = netip.MustParsePrefix("2001:db8:1:2::/64")  // HostAddr's
)

// New makes an unnamed network namespace holding a veth pair whose end
// "eg0" is up with HostAddr and a default route via Gateway (its peer is
// "eg1"), and returns it with a netlink handle inside it. It skips the test
// unless it runs as root, and fails it if CI is set then.
func New(t testing.TB) (netns.NsHandle, *netlink.Handle) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI is set but the tests do not run as root: the namespace tests would be skipped")
		}
		t.Skip("needs root: makes a network namespace")
	}
	ns := Unnamed(t)
	h, err := netlink.NewHandleAt(ns)
	require.NoError(t, err)
	t.Cleanup(h.Close)

	lo, err := h.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, h.LinkSetUp(lo)) // as on any host: connections to its own addresses go through lo
	la := netlink.NewLinkAttrs()
	la.Name = "eg0"
	require.NoError(t, h.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eg1"}))
	link, err := h.LinkByName("eg0")
	require.NoError(t, err)
	peer, err := h.LinkByName("eg1")
	require.NoError(t, err)
	require.NoError(t, h.AddrAdd(link, &netlink.Addr{IPNet: IPNet(HostAddr), Flags: unix.IFA_F_NODAD}))
	require.NoError(t, h.LinkSetUp(link))
	require.NoError(t, h.LinkSetUp(peer))
	require.NoError(t, h.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Gw: Gateway.AsSlice()}))
	return ns, h
}

// WaitDAD waits until no address in h's namespace is tentative: while the
// new link's link-local addresses are, connections on it fail now and then
// with EHOSTUNREACH, and neighbour discovery stalls (measured).
func WaitDAD(t testing.TB, h *netlink.Handle) {
	t.Helper()
	require.Eventually(t, func() bool {
		list, err := h.AddrList(nil, netlink.FAMILY_V6)
		require.NoError(t, err)
		for _, a := range list {
			if a.Flags&unix.IFA_F_TENTATIVE != 0 {
				return false
			}
		}
		return true
	}, Guard, 20*time.Millisecond)
}

// In runs fn on a thread inside ns: the sockets fn makes belong to ns for
// their whole life.
func In(t testing.TB, ns netns.NsHandle, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := netns.Get()
	require.NoError(t, err)
	defer orig.Close()
	require.NoError(t, netns.Set(ns))
	fn()
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: the runtime ends it rather than reuse it.
		t.Fatalf("leaving the test namespace: %v", err)
	}
	runtime.UnlockOSThread()
}

// Unnamed makes an empty unnamed network namespace, closed in t.Cleanup.
func Unnamed(t testing.TB) netns.NsHandle {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	require.NoError(t, err)
	defer orig.Close()
	ns, err := netns.New() // moves this thread into the new namespace
	require.NoError(t, err)
	require.NoError(t, netns.Set(orig))
	t.Cleanup(func() { ns.Close() })
	return ns
}

// IPNet is p as netlink takes it.
func IPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// Run runs fn until the test ends: its context is canceled in t.Cleanup,
// which waits for fn to return.
func Run(t testing.TB, fn func(ctx context.Context)) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { fn(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

// ServeEcho echoes what each connection to ln sends, until the test ends.
func ServeEcho(t testing.TB, ln net.Listener) {
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
}

// Echo checks that c reaches the echo server.
func Echo(t testing.TB, c net.Conn) {
	t.Helper()
	require.NoError(t, c.SetDeadline(time.Now().Add(Guard)))
	_, err := c.Write([]byte("x"))
	require.NoError(t, err)
	b := make([]byte, 1)
	_, err = io.ReadFull(c, b)
	require.NoError(t, err)
	require.NoError(t, c.SetDeadline(time.Time{}))
}

// LogBuffer is a logger that keeps its lines, for checking what was logged
// and how often.
type LogBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *LogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// Logger logs into b, every level.
func (b *LogBuffer) Logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// Count returns how many lines contain s.
func (b *LogBuffer) Count(s string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for line := range strings.Lines(b.buf.String()) {
		if strings.Contains(line, s) {
			n++
		}
	}
	return n
}

func (b *LogBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
