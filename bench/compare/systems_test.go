package compare

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/egressd/egressd/test/nstest"
)

// system is one of the things measured: no proxy, or a proxy listening in H.
type system struct {
	name string
	// session makes the load generator send a session key per worker.
	session bool
	// onLink is the prefix of an egressd that adds addresses on H's link,
	// whose entries in R's neighbour table every run samples; invalid for
	// the others.
	onLink netip.Prefix
	// perRequest: an on-link address per connection, from the neighbour
	// budget. (d) leaves it out: its tunnels would need more distinct
	// addresses than the budget allows at once (396 by default).
	perRequest bool
	// proc is the proxy's process, nil for direct; addr its listening
	// address.
	proc *nstest.Process
	addr string
}

func (s *system) proxyURL() string {
	if s.proc == nil {
		return ""
	}
	return "http://" + s.addr
}

// The prefixes egressd draws from: an /80 of H's link for each on-link
// instance so that they never touch each other's addresses, and the /64 R
// routes to H (as in test/routed_test.go).
var (
	onLinkPrefix  = netip.MustParsePrefix("2001:db8:1:2:1::/80")
	sessionPrefix = netip.MustParsePrefix("2001:db8:1:2:2::/80")
	connPrefix    = netip.MustParsePrefix("2001:db8:1:2:3::/80")
	routedPrefix  = netip.MustParsePrefix("2001:db8:5:5::/64")
)

// squidAddrs are the 10 static addresses of squid-random10, on H's link.
func squidAddrs() []netip.Addr {
	var out []netip.Addr
	for i := 1; i <= 10; i++ {
		out = append(out, netip.MustParseAddr(fmt.Sprintf("2001:db8:1:2:ffff::%x", i)))
	}
	return out
}

// startSystems starts every proxy -systems names (all by default), each on
// its own port of 127.0.0.1 in H, and waits until each accepts connections.
// Squid and tinyproxy are left out with a logged message when they are not
// installed, except under CI.
func (b *bench) startSystems() []*system {
	t := b.t
	var systems []*system
	if b.p.wants(Direct) {
		systems = append(systems, &system{name: Direct})
	}
	egressd := func(name string, port int, s system, args ...string) {
		if !b.p.wants(name) {
			return
		}
		s.name, s.addr = name, "127.0.0.1:"+strconv.Itoa(port)
		// Warnings only, as Squid and tinyproxy log nothing per request here.
		// The load generator is one client address standing in for many
		// (and (d) holds thousands of tunnels from it): its per-client
		// caps are those of the whole proxy. (d)'s tunnels go to the
		// upstream's hold port, 9000, which Squid and tinyproxy admit too.
		args = append([]string{"-listen", s.addr, "-interface", b.tp.HostLink, "-log-level", "warn",
			"-max-conns-per-client", "16384", "-max-addrs-per-client", "16384",
			"-connect-ports", "443,80,9000"}, args...)
		s.proc = b.tp.StartEgressd(t, b.egressd, args...)
		b.waitPort(&s)
		systems = append(systems, &s)
	}
	egressd(EgressdOnLink, 3101, system{onLink: onLinkPrefix, perRequest: true}, "-rotate", "request", "-prefix", onLinkPrefix.String())
	b.tp.Router.Run(t, "ip", "-6", "route", "add", routedPrefix.String(), "via", nstest.HostAddr.String(), "dev", b.tp.RouterLink)
	// In routed mode an address costs the kernel nothing: no -max-addrs by
	// default, and (d) takes one per tunnel.
	egressd(EgressdRouted, 3102, system{}, "-mode", "routed", "-rotate", "request", "-prefix", routedPrefix.String())
	egressd(EgressdSession, 3103, system{onLink: sessionPrefix, session: true}, "-rotate", "session", "-prefix", sessionPrefix.String())
	// An address held per client connection: (d)'s tunnels, each on a
	// connection of its own, would need as many as -rotate request.
	egressd(EgressdConnection, 3107, system{onLink: connPrefix, perRequest: true}, "-rotate", "connection", "-prefix", connPrefix.String())

	if b.p.wants(Tinyproxy) && b.have("tinyproxy") {
		systems = append(systems, b.startTinyproxy(3104))
	}
	if (b.p.wants(Squid) || b.p.wants(SquidRandom10)) && b.have("squid") {
		if b.p.wants(Squid) {
			systems = append(systems, b.startSquid(Squid, 3105, nil))
		}
		if b.p.wants(SquidRandom10) {
			for _, a := range squidAddrs() {
				b.tp.Host.Run(t, "ip", "addr", "add", a.String()+"/128", "dev", b.tp.HostLink, "nodad")
			}
			systems = append(systems, b.startSquid(SquidRandom10, 3106, squidAddrs()))
		}
	}
	return systems
}

