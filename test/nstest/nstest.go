// Package nstest builds the throw-away network that egressd's integration
// tests, demo and benchmarks run in: two network namespaces, a host H where
// egressd runs and a router R that stands for the Internet, joined by a veth
// pair.
//
//	H: lo, veth 2001:db8:1:2::2/64 (nodad), 192.0.2.2/24, default via 2001:db8:1:2::1
//	R: lo 2001:db8:ffff::1/128 (the upstream), veth 2001:db8:1:2::1/64 (nodad), 192.0.2.1/24
//
// In H the name upstream.test resolves (AAAA only) to 2001:db8:ffff::1 through
// /etc/netns/H/hosts; v4only.test (A only) to 192.0.2.1, and dual.test to
// both. The upstream servers run inside the test process with their listening
// sockets made in R (see Topo.StartUpstream). Nothing here
// touches the machine's own interfaces, addresses, routes or /etc files, and
// every namespace, process and file it makes is removed in t.Cleanup, also when
// the test fails.
package nstest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// The addresses of the topology. They are all documentation addresses
// (RFC 3849, RFC 5737) and exist only inside the namespaces a test makes.
var (
	// Prefix is the /64 of the link between H and R: egressd's egress prefix.
	Prefix = netip.MustParsePrefix("2001:db8:1:2::/64")
	// HostAddr is H's own address, its default source address.
	HostAddr = netip.MustParseAddr("2001:db8:1:2::2")
	// RouterAddr is R's address on the link, H's default gateway.
	RouterAddr = netip.MustParseAddr("2001:db8:1:2::1")
	// UpstreamAddr sits on R's lo; H reaches it through its default route.
	UpstreamAddr = netip.MustParseAddr("2001:db8:ffff::1")
	// HostAddr4 and RouterAddr4 are the IPv4 pair on the link.
	HostAddr4   = netip.MustParseAddr("192.0.2.2")
	RouterAddr4 = netip.MustParseAddr("192.0.2.1")
)

// UpstreamName resolves to UpstreamAddr inside H (AAAA only, so nothing can
// fall back to IPv4).
const UpstreamName = "upstream.test"

// V4OnlyName resolves to RouterAddr4 inside H, with an A record only: an
// upstream that has no IPv6 address.
const V4OnlyName = "v4only.test"

// DualName resolves inside H to both UpstreamAddr (AAAA) and RouterAddr4 (A).
const DualName = "dual.test"

// Guard is the failure guard for anything a test waits on: generous, because
// machines are shared; it is never an assertion about speed.
const Guard = 60 * time.Second

// WaitFor polls cond every 20 ms until it holds, failing the test after
// Guard. It is a failure guard, not a timing assertion. Call it from the
// test's goroutine.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(Guard)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up after %v waiting for %s", Guard, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// RequireRoot skips the test unless it runs as root, which building network
// namespaces needs. CI runs as root, so there the tests run; under CI (the
// CI variable set) a test that cannot run fails rather than skips, so that a
// misconfigured runner cannot pass by skipping.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI is set but the tests do not run as root: the namespace tests would be skipped")
		}
		t.Skip("skipping: needs root to build network namespaces (run as root, as CI does: sudo go test ./test/)")
	}
}

// NS is a network namespace made by New.
type NS struct {
	// Name is the name under /run/netns, for `ip netns exec`.
	Name   string
	handle netns.NsHandle
	env    []string // for every command run inside
}

// Handle is the namespace's file handle, for netns.Set and netlink.NewHandleAt.
func (ns *NS) Handle() netns.NsHandle { return ns.handle }

// Command returns a command that runs name inside the namespace with
// `ip netns exec`, which execs it in place: the started process's pid is the
// command's own. Proxy variables of the test's environment are left out so
// that only what a test sets reaches the command; RUNTIME_DIRECTORY is the
// topology's (Topo.RuntimeDir). A variable a caller appends to Env wins over
// these (os/exec keeps the last of duplicate keys).
func (ns *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
	cmd.Env = append(CleanEnv(), ns.env...)
	return cmd
}

// Output runs name in the namespace and returns its standard output. The
// error carries the standard error. It gives up after Guard.
func (ns *NS) Output(name string, args ...string) (string, error) {
	return ns.OutputEnv(nil, name, args...)
}

