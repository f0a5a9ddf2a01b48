package deploy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/proxy/stats"
	"github.com/egressd/egressd/test/nstest"
)

// serviceUID is who egressd runs as here: not root, as under the unit
// (DynamicUser=yes) and the NixOS module.
const serviceUID = 65534

// topology builds the namespace topology (skipping when not root) and
// starts the upstream in it.
func topology(t *testing.T) (*nstest.Topo, *nstest.Upstream) {
	t.Helper()
	tp := nstest.New(t)
	return tp, tp.StartUpstream(t)
}

// runDir makes a directory owned by serviceUID, for egressd's config file,
// admin socket and instance locks, and removes it in t.Cleanup.
func runDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "egressd-run-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chown(dir, serviceUID, serviceUID))
	return dir
}

// startAsService starts egressd with args in tp's host namespace with the
// privileges the unit gives it: an unprivileged user whose only capability
// is CAP_NET_ADMIN (ambient, and the whole bounding set), with
// no_new_privs. Its admin socket and runtime directory are dir. (The rest
// of the unit's sandbox needs systemd itself, which this machine does not
// run; systemd-analyze checks it.) With caps false it has no capability at
// all.
func startAsService(t *testing.T, tp *nstest.Topo, dir string, caps bool, args ...string) *nstest.Process {
	t.Helper()
	setpriv := requireTool(t, "setpriv", "util-linux")
	uid := strconv.Itoa(serviceUID)
	set := "-all"
	if caps {
		set = "-all,+net_admin"
	}
	admin := filepath.Join(dir, "admin.sock")
	// The runtime directory (instance locks) is the service user's, as
	// systemd's RuntimeDirectory= makes it.
	p := tp.Host.Start(t, []string{"RUNTIME_DIRECTORY=" + dir}, setpriv, slices.Concat([]string{
		"--reuid", uid, "--regid", uid, "--clear-groups",
		"--inh-caps=" + set, "--ambient-caps=" + set, "--bounding-set=" + set,
		"--no-new-privs", "--", nstest.Binary(t, "./cmd/egressd"),
	}, args, []string{"-admin", admin})...)
	p.Admin = admin
	return p
}

// assertServicePrivileges checks, in /proc, that the running egressd has
// what the unit gives it and nothing more.
func assertServicePrivileges(t *testing.T, ed *nstest.Process) {
	t.Helper()
	status := procStatus(t, fmt.Sprintf("/proc/%d/status", ed.Pid))
	uid := strconv.Itoa(serviceUID)
	assert.Equal(t, strings.Repeat(uid+" ", 3)+uid, status["Uid"])
	for _, set := range []string{"CapEff", "CapPrm", "CapAmb", "CapBnd"} {
		assert.Equal(t, capNetAdmin, status[set], set)
	}
	assert.Equal(t, "1", status["NoNewPrivs"])
}

// capNetAdmin is a capability set of CAP_NET_ADMIN (12) alone, as
// /proc/PID/status shows it.
const capNetAdmin = "0000000000001000"

// procStatus reads a /proc/PID/status file into its fields, white space
// collapsed.
func procStatus(t *testing.T, path string) map[string]string {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	fields := map[string]string{}
	for line := range strings.Lines(string(data)) {
		k, v, _ := strings.Cut(line, ":")
		fields[k] = strings.Join(strings.Fields(v), " ")
	}
	return fields
}

