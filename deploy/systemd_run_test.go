package deploy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

// manager is a systemd system manager running as PID 1 of its own PID,
// mount, cgroup, UTS and IPC namespaces, inside a test's network namespace.
// It sees only the units of the test, and nothing it does reaches the
// machine: /run, /tmp and /var/tmp are its own, /proc/sys is read-only to
// it (so that it cannot raise fs.file-max and the like), its cgroup tree is a
// new child of the test's own cgroup, and its log goes to a file.
type manager struct {
	pid  int    // systemd, as the machine sees it
	root string // its file system view: /proc/PID/root
}

// The manager's inner script, run by bash as PID 1 of the new namespaces
// before it execs systemd. $EGT_DIR holds units/ and the files to serve
// from /run/egtest.
const managerScript = `set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/egtest
cp -a "$EGT_DIR"/. /run/egtest/
mount --bind "$EGT_LOG" /dev/kmsg
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mount -t proc proc /proc
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
for f in hosts resolv.conf; do mount --bind "/etc/netns/$EGT_NS/$f" "/etc/$f"; done
exec env -i container=egressd-test SYSTEMD_UNIT_PATH=/run/egtest/units "$EGT_SYSTEMD" --system --unit=egtest.target --log-target=kmsg --log-level=info
`

// startManager starts systemd in tp's host namespace with the units in
// units (file name to content) and the files in files (copied to
// /run/egtest, with their modes), and stops it in t.Cleanup.
func startManager(t *testing.T, tp *nstest.Topo, units map[string]string, files map[string]string) *manager {
	t.Helper()
	systemd := ""
	for _, p := range []string{"/lib/systemd/systemd", "/usr/lib/systemd/systemd"} {
		if _, err := os.Stat(p); err == nil {
			systemd = p
			break
		}
	}
	if systemd == "" {
		requireTool(t, "/lib/systemd/systemd", "systemd")
	}
	requireTool(t, "unshare", "util-linux")
	requireTool(t, "nsenter", "util-linux")

	dir := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(dir, "units"), 0o755))
	for name, content := range units { // a name may be a drop-in: "x.service.d/y.conf"
		path := filepath.Join(dir, "units", name)
		require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
		require.NoError(t, os.WriteFile(path, []byte(content), 0o644))
	}
	for name, src := range files {
		data, err := os.ReadFile(src)
		require.NoError(t, err)
		info, err := os.Stat(src)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), data, info.Mode().Perm()|0o444))
	}
	logFile := filepath.Join(t.TempDir(), "systemd.log")
	require.NoError(t, os.WriteFile(logFile, nil, 0o644))

	cg := newCgroup(t)
	outer := `set -e; echo $$ > "$EGT_CGROUP/cgroup.procs"
exec nsenter --net="/run/netns/$EGT_NS" -- unshare --pid --mount --cgroup --uts --ipc --fork --propagation private -- bash -c "$EGT_SCRIPT"`
	cmd := exec.Command("bash", "-c", outer)
	cmd.Env = append(nstest.CleanEnv(),
		"EGT_CGROUP="+cg, "EGT_NS="+tp.Host.Name, "EGT_DIR="+dir, "EGT_LOG="+logFile,
		"EGT_SYSTEMD="+systemd, "EGT_SCRIPT="+managerScript)
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	require.NoError(t, cmd.Start())
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()

	m := &manager{}
	t.Cleanup(func() {
		var egressdOut string
		if m.pid > 0 {
			// A clean stop first, so that egressd removes its addresses.
			m.systemctl(t, "stop", "egtest.target", "egressd.service")
			egressdOut = m.file(t, "/run/egtest/out")
			syscall.Kill(m.pid, syscall.SIGKILL) // PID 1 of its namespace: all in it die
		}
		cmd.Process.Kill() // unshare, which waits for it
		select {
		case <-exited:
		case <-time.After(nstest.Guard):
			t.Errorf("unshare (pid %d) did not end", cmd.Process.Pid)
			return
		}
		if t.Failed() {
			out, _ := os.ReadFile(logFile)
			t.Logf("systemd's log:\n%s\nunshare: %s\negressd's output:\n%s", out, stderr.String(), egressdOut)
		}
	})

	// unshare --fork: systemd is its only child.
	deadline := time.Now().Add(nstest.Guard)
	for m.pid == 0 {
		children, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", cmd.Process.Pid, cmd.Process.Pid))
		if f := strings.Fields(string(children)); len(f) == 1 {
			if exe, _ := os.Readlink("/proc/" + f[0] + "/exe"); exe == systemd || strings.HasSuffix(exe, "/systemd") {
				m.pid, _ = strconv.Atoi(f[0])
			}
		}
		select {
		case <-exited:
			t.Fatal("systemd did not start") // the cleanup logs why
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("systemd did not start after %v", nstest.Guard)
		}
		time.Sleep(20 * time.Millisecond)
	}
	m.root = fmt.Sprintf("/proc/%d/root", m.pid)
	nstest.WaitFor(t, "the manager to answer", func() bool {
		_, err := m.systemctlErr("is-active", "egtest.target")
		return err == nil
	})
	return m
}

