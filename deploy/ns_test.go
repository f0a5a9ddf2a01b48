package deploy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
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

// runDir makes a directory owned by serviceUID, for egressd's config file
// and admin socket, and removes it in t.Cleanup.
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
// no_new_privs. Its admin socket is in dir. (The rest of the unit's sandbox
// needs systemd itself, which this machine does not run; systemd-analyze
// checks it.) With caps false it has no capability at all.
func startAsService(t *testing.T, tp *nstest.Topo, dir string, caps bool, args ...string) *nstest.Process {
	t.Helper()
	setpriv := requireTool(t, "setpriv", "util-linux")
	uid := strconv.Itoa(serviceUID)
	set := "-all"
	if caps {
		set = "-all,+net_admin"
	}
	admin := filepath.Join(dir, "admin.sock")
	p := tp.Host.Start(t, nil, setpriv, slices.Concat([]string{
		"--reuid", uid, "--regid", uid, "--clear-groups",
		"--inh-caps=" + set, "--ambient-caps=" + set, "--bounding-set=" + set,
		"--no-new-privs", "--", binary(t, "./cmd/egressd"),
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
// from H and checks that each got 200 from a fresh address of the prefix.
func fetchFresh(t *testing.T, tp *nstest.Topo, up *nstest.Upstream, proxyAddr string, urls ...string) {
	t.Helper()
	c := tp.Host.NewClient(t, proxyAddr, up.RootCAs, false)
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

// ctlStats runs `egressctl -admin SOCKET stats -json` in H and decodes it.
func ctlStats(t *testing.T, tp *nstest.Topo, admin string) stats.Stats {
	t.Helper()
	out, err := tp.Host.Output(binary(t, "./cmd/egressctl"), "-admin", admin, "stats", "-json")
	require.NoError(t, err, out)
	var s stats.Stats
	require.NoError(t, json.Unmarshal([]byte(out), &s), out)
	return s
}

func upstreamStats(t *testing.T, s stats.Stats, name string) stats.UpstreamStats {
	t.Helper()
	for _, u := range s.Upstreams {
		if u.Upstream == name {
			return u
		}
	}
	t.Fatalf("no upstream %q in %+v", name, s.Upstreams)
	return stats.UpstreamStats{}
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
// at the example config unchanged, starts egressd as the unit's unprivileged
// user in the namespace topology (the example leaves interface and prefix to
// the default route, which H has). Both loopback listeners proxy, every
// request leaves from a fresh address, the example's limit rule applies to
// its host, and SIGTERM leaves no address behind.
func TestUnitRunsExampleConfig(t *testing.T) {
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
	listening := ed.WaitListening(t, 2)
	assertServicePrivileges(t, ed)
	assert.ElementsMatch(t, []string{"127.0.0.1:3128", "[::1]:3128"}, listening)
	for _, addr := range listening {
		fetchFresh(t, tp, up, addr, "http://aur.archlinux.org/", up.HTTPSURL)
	}
	peers := up.Peers()
	assert.Len(t, peers, 4)
	assert.Len(t, slices.Compact(slices.SortedFunc(slices.Values(peers), netip.Addr.Compare)), 4, "four distinct egress addresses: %v", peers)

	aur := upstreamStats(t, ctlStats(t, tp, ed.Admin), "aur.archlinux.org")
	assert.Equal(t, "aur.archlinux.org", aur.Rule, "the example's limit rule applies")
	assert.Equal(t, uint64(2), aur.Requests)

	stopClean(t, tp, ed, before)
}

// TestNixConfigRuns: the config file the NixOS module writes (settings.nix
// evaluated by Nix and serialised with builtins.toJSON, byte for byte) is
// what egressd runs with, started as the module's ExecStart does
// (-config FILE) with the unit's privileges: its interface, prefix, mode,
// listen, limit and free-form settings all take effect.
func TestNixConfigRuns(t *testing.T) {
	t.Parallel()
	tp, up := topology(t)
	before := hostAddrs(t, tp)

	const listen = "127.0.0.1:3129" // not egressd's default, so the setting shows
	dir := runDir(t)
	config := filepath.Join(dir, "egressd.json")
	content := nixConfigFile(t, fmt.Sprintf(`interface = %q; prefix = %q; mode = "onlink"; listen = [ %q ];
		allow = [ ]; limits = [ "%s=100r/s,burst=10" ]; authFile = null;
		settings = { max-addrs = 16; ready = 2; rotate = "connection"; grace = "5s"; };`,
		tp.HostLink, nstest.Prefix, listen, nstest.UpstreamName))
	t.Logf("%s: %s", config, content)
	require.NoError(t, os.WriteFile(config, []byte(content), 0o644))

	ed := startAsService(t, tp, dir, true, "-config", config)
	assert.Equal(t, []string{listen}, ed.WaitListening(t, 1))
	assertServicePrivileges(t, ed)
	ready := ed.Log("egressd ready")
	require.Len(t, ready, 1)
	assert.Equal(t, tp.HostLink, ready[0]["interface"])
	assert.Equal(t, nstest.Prefix.String(), ready[0]["prefix"])
	assert.Equal(t, "onlink", ready[0]["mode"])
	assert.Equal(t, "16", ready[0]["max_addrs"])
	assert.Equal(t, "connection", ready[0]["rotate"])

	fetchFresh(t, tp, up, listen, up.HTTPURL, up.HTTPSURL, up.HTTPURL)
	u := upstreamStats(t, ctlStats(t, tp, ed.Admin), nstest.UpstreamName)
	assert.Equal(t, nstest.UpstreamName, u.Rule, "the limit rule applies")
	assert.Equal(t, uint64(3), u.Requests)

	stopClean(t, tp, ed, before)
}