// fetchFresh sends a request for each URL through the proxy at proxyAddr
// from H, as user (nil: without credentials), and checks that each got 200
// from a fresh address of the prefix.
func fetchFresh(t *testing.T, tp *nstest.Topo, up *nstest.Upstream, proxyAddr string, user *url.Userinfo, urls ...string) {
	t.Helper()
	c := tp.Host.NewClient(t, proxyAddr, up.RootCAs, false)
	c.Transport.Proxy = http.ProxyURL(&url.URL{Scheme: "http", User: user, Host: proxyAddr})
	for _, u := range urls {
		ctx, cancel := context.WithTimeout(context.Background(), nstest.Guard)
		code, body, err := c.Fetch(ctx, u)
		cancel()
		require.NoError(t, err, "%s through %s", u, proxyAddr)
		require.Equal(t, http.StatusOK, code, "%s through %s: %s", u, proxyAddr, body)
		addr, err := netip.ParseAddr(strings.TrimSpace(body))
		require.NoError(t, err, "upstream answer %q", body)
		assert.True(t, nstest.Prefix.Contains(addr), "%s left from %s, outside %s", u, addr, nstest.Prefix)
		assert.NotEqual(t, nstest.HostAddr, addr, "%s left from H's own address", u)
	}
}

// ctlStats is `egressctl -admin SOCKET stats -json` in H.
func ctlStats(t *testing.T, tp *nstest.Topo, admin string) stats.Stats {
	t.Helper()
	return tp.Host.CtlStats(t, nstest.Binary(t, "./cmd/egressctl"), admin)
}

// writeAuthFile writes an htpasswd -B file with user's name and password at
// path, as the example config and the NixOS module tell users to: group
// egressd (here serviceUID's group), mode 0640, so that the service reads it
// through its group.
func writeAuthFile(t *testing.T, path string, user *url.Userinfo) {
	t.Helper()
	pass, _ := user.Password()
	nstest.HTPasswd(t, path, map[string]string{user.Username(): pass})
	require.NoError(t, os.Chown(path, 0, serviceUID))
	require.NoError(t, os.Chmod(path, 0o640))
}

// curlFromR runs curl in R through the proxy at proxyAddr (plain HTTP to
// the upstream), as user (nil: without credentials), and returns the HTTP
// status.
func curlFromR(t *testing.T, tp *nstest.Topo, up *nstest.Upstream, proxyAddr string, user *url.Userinfo) string {
	t.Helper()
	requireTool(t, "curl", "curl")
	args := []string{"-x", "http://" + proxyAddr, up.HTTPURL}
	if user != nil {
		args = append([]string{"--proxy-user", user.String()}, args...)
	}
	code, _, err := tp.Router.CurlStatus(args...)
	require.NoError(t, err)
	return code
}

// stopClean sends SIGTERM, which is how systemd stops the unit, and checks
// that egressd exits 0 having removed every address it added.
func stopClean(t *testing.T, tp *nstest.Topo, ed *nstest.Process, before []string) {
	t.Helper()
	require.NoError(t, ed.Signal(syscall.SIGTERM))
	assert.Equal(t, 0, ed.Wait(t), "exit status; stderr:\n%s", ed.Stderr())
	assert.Equal(t, before, hostAddrs(t, tp), "addresses on H's link after the stop")
}

// hostAddrs is the sorted "addr/len" list of the addresses on H's link.
func hostAddrs(t *testing.T, tp *nstest.Topo) []string {
	t.Helper()
	addrs, err := tp.HostAddrs()
	require.NoError(t, err)
	var s []string
	for _, a := range addrs {
		s = append(s, a.IPNet.String())
	}
	slices.Sort(s)
	return s
}