// newCgroup makes a child of the test process's own cgroup in the unified
// (v2) hierarchy, for the manager's tree, and removes it, with what the
// manager made in it, in t.Cleanup.
func newCgroup(t *testing.T) string {
	t.Helper()
	mount := ""
	f, err := os.Open("/proc/self/mountinfo")
	require.NoError(t, err)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if ok && strings.HasPrefix(post, "cgroup2 ") {
			mount = strings.Fields(pre)[4]
			break
		}
	}
	f.Close()
	if mount == "" {
		t.Fatal("no cgroup2 file system is mounted: systemd needs the unified hierarchy")
	}
	own, err := os.ReadFile("/proc/self/cgroup")
	require.NoError(t, err)
	path := ""
	for line := range strings.Lines(string(own)) {
		if p, ok := strings.CutPrefix(strings.TrimSpace(line), "0::"); ok {
			path = p
		}
	}
	require.NotEmpty(t, path, "no unified cgroup in /proc/self/cgroup:\n%s", own)
	dir := filepath.Join(mount, path, fmt.Sprintf("egressd-test-%d-%d", os.Getpid(), time.Now().UnixNano()))
	require.NoError(t, os.Mkdir(dir, 0o755))
	t.Cleanup(func() {
		// Depth first; a cgroup whose last process just died may take a
		// moment to become removable.
		deadline := time.Now().Add(nstest.Guard / 4)
		for {
			err := removeCgroupTree(dir)
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("removing cgroup %s: %v", dir, err)
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	return dir
}

func removeCgroupTree(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeCgroupTree(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// systemctlErr runs systemctl against the manager and returns its output.
func (m *manager) systemctlErr(args ...string) (string, error) {
	cmd := exec.Command("nsenter", append([]string{"-t", strconv.Itoa(m.pid), "-m", "-p", "--", "systemctl", "--no-pager"}, args...)...)
	cmd.Env = nstest.CleanEnv()
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// systemctl is systemctlErr that reports a failure to the test.
func (m *manager) systemctl(t testing.TB, args ...string) string {
	t.Helper()
	out, err := m.systemctlErr(args...)
	if err != nil {
		t.Errorf("systemctl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return out
}

// show returns a property of a unit.
func (m *manager) show(t testing.TB, unit, prop string) string {
	t.Helper()
	return m.systemctl(t, "show", "-P", prop, unit)
}

// file reads a file as the manager sees it.
func (m *manager) file(t testing.TB, path string) string {
	t.Helper()
	data, err := os.ReadFile(m.root + path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Errorf("reading %s of the manager: %v", path, err)
	}
	return string(data)
}

// logged returns the lines of egressd's output (the unit's standard error,
// sent to /run/egtest/out) with msg=msg, each as its key=value pairs.
func (m *manager) logged(t testing.TB, msg string) []map[string]string {
	var recs []map[string]string
	for line := range strings.Lines(m.file(t, "/run/egtest/out")) {
		if rec := nstest.ParseLogLine(line); rec["msg"] == msg {
			recs = append(recs, rec)
		}
	}
	return recs
}

// stubTargets are the units the egressd unit names, empty: the manager
// starts nothing but egressd.
var stubTargets = []string{"sysinit.target", "basic.target", "shutdown.target", "network-online.target", "multi-user.target", "egtest.target"}

// TestUnitUnderSystemd: the unit as shipped (but for where ExecStart finds
// the binary and the config file, and where standard error goes) runs
// egressd under a real systemd with its whole sandbox: the system call
// filter, the dynamic user with CAP_NET_ADMIN alone, ProtectSystem=strict,
// the address families, RuntimeDirectory for the admin socket. It serves
// HTTP and CONNECT from fresh addresses, egressctl reads its stats over the
// admin socket, and the unit is active once egressd sent READY=1. `systemctl
// reload` applies a new limit rule in the same process, which egressctl
// stats shows at work, while a tunnel opened before goes on; the unit is
// active again. `systemctl stop` ends it cleanly with every address removed.
func TestUnitUnderSystemd(t *testing.T) {
	t.Parallel()
	requireTool(t, "curl", "curl")
	tp, up := topology(t)
	before := hostAddrs(t, tp)

	text, err := os.ReadFile(unitFile)
	require.NoError(t, err)
	prog, args := readUnit(t, unitFile).execStart(t)
	unit := strings.Replace(string(text), "ExecStart="+prog+" "+strings.Join(args, " "),
		"ExecStart=/run/egtest/egressd -config /run/egtest/egressd.yaml", 1)
	require.NotEqual(t, string(text), unit, "ExecStart not rewritten")
	units := map[string]string{
		"egressd.service": unit,
		// No journald here: standard error goes to a file.
		"egressd.service.d/out.conf": "[Service]\nStandardOutput=append:/run/egtest/out\nStandardError=append:/run/egtest/out\n",
	}
	for _, name := range stubTargets {
		units[name] = "[Unit]\nDescription=" + name + " (empty)\n"
	}
	m := startManager(t, tp, units, map[string]string{
		"egressd":      nstest.Binary(t, "./cmd/egressd"),
		"egressd.yaml": exampleFile,
	})

	m.systemctl(t, "start", "--no-block", "egressd.service")
	nstest.WaitFor(t, "egressd ready, or its failure", func() bool {
		return len(m.logged(t, "egressd ready")) == 1 || m.show(t, "egressd.service", "NRestarts") != "0"
	})
	require.Len(t, m.logged(t, "egressd ready"), 1, "egressd under systemd did not start (its output follows)")
	// Type=notify: active once egressd sent READY=1.
	nstest.WaitFor(t, "egressd.service active", func() bool { return m.show(t, "egressd.service", "ActiveState") == "active" })

	pid := m.show(t, "egressd.service", "MainPID") // in the manager's PID namespace
	require.NotContains(t, []string{"", "0"}, pid, "egressd's main pid")
	status := procStatus(t, m.root+"/proc/"+pid+"/status")
	assert.NotEqual(t, "0", strings.Fields(status["Uid"])[0], "runs as root")
	for _, set := range []string{"CapEff", "CapPrm", "CapAmb", "CapBnd"} {
		assert.Equal(t, capNetAdmin, status[set], "%s: CAP_NET_ADMIN alone", set)
	}
	assert.Equal(t, "1", status["NoNewPrivs"])
	assert.Equal(t, "2", status["Seccomp"], "a system call filter")

	// The example's loopback listeners, HTTP and CONNECT through each.
	for _, addr := range []string{"127.0.0.1:3128", "[::1]:3128"} {
		fetchFresh(t, tp, up, addr, nil, up.HTTPURL, up.HTTPSURL)
	}
	assert.Len(t, up.Peers(), 4)

	admin := m.root + "/run/egressd/admin.sock"
	info, err := os.Stat(admin)
	require.NoError(t, err, "the admin socket in RuntimeDirectory")
	assert.Equal(t, os.ModeSocket|0o600, info.Mode())
	assert.Equal(t, uint64(4), nstest.UpstreamStats(t, ctlStats(t, tp, admin), nstest.UpstreamName).Requests)

	// A tunnel opened before the reload, to the upstream's plain HTTP: each
	// get sends a request through it and returns the answer, the egress
	// address.
	ctx, cancel := context.WithTimeout(context.Background(), nstest.Guard)
	defer cancel()
	tunnel, resp, err := tp.Host.Connect(ctx, "127.0.0.1:3128", net.JoinHostPort(nstest.UpstreamName, "80"))
	require.NoError(t, err)
	defer tunnel.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	tr := bufio.NewReader(tunnel)
	get := func() string {
		t.Helper()
		require.NoError(t, tunnel.SetDeadline(time.Now().Add(nstest.Guard)))
		req, err := http.NewRequest(http.MethodGet, up.HTTPURL, nil)
		require.NoError(t, err)
		require.NoError(t, req.Write(tunnel))
		resp, err := http.ReadResponse(tr, req)
		require.NoError(t, err)
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
		return string(body)
	}
	egress := get()

	// ExecReload: SIGHUP, RELOADING=1, READY=1; the same process. The
	// config gains a limit rule for the upstream, with one token.
	example, err := os.ReadFile(exampleFile)
	require.NoError(t, err)
	const aurRule = "  - aur.archlinux.org="
	require.Contains(t, string(example), aurRule, "the example's limit list")
	rule := nstest.UpstreamName + "=1r/h,burst=1,wait=1s"
	require.NoError(t, os.WriteFile(m.root+"/run/egtest/egressd.yaml",
		[]byte(strings.Replace(string(example), aurRule, "  - "+rule+"\n"+aurRule, 1)), 0o644))
	m.systemctl(t, "reload", "egressd.service")
	nstest.WaitFor(t, "egressd's reload", func() bool { return len(m.logged(t, "config reloaded")) == 1 })
	assert.Equal(t, "limit", m.logged(t, "config reloaded")[0]["changed"])
	nstest.WaitFor(t, "egressd.service active after the reload", func() bool { return m.show(t, "egressd.service", "ActiveState") == "active" })
	assert.Equal(t, pid, m.show(t, "egressd.service", "MainPID"))
	fetchFresh(t, tp, up, "127.0.0.1:3128", nil, up.HTTPURL) // the new rule's one token
	code, _, err := tp.Host.CurlStatus("-x", "http://127.0.0.1:3128", up.HTTPURL)
	require.NoError(t, err)
	assert.Equal(t, "429", code, "the new rule applies")
	assert.Equal(t, uint64(1), nstest.UpstreamStats(t, ctlStats(t, tp, admin), nstest.UpstreamName).Rejected,
		"egressctl stats counts the new rule's refusal")
	assert.Equal(t, egress, get(), "the tunnel opened before the reload still moves bytes, from its address")
	require.NoError(t, tunnel.Close())

	m.systemctl(t, "stop", "egressd.service")
	assert.Equal(t, "inactive", m.show(t, "egressd.service", "ActiveState"))
	assert.Equal(t, "success", m.show(t, "egressd.service", "Result"))
	assert.Len(t, m.logged(t, "stopped"), 1, "egressd's own clean stop")
	assert.Equal(t, before, hostAddrs(t, tp), "addresses on H's link after the stop")
}
