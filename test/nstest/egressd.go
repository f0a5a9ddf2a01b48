package nstest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/egressd/egressd/proxy/stats"
)

// Build compiles the package pkg of the module that contains the working
// directory (e.g. "./cmd/egressd") into dir and returns the binary's path.
// It builds as `make build` does, static (CGO_ENABLED=0), so that the tests
// run what users run.
func Build(dir, pkg string) (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", bin, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %w\n%s", pkg, err, out)
	}
	return bin, nil
}

// ModuleRoot is the directory of the go.mod of the module that contains the
// working directory: the repository's root.
func ModuleRoot() (string, error) {
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	return filepath.Dir(strings.TrimSpace(string(gomod))), nil
}

// binaries are the programs Main built, by package, for Binary.
var binaries map[string]built

// built is the outcome of building one package.
type built struct {
	path string
	err  error
}

// Main is a TestMain that builds each of pkgs (as Build takes them) once,
// runs the tests and removes the binaries; it returns the exit code for
// os.Exit. The binaries go to a new temporary directory that every user may
// enter, so that they can also run as an unprivileged user. A package that
// does not build fails only the tests that ask Binary for it.
func Main(m *testing.M, pkgs ...string) int {
	dir, err := os.MkdirTemp("", "egressd-bin-")
	if err == nil {
		defer os.RemoveAll(dir)
		err = os.Chmod(dir, 0o755)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "nstest:", err)
		return 1
	}
	binaries = make(map[string]built, len(pkgs))
	for _, pkg := range pkgs {
		path, err := Build(dir, pkg)
		binaries[pkg] = built{path, err}
	}
	return m.Run()
}

// Binary returns the path of pkg's binary built by Main, failing the test if
// it did not build or Main was not asked for it.
func Binary(t testing.TB, pkg string) string {
	t.Helper()
	bin, ok := binaries[pkg]
	switch {
	case !ok:
		t.Fatalf("%s is not among the binaries TestMain builds (nstest.Main)", pkg)
	case bin.err != nil:
		t.Fatalf("%s did not build: %v", pkg, bin.err)
	}
	return bin.path
}

// HTPasswd writes an auth file for egressd's -auth-file at path with
// Apache's htpasswd -B (bcrypt), as users make one: users maps each name to
// its password. It fails the test if htpasswd is missing (Debian package
// apache2-utils) or fails.
func HTPasswd(t testing.TB, path string, users map[string]string) {
	t.Helper()
	bin, err := exec.LookPath("htpasswd")
	if err != nil {
		t.Fatalf("htpasswd is needed (Debian package apache2-utils): %v", err)
	}
	for i, name := range slices.Sorted(maps.Keys(users)) {
		args := []string{"-B", "-b", path, name, users[name]}
		if i == 0 {
			args = append([]string{"-c"}, args...) // a new file
		}
		if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
			t.Fatalf("htpasswd %s: %v: %s", strings.Join(args[:len(args)-1], " "), err, bytes.TrimSpace(out))
		}
	}
}

// CtlStats runs `egressctl -admin ADMIN stats -json` in ns, with the
// egressctl binary at egressctl, and decodes what it prints.
func (ns *NS) CtlStats(t testing.TB, egressctl, admin string) stats.Stats {
	t.Helper()
	out, err := ns.Output(egressctl, "-admin", admin, "stats", "-json")
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	var s stats.Stats
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("decoding egressctl stats -json: %v: %s", err, out)
	}
	return s
}

// UpstreamStats returns the entry of the upstream host name in s, failing
// the test if there is none.
func UpstreamStats(t testing.TB, s stats.Stats, name string) stats.UpstreamStats {
	t.Helper()
	for _, u := range s.Upstreams {
		if u.Upstream == name {
			return u
		}
	}
	t.Fatalf("no upstream %q in %+v", name, s.Upstreams)
	return stats.UpstreamStats{}
}

// Process is a program running in the background inside a namespace, egressd
// or a helper. Its standard output and standard error are kept for
// assertions.
type Process struct {
	// Pid is the program's own pid (`ip netns exec` execs in place).
	Pid int
	// Admin is egressd's admin socket, when StartEgressd chose it.
	Admin string

	cmd            *exec.Cmd
	stdout, stderr SyncBuffer
	done           chan struct{}
	state          *os.ProcessState
}