// TestUnitRunsExampleConfig: the unit's ExecStart, with its -config pointing
// at the example config, starts egressd as the unit's unprivileged user in
// the namespace topology (the example leaves interface and prefix to the
// default route, which H has): as shipped, and with its bridge lines taken
// in (see bridgeLines). Every listener proxies, every request leaves from a
// fresh address, the example's limit rule applies to its host, and SIGTERM
// leaves no address behind. With the bridge lines a client on the bridge's
// network (R) needs the auth file's credentials: 407 without, 200 with.
func TestUnitRunsExampleConfig(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name      string
		bridge    bool // take in the bridge lines
		listening []string
	}{
		{"as shipped", false, []string{"127.0.0.1:3128", "[::1]:3128"}},
		{"bridge lines taken in", true, []string{"127.0.0.1:3128", "[::1]:3128", bridgeListen}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tp, up := topology(t)
			// The example paces aur.archlinux.org; inside H that name is the upstream.
			hosts, err := os.OpenFile(filepath.Join("/etc/netns", tp.Host.Name, "hosts"), os.O_APPEND|os.O_WRONLY, 0)
			require.NoError(t, err)
			_, err = fmt.Fprintf(hosts, "%s aur.archlinux.org\n", nstest.UpstreamAddr)
			require.NoError(t, errors.Join(err, hosts.Close()))
			before := hostAddrs(t, tp)

			dir := runDir(t)
			example, err := os.ReadFile(exampleFile)
			require.NoError(t, err)
			var user *url.Userinfo // nil: no auth file
			if tt.bridge {
				user = url.UserPassword("alice", "bridge-Pa55")
				auth := filepath.Join(dir, "htpasswd")
				writeAuthFile(t, auth, user)
				example = []byte(bridgeLines(t, string(example), auth))
				t.Logf("the example with its bridge lines:\n%s", example)
			}
			config := filepath.Join(dir, "egressd.yaml")
			require.NoError(t, os.WriteFile(config, example, 0o644))
			_, args := readUnit(t, unitFile).execStart(t)
			i := slices.Index(args, "-config")
			require.GreaterOrEqual(t, i, 0, "ExecStart has no -config")
			args[i+1] = config

			// Without the unit's one capability it refuses to start, in one line.
			noCaps := startAsService(t, tp, dir, false, args...)
			assert.Equal(t, 1, noCaps.Wait(t))
			assert.Equal(t, 1, strings.Count(noCaps.Stderr(), "\n"), "%s", noCaps.Stderr())
			assert.Contains(t, noCaps.Stderr(), "CAP_NET_ADMIN")

			ed := startAsService(t, tp, dir, true, args...)
			listening := ed.WaitListening(t, len(tt.listening))
			assertServicePrivileges(t, ed)
			assert.ElementsMatch(t, tt.listening, listening)
			for _, addr := range listening {
				fetchFresh(t, tp, up, addr, user, "http://aur.archlinux.org/", up.HTTPSURL)
			}
			peers := up.Peers()
			n := 2 * len(listening)
			assert.Len(t, peers, n)
			assert.Len(t, slices.Compact(slices.SortedFunc(slices.Values(peers), netip.Addr.Compare)), n, "%d distinct egress addresses: %v", n, peers)

			aur := nstest.UpstreamStats(t, ctlStats(t, tp, ed.Admin), "aur.archlinux.org")
			assert.Equal(t, "aur.archlinux.org", aur.Rule, "the example's limit rule applies")
			assert.Equal(t, uint64(len(listening)), aur.Requests)

			if tt.bridge {
				assert.Equal(t, "407", curlFromR(t, tp, up, bridgeListen, nil), "from the bridge's network without credentials")
				assert.Equal(t, "200", curlFromR(t, tp, up, bridgeListen, user), "from the bridge's network with credentials")
			}
			stopClean(t, tp, ed, before)
		})
	}
}

// bridgeListen is where egressd listens on the "bridge" in the tests: H's
// IPv4 address on its link to R, whose /24 stands for the containers'
// network.
var bridgeListen = net.JoinHostPort(nstest.HostAddr4.String(), "3128")

// bridgeLines takes in the example config's commented-out bridge lines as a
// user does: listen (replacing the listen line in force), allow and
// auth-file, with the topology's addresses for the example's: H's IPv4 link
// address for the bridge's 10.0.5.1, its /24 for 10.0.5.0/24, and authFile
// for /etc/egressd/htpasswd.
func bridgeLines(t *testing.T, example, authFile string) string {
	t.Helper()
	var b strings.Builder
	taken := map[string]int{}
	for line := range strings.Lines(example) {
		if strings.HasPrefix(line, "listen: ") {
			line = "# " + line // replaced by the bridge's
		} else {
			for _, key := range []string{"listen", "allow", "auth-file"} {
				if rest, ok := strings.CutPrefix(line, "# "+key+": "); ok {
					line = key + ": " + rest
					taken[key]++
				}
			}
		}
		b.WriteString(line)
	}
	assert.Equal(t, map[string]int{"listen": 1, "allow": 1, "auth-file": 1}, taken, "the example's bridge lines")
	s := b.String()
	link := netip.PrefixFrom(nstest.HostAddr4, 24).Masked()
	for _, r := range []struct{ example, here string }{
		{"10.0.5.1:3128", bridgeListen},
		{"10.0.5.0/24", link.String()},
		{"/etc/egressd/htpasswd", authFile},
	} {
		require.Contains(t, s, r.example, "the example's bridge lines changed: adapt this test")
		s = strings.ReplaceAll(s, r.example, r.here)
	}
	return s
}

