package test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/test/nstest"
)

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "test: not root, so every namespace test will skip (CI runs them as root)")
		os.Exit(m.Run())
	}
	os.Exit(nstest.Main(m, "./cmd/egressd", "./cmd/egressctl", "./test/fetch", "./test/upstream"))
}

// binary returns the path of a binary built in TestMain, failing the test if
// it did not build. It skips when not root.
func binary(t testing.TB, pkg string) string {
	t.Helper()
	nstest.RequireRoot(t)
	return nstest.Binary(t, pkg)
}

const proxyAddr = "127.0.0.1:3128"

// env is a topology with the upstream and egressd running in H.
type env struct {
	tp  *nstest.Topo
	up  *nstest.Upstream
	ed  *nstest.Process
	bin string
}

// egressdArgs are the flags every test passes: the interface and prefix of
// the topology and the default listen address, spelled out. -prefix is
// repeatable: extra flags that name prefixes replace the topology's.
func egressdArgs(tp *nstest.Topo, extra ...string) []string {
	args := []string{"-listen", proxyAddr, "-interface", tp.HostLink, "-log-level", "debug"}
	if !slices.Contains(extra, "-prefix") {
		args = append(args, "-prefix", nstest.Prefix.String())
	}
	return append(args, extra...)
}

// setup builds a topology and starts the upstream, without egressd.
func setup(t testing.TB) *env {
	t.Helper()
	bin := binary(t, "./cmd/egressd")
	e := &env{tp: nstest.New(t), bin: bin}
	e.up = e.tp.StartUpstream(t)
	return e
}

// start builds a topology, starts the upstream and egressd with extra flags,
// and waits until egressd listens.
func start(t *testing.T, extra ...string) *env {
	t.Helper()
	e := setup(t)
	e.ed = e.restart(t, extra...)
	return e
}

// restart starts another egressd in the same topology.
func (e *env) restart(t testing.TB, extra ...string) *nstest.Process {
	t.Helper()
	ed := e.tp.StartEgressd(t, e.bin, egressdArgs(e.tp, extra...)...)
	ed.WaitListening(t, 1)
	e.ed = ed
	return ed
}

// replace stops e's egressd with SIGTERM, as systemd stops it, and starts
// another in the same topology with extra flags.
func (e *env) replace(t testing.TB, extra ...string) *nstest.Process {
	t.Helper()
	require.NoError(t, e.ed.Signal(syscall.SIGTERM))
	require.Zero(t, e.ed.Wait(t), "egressd's exit status after SIGTERM")
	return e.restart(t, extra...)
}

func guardCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), nstest.Guard)
	t.Cleanup(cancel)
	return ctx
}

// assertFresh checks that peers are n distinct egress addresses: inside the
// prefix, and none of them H's own address, the router's or the prefix's
// zero address, nor any of avoid.
func assertFresh(t *testing.T, peers []netip.Addr, n int, avoid ...netip.Addr) {
	t.Helper()
	assert.Len(t, peers, n, "requests seen by the upstream")
	seen := map[netip.Addr]int{}
	for _, p := range peers {
		seen[p]++
	}
	for p, c := range seen {
		assert.Equal(t, 1, c, "egress address %s used %d times", p, c)
		assert.True(t, nstest.Prefix.Contains(p), "egress address %s outside %s", p, nstest.Prefix)
		assert.NotEqual(t, nstest.HostAddr, p, "a request left from H's own address")
		assert.NotEqual(t, nstest.RouterAddr, p, "a request left from the router's address")
		assert.NotEqual(t, nstest.Prefix.Addr(), p, "a request left from the prefix's zero address")
		assert.NotContains(t, avoid, p, "a request left from an address egressd must not use")
	}
}

// parseBodies turns echo bodies ("ADDR\n" each, possibly concatenated) into
// addresses.
func parseBodies(t *testing.T, out string) []netip.Addr {
	t.Helper()
	var addrs []netip.Addr
	for _, f := range strings.Fields(out) {
		a, err := netip.ParseAddr(f)
		require.NoError(t, err, "upstream answer %q", out)
		addrs = append(addrs, a)
	}
	return addrs
}

