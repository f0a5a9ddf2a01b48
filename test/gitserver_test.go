package test

import (
	"net/http"
	"net/http/cgi"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/echo"
	"github.com/egressd/egressd/test/nstest"
)

// gitServer serves bare repositories over git's smart HTTP protocol
// (git http-backend behind net/http/cgi) at https://upstream.test/git/NAME.git,
// the way the AUR serves https://aur.archlinux.org/NAME.git, and records when
// each request arrived and from where, by the upstream's own clock.
type gitServer struct {
	root string // GIT_PROJECT_ROOT

	mu   sync.Mutex
	hits []gitHit
}

type gitHit struct {
	at   time.Time
	peer netip.Addr
}

// startGitServer mounts the git server on the upstream under /git/.
func startGitServer(t testing.TB, up *nstest.Upstream) *gitServer {
	t.Helper()
	execPath, err := exec.Command("git", "--exec-path").Output()
	require.NoError(t, err, "git --exec-path")
	g := &gitServer{root: t.TempDir()}
	backend := &cgi.Handler{
		Path: filepath.Join(strings.TrimSpace(string(execPath)), "git-http-backend"),
		Root: "/git",
		Env: []string{
			"GIT_PROJECT_ROOT=" + g.root,
			"GIT_HTTP_EXPORT_ALL=1",
			"GIT_CONFIG_NOSYSTEM=1",
			"HOME=" + g.root,
		},
		InheritEnv: []string{"PATH"},
	}
	up.Handle("/git/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if peer, err := echo.PeerAddr(r); err == nil {
			g.mu.Lock()
			g.hits = append(g.hits, gitHit{time.Now(), peer})
			g.mu.Unlock()
		}
		backend.ServeHTTP(w, r)
	}))
	return g
}

// newRepo makes the bare repository NAME.git with one commit holding files
// and returns the commit's id.
func (g *gitServer) newRepo(t testing.TB, name string, files map[string]string) string {
	t.Helper()
	work := t.TempDir()
	git := func(args ...string) string {
		t.Helper()
		cmd := exec.Command("git", args...)
		cmd.Env = append(nstest.CleanEnv(), "GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null", "HOME="+work,
			"GIT_AUTHOR_NAME=egressd", "GIT_AUTHOR_EMAIL=test@egressd.invalid",
			"GIT_COMMITTER_NAME=egressd", "GIT_COMMITTER_EMAIL=test@egressd.invalid")
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "git %s: %s", strings.Join(args, " "), out)
		return strings.TrimSpace(string(out))
	}
	src := filepath.Join(work, name)
	git("init", "-q", "-b", "master", src)
	for f, content := range files {
		require.NoError(t, os.WriteFile(filepath.Join(src, f), []byte(content), 0o644))
	}
	git("-C", src, "add", ".")
	git("-C", src, "commit", "-q", "-m", "import")
	git("clone", "-q", "--bare", src, filepath.Join(g.root, name+".git"))
	return git("-C", src, "rev-parse", "HEAD")
}

// clone runs `git clone URL DIR` in H with env added to a clean environment
// (no system or global git config unless env names one, the upstream's CA
// trusted) and returns its output.
func (g *gitServer) clone(e *env, env []string, url, dir string) (string, error) {
	return g.cloneIn(e.tp.Host, e, env, url, dir)
}

// cloneIn is clone in the namespace ns.
func (g *gitServer) cloneIn(ns *nstest.NS, e *env, env []string, url, dir string) (string, error) {
	base := []string{
		"HOME=" + filepath.Dir(dir),
		"GIT_CONFIG_NOSYSTEM=1",
		"GIT_CONFIG_GLOBAL=/dev/null",
		"GIT_TERMINAL_PROMPT=0",
		"GIT_SSL_CAINFO=" + e.up.CAFile,
	}
	// Later entries win: env may name its own GIT_CONFIG_GLOBAL.
	return ns.OutputEnv(append(base, env...), "git", "clone", "-q", url, dir)
}

// hitList returns the recorded requests in arrival order.
func (g *gitServer) hitList() []gitHit {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.hits)
}

func (g *gitServer) reset() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.hits = nil
}

// gitHead is the commit checked out in the clone at dir.
func gitHead(t testing.TB, dir string) string {
	t.Helper()
	cmd := exec.Command("git", "-C", dir, "rev-parse", "HEAD")
	cmd.Env = append(nstest.CleanEnv(), "GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "git rev-parse in %s: %s", dir, out)
	return strings.TrimSpace(string(out))
}