// TestNixConfigRuns: the config file the NixOS module writes (settings.nix
// evaluated by Nix and serialised with builtins.toJSON, byte for byte) is
// what egressd runs with, started as the module's ExecStart does
// (-config FILE) with the unit's privileges: its interface, prefix, mode,
// listen, allow, authFile, limits and free-form settings all take effect,
// the auth file readable through the egressd group as the module says.
//
// Then a reload of a config with every key changed (but admin, which the
// command line sets) applies exactly the keys of reloadable.nix, the ones
// the module reloads for rather than restarts, and names every other key
// as needing a restart; the new allow list, users, limit rule and grace
// period take effect.
func TestNixConfigRuns(t *testing.T) {
	t.Parallel()
	tp, up := topology(t)
	before := hostAddrs(t, tp)

	const loopback = "127.0.0.1:3129" // not egressd's default, so the setting shows
	dir := runDir(t)
	alice := url.UserPassword("alice", "nix-Pa55")
	writeAuthFile(t, filepath.Join(dir, "alice.htpasswd"), alice)
	config := filepath.Join(dir, "egressd.json")
	writeNixConfig(t, config, fmt.Sprintf(`interface = %q; prefix = %q; mode = "onlink"; listen = [ %q %q ];
		allow = [ "127.0.0.0/8" %q ]; limits = [ "%s=100r/s,burst=10" ]; authFile = %q;
		settings = { max-addrs = 16; ready = 2; rotate = "connection"; grace = "5s"; };`,
		tp.HostLink, nstest.Prefix, loopback, bridgeListen, netip.PrefixFrom(nstest.HostAddr4, 24).Masked(),
		nstest.UpstreamName, filepath.Join(dir, "alice.htpasswd")))

	ed := startAsService(t, tp, dir, true, "-config", config)
	assert.ElementsMatch(t, []string{loopback, bridgeListen}, ed.WaitListening(t, 2))
	assertServicePrivileges(t, ed)
	ready := ed.Log("egressd ready")
	require.Len(t, ready, 1)
	assert.Equal(t, tp.HostLink, ready[0]["interface"])
	assert.Equal(t, nstest.Prefix.String(), ready[0]["prefix"])
	assert.Equal(t, "onlink", ready[0]["mode"])
	assert.Equal(t, "16", ready[0]["max_addrs"])
	assert.Equal(t, "connection", ready[0]["rotate"])

	fetchFresh(t, tp, up, loopback, alice, up.HTTPURL, up.HTTPSURL)
	fetchFresh(t, tp, up, bridgeListen, alice, up.HTTPURL)
	u := nstest.UpstreamStats(t, ctlStats(t, tp, ed.Admin), nstest.UpstreamName)
	assert.Equal(t, nstest.UpstreamName, u.Rule, "the limit rule applies")
	assert.Equal(t, uint64(3), u.Requests)
	assert.Equal(t, "407", curlFromR(t, tp, up, bridgeListen, nil), "from R without credentials")
	assert.Equal(t, "200", curlFromR(t, tp, up, bridgeListen, alice), "from R with credentials")

	// The reload: every key changed. Listening and the addresses stay as
	// they were; allow, the users, the limit and grace change.
	bob := url.UserPassword("bob", "nix-Pa55-2")
	writeAuthFile(t, filepath.Join(dir, "bob.htpasswd"), bob)
	next := writeNixConfig(t, config, fmt.Sprintf(`interface = "egt-other"; prefix = "2001:db8:1:3::/64"; mode = "routed";
		listen = [ "127.0.0.1:3130" ]; allow = [ "127.0.0.0/8" ]; limits = [ "%s=1r/h,burst=1,wait=1s" ]; authFile = %q;
		settings = { max-addrs = 32; ready = 3; rotate = "session"; grace = "6s"; log-level = "debug";
			dial-timeout = "9s"; ipv4 = "deny"; pin = [ "2001:db8:1:2::99" ]; session-idle = "9m";
			socks5 = "127.0.0.1:1081"; tunnel-idle = "4m"; allow-dest = [ "10.0.9.0/24" ];
			connect-ports = [ 443 8443 ]; http-ports = "80,8080"; max-conns = 500;
			max-conns-per-client = 50; max-addrs-per-client = 8; client-timeout = "20s";
			new-addrs = "2r/s,burst=20"; neigh-window = "90s"; limit-store = "redis://[2001:db8::6379]:6379/0";
			rotate-on = "403,429"; };`,
		nstest.UpstreamName, filepath.Join(dir, "bob.htpasswd")))
	var keys map[string]any
	require.NoError(t, json.Unmarshal([]byte(next), &keys))
	every := slices.DeleteFunc(egressdFlags(t), func(f string) bool { return f == "config" || f == "admin" })
	require.ElementsMatch(t, every, slices.Collect(maps.Keys(keys)), "the reload config sets every key of egressd -h but config and admin")

	out, err := tp.Host.Output(nstest.Binary(t, "./cmd/egressctl"), "-admin", ed.Admin, "reload")
	require.NoError(t, err)
	m := reloadedLine.FindStringSubmatch(out)
	require.NotNil(t, m, "egressctl reload printed %q", out)
	reloadable := reloadableKeys(t)
	assert.ElementsMatch(t, reloadable, strings.Split(m[1], ", "), "what the reload applied, against %s", reloadableNix)
	assert.ElementsMatch(t, slices.DeleteFunc(every, func(k string) bool { return slices.Contains(reloadable, k) }),
		strings.Split(m[2], ", "), "what needs a restart")

	assert.Equal(t, "403", curlFromR(t, tp, up, bridgeListen, alice), "R, no longer allowed")
	code, _, err := tp.Host.CurlStatus("--proxy-user", alice.String(), "-x", "http://"+loopback, up.HTTPURL)
	require.NoError(t, err)
	assert.Equal(t, "407", code, "alice, no longer a user")
	fetchFresh(t, tp, up, loopback, bob, up.HTTPURL) // the new rule's one token
	code, _, err = tp.Host.CurlStatus("--proxy-user", bob.String(), "-x", "http://"+loopback, up.HTTPURL)
	require.NoError(t, err)
	assert.Equal(t, "429", code, "the new limit rule")
	assert.Equal(t, uint64(1), nstest.UpstreamStats(t, ctlStats(t, tp, ed.Admin), nstest.UpstreamName).Rejected)

	stopClean(t, tp, ed, before)
	stopping := ed.Log("shutting down")
	require.Len(t, stopping, 1)
	assert.Equal(t, "6s", stopping[0]["grace"], "the reloaded grace period")
}

// reloadedLine is what egressctl reload prints when keys that a reload
// applies and keys that need a restart both changed.
var reloadedLine = regexp.MustCompile(`^reloaded: (.+) changed; restart to apply (.+) \(the running values stay\)\n$`)

// writeNixConfig writes the config file the NixOS module makes of args (see
// nixConfigFile) at path, and returns its content.
func writeNixConfig(t *testing.T, path, args string) string {
	t.Helper()
	content := nixConfigFile(t, args)
	t.Logf("%s: %s", path, content)
	require.NoError(t, os.WriteFile(path, []byte(content), 0o644))
	return content
}