// addedAddrs lists the addresses on H's veth that are not in before: what
// egressd (or the test) added since.
func addedAddrs(t *testing.T, tp *nstest.Topo, before []netlink.Addr) []netlink.Addr {
	t.Helper()
	now, err := tp.HostAddrs()
	require.NoError(t, err)
	return slices.DeleteFunc(now, func(a netlink.Addr) bool {
		return slices.ContainsFunc(before, func(b netlink.Addr) bool { return a.Equal(b) })
	})
}

// hostAddrs lists the addresses on H's veth.
func hostAddrs(t *testing.T, tp *nstest.Topo) []netlink.Addr {
	t.Helper()
	addrs, err := tp.HostAddrs()
	require.NoError(t, err)
	return addrs
}

// addrStrings is a sorted list of "addr/len" for comparing address sets.
func addrStrings(addrs []netlink.Addr) []string {
	var s []string
	for _, a := range addrs {
		s = append(s, a.IPNet.String())
	}
	slices.Sort(s)
	return s
}

// waitRequestLogs waits until egressd has logged at least n access lines that
// keep accepts (every line when keep is nil) and returns those lines.
// egressd writes an access line when a request ends, after the client has
// its answer, so a line of an earlier request can come after the lines of a
// later one: a test picks its own lines by what marks them (egressIn,
// statusIs), never by their position in the log.
func waitRequestLogs(t *testing.T, ed *nstest.Process, n int, keep func(rec map[string]string) bool) []map[string]string {
	t.Helper()
	lines := func() []map[string]string {
		recs := ed.Log("request")
		if keep != nil {
			recs = slices.DeleteFunc(recs, func(rec map[string]string) bool { return !keep(rec) })
		}
		return recs
	}
	nstest.WaitFor(t, fmt.Sprintf("%d access log lines", n), func() bool { return len(lines()) >= n })
	return lines()
}

// egressIn keeps the access lines of requests that left from one of addrs:
// fresh addresses are never reused, so they mark a test's own requests.
func egressIn(addrs []netip.Addr) func(map[string]string) bool {
	return func(rec map[string]string) bool {
		a, err := netip.ParseAddr(rec["egress"])
		return err == nil && slices.Contains(addrs, a)
	}
}

// statusIs keeps the access lines with the given status.
func statusIs(status string) func(map[string]string) bool {
	return func(rec map[string]string) bool { return rec["status"] == status }
}

// assertEgressAddr checks what egressd added to the interface: a /128 with
// IFA_F_NODAD and IFA_F_NOPREFIXROUTE, deprecated (preferred_lft 0) so that
// it is never the host's default source, with a finite valid lifetime so that
// the kernel removes it if egressd dies.
func assertEgressAddr(t *testing.T, a netlink.Addr) {
	t.Helper()
	assert.Equal(t, 128, nstest.PrefixLen(a), "%s: prefix length", a)
	assert.NotZero(t, a.Flags&unix.IFA_F_NODAD, "%s: no IFA_F_NODAD (flags %#x)", a, a.Flags)
	assert.NotZero(t, a.Flags&unix.IFA_F_NOPREFIXROUTE, "%s: no IFA_F_NOPREFIXROUTE (flags %#x)", a, a.Flags)
	assert.NotZero(t, a.Flags&unix.IFA_F_DEPRECATED, "%s: not deprecated (flags %#x)", a, a.Flags)
	assert.Zero(t, a.PreferedLft, "%s: preferred_lft", a)
	assert.Positive(t, a.ValidLft, "%s: valid_lft", a)
	assert.NotEqual(t, lifetimeForever, a.ValidLft, "%s: valid_lft is forever", a)
}

// lifetimeForever is INFINITY_LIFE_TIME, the kernel's "forever".
const lifetimeForever = 0xffffffff