// have reports whether a program is installed. A missing one fails the
// test under CI, where make bench's install-deps.sh must have run.
func (b *bench) have(prog string) bool {
	if _, err := exec.LookPath(prog); err != nil {
		if os.Getenv("CI") == "true" {
			b.t.Fatalf("%s is not installed (bench/install-deps.sh installs it)", prog)
		}
		b.t.Logf("%s is not installed: leaving it out (bench/install-deps.sh installs it)", prog)
		b.notes = append(b.notes, prog+" was not installed and is left out.")
		return false
	}
	return true
}

// startTinyproxy runs tinyproxy in the foreground with a file limit raised
// to the hard limit: it holds two descriptors per tunnel in (d).
func (b *bench) startTinyproxy(port int) *system {
	t := b.t
	conf := filepath.Join(b.confDir(t, ""), "tinyproxy.conf")
	write(t, conf, fmt.Sprintf(`User tinyproxy
Group tinyproxy
Port %d
Listen 127.0.0.1
Timeout 600
MaxClients %d
LogLevel Critical
ConnectPort 443
ConnectPort 80
ConnectPort 9000
`, port, b.p.idleN+500))
	s := &system{name: Tinyproxy, addr: "127.0.0.1:" + strconv.Itoa(port)}
	limit := fmt.Sprintf("--nofile=%d:%d", b.nofile, b.nofile)
	s.proc = b.tp.Host.Start(t, nil, "prlimit", limit, "tinyproxy", "-d", "-c", conf)
	b.waitPort(s)
	return s
}

// startSquid runs Squid as one process (-N). With addrs, it sends each
// request from one of them picked at random, the usual chain of acl random
// rules with tcp_outgoing_address.
func (b *bench) startSquid(name string, port int, addrs []netip.Addr) *system {
	t := b.t
	dir := b.confDir(t, "proxy")
	var rotate strings.Builder
	for i, a := range addrs {
		if i == len(addrs)-1 {
			fmt.Fprintf(&rotate, "tcp_outgoing_address %s\n", a)
			break
		}
		fmt.Fprintf(&rotate, "acl r%d random 1/%d\ntcp_outgoing_address %s r%d\n", i+1, len(addrs)-i, a, i+1)
	}
	conf := filepath.Join(dir, "squid.conf")
	write(t, conf, fmt.Sprintf(`http_port 127.0.0.1:%d
http_access allow all
cache deny all
cache_mem 0 MB
access_log none
cache_store_log none
cache_log %s/cache.log
pid_filename %s/squid.pid
netdb_filename none
pinger_enable off
max_filedescriptors %d
client_persistent_connections on
server_persistent_connections on
shutdown_lifetime 0 seconds
%s`, port, dir, dir, b.nofile, rotate.String()))
	if out, err := exec.Command("squid", "-k", "parse", "-f", conf).CombinedOutput(); err != nil {
		t.Fatalf("squid -k parse -f %s: %v\n%s", conf, err, out)
	}
	s := &system{name: name, addr: "127.0.0.1:" + strconv.Itoa(port)}
	s.proc = b.tp.Host.Start(t, nil, "squid", "-N", "-f", conf)
	b.waitPort(s)
	return s
}

// confDir makes a directory for a proxy's files, owned by owner when given
// (Squid writes its log as user proxy), removed in t.Cleanup. Not
// t.TempDir: its parent is closed to other users.
func (b *bench) confDir(t *testing.T, owner string) string {
	dir, err := os.MkdirTemp("", "egressd-bench-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if owner != "" {
		u, err := user.Lookup(owner)
		if err != nil {
			t.Fatal(err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func write(t *testing.T, name, content string) {
	t.Helper()
	if err := os.WriteFile(name, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// waitPort waits until the proxy accepts connections in H.
func (b *bench) waitPort(s *system) {
	t := b.t
	t.Helper()
	deadline := time.Now().Add(nstest.Guard)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := b.tp.Host.DialContext(ctx, "tcp", s.addr)
		cancel()
		if err == nil {
			c.Close()
			return
		}
		if s.proc.Exited() || time.Now().After(deadline) {
			t.Fatalf("%s not accepting connections on %s: %v; stderr:\n%s", s.name, s.addr, err, s.proc.Stderr())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// versions describes the machine and the proxies' versions.
func versions() Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	firstLine := func(name string, args ...string) string {
		out, err := exec.Command(name, args...).Output()
		if err != nil {
			return ""
		}
		line, _, _ := strings.Cut(string(out), "\n")
		return strings.TrimSpace(line)
	}
	m.Squid = firstLine("squid", "-v")
	m.Tinyproxy = firstLine("tinyproxy", "-v")
	return m
}