// Start starts name inside the namespace in the background. In t.Cleanup it
// is killed by its pid (SIGKILL) if it still runs, and its output goes to the
// test log if the test failed.
func (ns *NS) Start(t testing.TB, env []string, name string, args ...string) *Process {
	t.Helper()
	p := &Process{done: make(chan struct{})}
	p.cmd = ns.Command(context.Background(), name, args...)
	p.cmd.Env = append(p.cmd.Env, env...)
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting %s in %s: %v", name, ns.Name, err)
	}
	p.Pid = p.cmd.Process.Pid
	go func() {
		p.cmd.Wait()
		p.state = p.cmd.ProcessState
		close(p.done)
	}()
	t.Cleanup(func() {
		if !p.Exited() {
			syscall.Kill(p.Pid, syscall.SIGKILL)
			select {
			case <-p.done:
			case <-time.After(Guard):
				t.Errorf("%s (pid %d) did not die after SIGKILL", name, p.Pid)
			}
		}
		if t.Failed() {
			t.Logf("%s %s (pid %d) stderr:\n%s", name, strings.Join(args, " "), p.Pid, p.Stderr())
		}
	})
	return p
}

// StartEgressd starts the egressd binary bin in H with args. Unless args
// give -admin, the admin API listens on a socket in a directory of the
// test's own (Process.Admin), never on the machine's /run/egressd.
func (tp *Topo) StartEgressd(t testing.TB, bin string, args ...string) *Process {
	t.Helper()
	return tp.Host.StartEgressd(t, bin, args...)
}

// StartEgressd is Topo.StartEgressd in the namespace ns.
func (ns *NS) StartEgressd(t testing.TB, bin string, args ...string) *Process {
	t.Helper()
	admin := ""
	if !slices.Contains(args, "-admin") {
		admin = filepath.Join(t.TempDir(), "admin.sock")
		args = append([]string{"-admin", admin}, args...)
	}
	p := ns.Start(t, nil, bin, args...)
	p.Admin = admin
	return p
}

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Done is closed when the process has ended.
func (p *Process) Done() <-chan struct{} { return p.done }

// Signal sends sig to the process by its pid.
func (p *Process) Signal(sig syscall.Signal) error {
	return syscall.Kill(p.Pid, sig)
}

// Wait waits, at most Guard, for the process to end and returns its exit
// status, or -1 if a signal ended it. It fails the test if the process does
// not end.
func (p *Process) Wait(t testing.TB) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(Guard):
		t.Fatalf("pid %d still running after %v; stderr:\n%s", p.Pid, Guard, p.Stderr())
	}
	return p.state.ExitCode()
}

// Stdout and Stderr return what the process wrote so far.
func (p *Process) Stdout() string { return p.stdout.String() }
func (p *Process) Stderr() string { return p.stderr.String() }

// WaitListening waits until the process (egressd, or echo-upstream) has logged
// `msg=listening` n times and returns the listening addresses. It fails the
// test if the process exits first
// or takes longer than Guard.
func (p *Process) WaitListening(t testing.TB, n int) []string {
	t.Helper()
	deadline := time.Now().Add(Guard)
	for {
		var addrs []string
		for _, l := range p.Log("listening") {
			addrs = append(addrs, l["addr"])
		}
		if len(addrs) >= n {
			return addrs
		}
		if p.Exited() {
			t.Fatalf("pid %d exited with status %d before listening; stderr:\n%s", p.Pid, p.state.ExitCode(), p.Stderr())
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d not listening after %v; stderr:\n%s", p.Pid, Guard, p.Stderr())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Log returns the records of standard error (log/slog text format) whose msg
// is msg, each as its key=value pairs.
func (p *Process) Log(msg string) []map[string]string {
	var recs []map[string]string
	for line := range strings.Lines(p.Stderr()) {
		rec := ParseLogLine(line)
		if rec["msg"] == msg {
			recs = append(recs, rec)
		}
	}
	return recs
}

// ParseLogLine splits a log/slog text line into its key=value pairs. Quoted
// values are unquoted.
func ParseLogLine(line string) map[string]string {
	rec := map[string]string{}
	s := strings.TrimSpace(line)
	for s != "" {
		key, rest, ok := strings.Cut(s, "=")
		if !ok || strings.ContainsAny(key, " \"") {
			break
		}
		var val string
		if strings.HasPrefix(rest, `"`) {
			q, err := strconv.QuotedPrefix(rest)
			if err != nil {
				break
			}
			val, _ = strconv.Unquote(q)
			rest = rest[len(q):]
		} else {
			val, rest, _ = strings.Cut(rest, " ")
		}
		rec[key] = val
		s = strings.TrimLeft(rest, " ")
	}
	return rec
}

// SyncBuffer is a buffer that goroutines may write at once: a process's
// output, or an in-process logger's.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