// OutputEnv is Output with env (KEY=value) added to the environment.
func (ns *NS) OutputEnv(env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), Guard)
	defer cancel()
	cmd := ns.Command(ctx, name, args...)
	cmd.Env = append(cmd.Env, env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("ip netns exec %s %s %s: %w: %s",
			ns.Name, name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Run is Output that fails the test on error. Call it from the test's goroutine.
func (ns *NS) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := ns.Output(name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Do runs fn on a thread that is inside the namespace. Sockets fn creates
// belong to the namespace for their whole life. If the thread cannot be put
// back into its own namespace it stays locked, so the runtime ends it instead
// of reusing it.
func (ns *NS) Do(fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("getting current network namespace: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(ns.handle); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("entering network namespace %s: %w", ns.Name, err)
	}
	fnErr := fn()
	if err := netns.Set(orig); err != nil {
		return errors.Join(fnErr, fmt.Errorf("leaving network namespace %s: %w", ns.Name, err))
	}
	runtime.UnlockOSThread()
	return fnErr
}

// Listen makes a listening socket inside the namespace.
func (ns *NS) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := ns.Do(func() error {
		var err error
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// DialContext connects from inside the namespace. Use IP literals: the socket
// is made on the calling thread, name resolution might not be.
func (ns *NS) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := ns.Do(func() error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

// Topo is the two-namespace topology described in the package comment.
type Topo struct {
	// Host is H, where egressd and the clients run; Router is R, the upstream's side.
	Host, Router *NS
	// HostLink and RouterLink name the veth ends in H and in R.
	HostLink, RouterLink string
	// RuntimeDir is the RUNTIME_DIRECTORY of every process started in H or
	// R, as systemd's RuntimeDirectory= sets it: where egressd keeps its
	// instance locks, so that the egressd processes of one topology see each
	// other's and never the machine's /run/egressd.
	RuntimeDir string

	nlMu sync.Mutex
	nl   *netlink.Handle // in H
	rnl  *netlink.Handle // in R, opened by RouterNeighbours
}

var counter atomic.Int64

// New builds a fresh topology with unique names and removes it in t.Cleanup.
// It skips the test when not root.
func New(t testing.TB) *Topo {
	t.Helper()
	RequireRoot(t)

	// "egt" + pid (at most 7 digits) + counter; the interface names add one
	// letter and must stay within IFNAMSIZ-1 = 15 bytes.
	base := fmt.Sprintf("egt%dx%d", os.Getpid(), counter.Add(1))
	if len(base)+1 > 15 {
		t.Fatalf("namespace base name %q too long for an interface name", base)
	}
	runtimeDir := t.TempDir()
	env := []string{"RUNTIME_DIRECTORY=" + runtimeDir}
	tp := &Topo{
		Host:       &NS{Name: base + "h", handle: -1, env: env},
		Router:     &NS{Name: base + "r", handle: -1, env: env},
		HostLink:   base + "h",
		RouterLink: base + "r",
		RuntimeDir: runtimeDir,
	}
	t.Cleanup(func() {
		if err := tp.remove(); err != nil {
			t.Errorf("removing topology %s: %v", base, err)
		}
	})

	for _, ns := range []*NS{tp.Host, tp.Router} {
		mustIP(t, "netns", "add", ns.Name)
		h, err := netns.GetFromName(ns.Name)
		if err != nil {
			t.Fatalf("opening namespace %s: %v", ns.Name, err)
		}
		ns.handle = h
	}
	h, r := tp.Host.Name, tp.Router.Name
	// R does no duplicate address detection: it is not under test, and its
	// link-local address is usable at once. H keeps DAD, as real hosts do, so
	// that an egress address added without nodad would be unusable at first.
	tp.Router.Run(t, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	// The veth is made inside H with its peer directly in R: not even for a
	// moment does an interface of ours exist in the machine's namespace.
	mustIP(t, "-n", h, "link", "add", tp.HostLink, "type", "veth", "peer", "name", tp.RouterLink, "netns", r)
	for _, args := range [][]string{
		{"-n", h, "link", "set", "lo", "up"},
		{"-n", r, "link", "set", "lo", "up"},
		{"-n", h, "link", "set", tp.HostLink, "up"},
		{"-n", r, "link", "set", tp.RouterLink, "up"},
		{"-n", h, "addr", "add", HostAddr.String() + "/64", "dev", tp.HostLink, "nodad"},
		{"-n", r, "addr", "add", RouterAddr.String() + "/64", "dev", tp.RouterLink, "nodad"},
		{"-n", h, "addr", "add", HostAddr4.String() + "/24", "dev", tp.HostLink},
		{"-n", r, "addr", "add", RouterAddr4.String() + "/24", "dev", tp.RouterLink},
		{"-n", r, "addr", "add", UpstreamAddr.String() + "/128", "dev", "lo"},
		{"-n", h, "-6", "route", "add", "default", "via", RouterAddr.String(), "dev", tp.HostLink},
	} {
		mustIP(t, args...)
	}

	// R keeps the kernel's default neighbour settings (reachable time 30 s,
	// entries collected once unused for 60 s), as real routers do: on-link
	// rotation makes R learn a neighbour entry for every egress address, in
	// a table of 1,024 entries that every namespace of the machine shares,
	// and egressd's neighbour budget (-new-addrs) is what keeps it from
	// filling. Tests never tune it.

	// Names inside H only: `ip netns exec` bind-mounts these over /etc/hosts
	// and /etc/resolv.conf. The resolver points at H's own loopback, where
	// nothing listens, so no lookup ever leaves H.
	writeEtc(t, h, map[string]string{
		"hosts": "127.0.0.1 localhost\n::1 localhost\n" +
			UpstreamAddr.String() + " " + UpstreamName + " " + DualName + "\n" +
			RouterAddr4.String() + " " + V4OnlyName + " " + DualName + "\n",
		"resolv.conf": "nameserver ::1\noptions timeout:1 attempts:1\n",
	})

	nl, err := netlink.NewHandleAt(tp.Host.handle)
	if err != nil {
		t.Fatalf("opening netlink in %s: %v", h, err)
	}
	tp.nl = nl

	// While H's link-local address is tentative, neighbour discovery on the
	// link stalls for a second or two now and then (measured): wait until DAD
	// is over so that such stalls do not blur what the tests see.
	deadline := time.Now().Add(Guard)
	for {
		addrs, err := tp.HostAddrs()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.Flags&unix.IFA_F_TENTATIVE != 0 }) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("addresses of %s still tentative after %v: %v", tp.HostLink, Guard, addrs)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return tp
}

// HostAddrs lists the addresses on H's veth, both families.
func (tp *Topo) HostAddrs() ([]netlink.Addr, error) {
	tp.nlMu.Lock()
	defer tp.nlMu.Unlock()
	link, err := tp.nl.LinkByName(tp.HostLink)
	if err != nil {
		return nil, fmt.Errorf("finding %s in %s: %w", tp.HostLink, tp.Host.Name, err)
	}
	addrs, err := tp.nl.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("listing addresses of %s in %s: %w", tp.HostLink, tp.Host.Name, err)
	}
	return addrs, nil
}

// RouterNeighbours counts R's neighbour entries on its link for addresses
// of prefix, in any state: what egressd's on-link addresses cost the router.
func (tp *Topo) RouterNeighbours(prefix netip.Prefix) (int, error) {
	tp.nlMu.Lock()
	defer tp.nlMu.Unlock()
	if tp.rnl == nil {
		h, err := netlink.NewHandleAt(tp.Router.handle)
		if err != nil {
			return 0, fmt.Errorf("opening netlink in %s: %w", tp.Router.Name, err)
		}
		tp.rnl = h
	}
	link, err := tp.rnl.LinkByName(tp.RouterLink)
	if err != nil {
		return 0, fmt.Errorf("finding %s in %s: %w", tp.RouterLink, tp.Router.Name, err)
	}
	neighs, err := tp.rnl.NeighList(link.Attrs().Index, netlink.FAMILY_V6)
	if err != nil {
		return 0, fmt.Errorf("listing neighbours of %s in %s: %w", tp.RouterLink, tp.Router.Name, err)
	}
	n := 0
	for _, nb := range neighs {
		if a, ok := netip.AddrFromSlice(nb.IP); ok && prefix.Contains(a.Unmap()) {
			n++
		}
	}
	return n, nil
}

// WatchNeighbours samples RouterNeighbours(prefix) every interval, from now
// until stop is called, which returns the samples (a failed one is -1).
func (tp *Topo) WatchNeighbours(prefix netip.Prefix, interval time.Duration) (stop func() []int) {
	done := make(chan struct{})
	out := make(chan []int, 1)
	go func() {
		var samples []int
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			n, err := tp.RouterNeighbours(prefix)
			if err != nil {
				n = -1
			}
			samples = append(samples, n)
			select {
			case <-done:
				out <- samples
				return
			case <-tick.C:
			}
		}
	}()
	return func() []int {
		close(done)
		return <-out
	}
}

// AddrOf is the address of a netlink.Addr as a netip.Addr.
func AddrOf(a netlink.Addr) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.IP)
	return ip.Unmap()
}

// PrefixLen is the prefix length of a netlink.Addr.
func PrefixLen(a netlink.Addr) int {
	ones, _ := a.Mask.Size()
	return ones
}

func (tp *Topo) remove() error {
	var errs []error
	tp.nlMu.Lock()
	for _, h := range []*netlink.Handle{tp.nl, tp.rnl} {
		if h != nil {
			h.Close()
		}
	}
	tp.nlMu.Unlock()
	for _, ns := range []*NS{tp.Host, tp.Router} {
		if ns.handle >= 0 {
			ns.handle.Close()
		}
		if err := RemoveNS(ns.Name); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// RemoveNS ends every process inside the namespace (a running process would
// keep it alive after `ip netns del`), deletes it and removes /etc/netns/NAME.
// A namespace that does not exist is not an error.
func RemoveNS(name string) error {
	var errs []error
	if _, err := os.Stat(filepath.Join("/run/netns", name)); err == nil {
		deadline := time.Now().Add(Guard / 4)
		for {
			pids, err := nsPids(name)
			if err != nil {
				errs = append(errs, err)
				break
			}
			if len(pids) == 0 {
				break
			}
			if time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("processes %v still run in %s", pids, name))
				break
			}
			for _, pid := range pids {
				syscall.Kill(pid, syscall.SIGKILL)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip netns del %s: %w: %s", name, err, bytes.TrimSpace(out)))
		}
	}
	if err := removeEtc(name); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// nsPids lists the processes in a namespace, leaving out the test process
// itself (a thread of ours may visit a namespace in NS.Do).
func nsPids(name string) ([]int, error) {
	out, err := exec.Command("ip", "netns", "pids", name).Output()
	if err != nil {
		return nil, fmt.Errorf("ip netns pids %s: %w", name, err)
	}
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		pid, err := strconv.Atoi(f)
		if err != nil || pid == os.Getpid() {
			continue
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

func mustIP(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
}

// etcMu serialises making and removing /etc/netns, which this package creates
// if it is missing and removes again once no namespace of ours needs it.
var etcMu sync.Mutex

var createdEtcNetns bool

func writeEtc(t testing.TB, ns string, files map[string]string) {
	t.Helper()
	etcMu.Lock()
	defer etcMu.Unlock()
	if _, err := os.Stat("/etc/netns"); errors.Is(err, os.ErrNotExist) {
		createdEtcNetns = true
	}
	dir := filepath.Join("/etc/netns", ns)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func removeEtc(ns string) error {
	etcMu.Lock()
	defer etcMu.Unlock()
	if err := os.RemoveAll(filepath.Join("/etc/netns", ns)); err != nil {
		return err
	}
	if createdEtcNetns {
		// Fails harmlessly while another test's directory is still there.
		if os.Remove("/etc/netns") == nil {
			createdEtcNetns = false
		}
	}
	return nil
}

// CleanEnv is the test process's environment without proxy variables.
func CleanEnv() []string {
	return slices.DeleteFunc(os.Environ(), func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		return strings.HasSuffix(strings.ToLower(k), "_proxy")
	})
}

// AddHosts adds lines to H's /etc/hosts (/etc/netns/H/hosts), for names a
// test needs beyond those New gives. Programs started afterwards see them.
func (tp *Topo) AddHosts(t testing.TB, lines string) {
	t.Helper()
	etcMu.Lock()
	defer etcMu.Unlock()
	f, err := os.OpenFile(filepath.Join("/etc/netns", tp.Host.Name, "hosts"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(lines); err != nil {
		t.Fatal(err)
	}
}
