package test

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"
	"golang.org/x/net/proxy"

	"github.com/egressd/egressd/test/nstest"
)

// The recipes of docs/clients.md, each run through egressd: real clients
// where Debian has them (curl, wget, git, makepkg), and for the others a Go
// client that reads the doc's snippet as the client reads its config and sends
// the same kind of request.

// TestProxyEnvironmentRecipe: the environment block of the builders' recipe,
// with curl, wget, a Go program (http.ProxyFromEnvironment) and git clone.
// HTTPS and plain HTTP go through egressd; a name added to NO_PROXY bypasses
// it, and the recipe's NO_PROXY keeps a local service direct. The doc's table
// of which spelling each client reads is checked row by row.
func TestProxyEnvironmentRecipe(t *testing.T) {
	t.Parallel()
	recipe := parseKeyValues(t, docBlock(t, "env"))
	for _, k := range []string{"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"} {
		require.Contains(t, recipe, k, "the recipe sets %s", k)
	}
	e := start(t)
	local := startLocalService(t, e.tp.Host)
	g := startGitServer(t, e.up)
	commit := g.newRepo(t, "pkg", map[string]string{"PKGBUILD": "pkgname=env\n"})
	fetch := binary(t, "./test/fetch")

	// Each client fetches u with env and returns what it printed: the
	// upstream's answer, except for git, which clones u's repository.
	type client struct {
		name  string
		fetch func(t *testing.T, env []string, u string) string
	}
	program := func(name string, args ...string) func(*testing.T, []string, string) string {
		return func(t *testing.T, env []string, u string) string {
			t.Helper()
			out, err := e.tp.Host.OutputEnv(env, name, append(args, u)...)
			require.NoError(t, err)
			return out
		}
	}
	clients := []client{
		{"curl", program("curl", "-q", "-sS", "-f", "--max-time", "30", "--cacert", e.up.CAFile)},
		{"wget", program("wget", "--no-config", "-q", "-T", "30", "-t", "1", "-O", "-", "--ca-certificate="+e.up.CAFile)},
		{"go", program(fetch, "-cacert", e.up.CAFile)},
		{"git", func(t *testing.T, env []string, u string) string {
			t.Helper()
			dir := filepath.Join(t.TempDir(), "pkg")
			out, err := g.clone(e, env, u+"git/pkg.git", dir)
			require.NoError(t, err, out)
			assert.Equal(t, commit, gitHead(t, dir))
			return ""
		}},
	}
	only := func(keys ...string) []string {
		var env []string
		for _, k := range keys {
			env = append(env, k+"="+recipe[k])
		}
		return env
	}
	all := only("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")
	upstreamBypassed := append(only("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"),
		"NO_PROXY="+recipe["NO_PROXY"]+","+nstest.UpstreamName,
		"no_proxy="+recipe["no_proxy"]+","+nstest.UpstreamName)

	const (
		proxied = "through egressd"
		direct  = "direct"
	)
	every := func(how string) map[string]string {
		return map[string]string{"curl": how, "wget": how, "go": how, "git": how}
	}
	cases := []struct {
		name string
		env  []string
		url  string
		want map[string]string // client name: proxied or direct
	}{
		{"recipe, HTTPS", all, e.up.HTTPSURL, every(proxied)},
		{"recipe, plain HTTP", all, e.up.HTTPURL, every(proxied)},
		{"NO_PROXY names the upstream", upstreamBypassed, e.up.HTTPSURL, every(direct)},
		{"upper case only, HTTPS", only("HTTPS_PROXY"), e.up.HTTPSURL,
			map[string]string{"curl": proxied, "wget": direct, "go": proxied, "git": proxied}},
		{"upper case only, plain HTTP", only("HTTP_PROXY"), e.up.HTTPURL,
			map[string]string{"curl": direct, "wget": direct, "go": proxied, "git": direct}},
		{"upper case only, NO_PROXY", append(only("HTTPS_PROXY", "https_proxy"), "NO_PROXY="+nstest.UpstreamName), e.up.HTTPSURL,
			map[string]string{"curl": direct, "wget": proxied, "go": direct, "git": direct}},
		{"lower case only, HTTPS", only("https_proxy"), e.up.HTTPSURL, every(proxied)},
		{"lower case only, plain HTTP", only("http_proxy"), e.up.HTTPURL, every(proxied)},
		{"lower case only, no_proxy", append(only("https_proxy"), "no_proxy="+nstest.UpstreamName), e.up.HTTPSURL, every(direct)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, cl := range clients {
				e.up.Reset()
				out := cl.fetch(t, c.env, c.url)
				peers := e.up.Peers()
				require.NotEmpty(t, peers, "%s: requests at the upstream", cl.name)
				if cl.name != "git" {
					require.Len(t, peers, 1, "%s: requests at the upstream", cl.name)
					assert.Equal(t, peers, parseBodies(t, out), cl.name)
				}
				if c.want[cl.name] == proxied {
					// A tunnel has one address for all its requests;
					// plain HTTP gets one per request.
					assertFresh(t, distinct(peers), len(distinct(peers)))
				} else {
					for _, p := range peers {
						assert.Equal(t, nstest.HostAddr, p, "%s should have gone direct, from H's own address", cl.name)
					}
				}
			}
		})
	}

	t.Run("recipe, local service", func(t *testing.T) {
		hosts := []string{"localhost", "127.0.0.1"}
		for _, cl := range clients[:3] { // git has no repository there
			for _, host := range hosts {
				before := local.hits()
				u := fmt.Sprintf("http://%s:%d/", host, local.port)
				out := cl.fetch(t, all, u)
				assert.Equal(t, "local\n", out, "%s %s", cl.name, u)
				assert.Equal(t, before+1, local.hits(), "%s %s reached the local service", cl.name, u)
			}
		}
		// egressd logs a request when it is done, so one sent through it
		// now is logged after any of the above would have been.
		logged := len(e.ed.Log("request"))
		status, _, err := e.tp.Host.NewClient(t, proxyAddr, e.up.RootCAs, false).Fetch(guardCtx(t), e.up.HTTPURL)
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, status)
		for _, rec := range waitRequestLogs(t, e.ed, logged+1) {
			for _, host := range hosts {
				assert.NotEqual(t, fmt.Sprintf("%s:%d", host, local.port), rec["host"], "a request to the local service went through egressd")
			}
		}
	})
}

// TestGitCloneRecipe: git clone https://upstream.test/… from a smart-HTTP
// server (git http-backend) through egressd, configured by the recipe's
// environment or by its http.proxy snippet; and NO_PROXY keeping git direct
// even with http.proxy set.
func TestGitCloneRecipe(t *testing.T) {
	t.Parallel()
	e := start(t)
	g := startGitServer(t, e.up)
	const file, content = "PKGBUILD", "pkgname=egressd-recipe\n"
	commit := g.newRepo(t, "pkg", map[string]string{file: content})
	recipe := envList(parseKeyValues(t, docBlock(t, "env")))
	snippet := docBlock(t, "gitconfig")
	gitconfig := filepath.Join(t.TempDir(), "gitconfig")
	require.NoError(t, os.WriteFile(gitconfig, []byte(snippet), 0o644))
	// The doc's variant for one site: [http "URL"] instead of [http].
	require.Contains(t, snippet, "[http]\n")
	perURL := filepath.Join(t.TempDir(), "gitconfig")
	require.NoError(t, os.WriteFile(perURL,
		[]byte(strings.Replace(snippet, "[http]", `[http "`+e.up.HTTPSURL+`"]`, 1)), 0o644))
	// Nothing listens there: a client that used it would fail.
	const deadProxy = "http://127.0.0.1:9"

	cases := []struct {
		name    string
		env     []string
		proxied bool
	}{
		{"environment", recipe, true},
		{"http.proxy", []string{"GIT_CONFIG_GLOBAL=" + gitconfig}, true},
		{"http.proxy wins over the environment", []string{"GIT_CONFIG_GLOBAL=" + gitconfig, "https_proxy=" + deadProxy}, true},
		{"http.URL.proxy", []string{"GIT_CONFIG_GLOBAL=" + perURL}, true},
		{"http.proxy and NO_PROXY", []string{"GIT_CONFIG_GLOBAL=" + gitconfig, "NO_PROXY=" + nstest.UpstreamName}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			g.reset()
			e.up.Reset()
			logged := len(e.ed.Log("request"))
			dir := filepath.Join(t.TempDir(), "pkg")
			out, err := g.clone(e, c.env, e.up.HTTPSURL+"git/pkg.git", dir)
			require.NoError(t, err, out)
			got, err := os.ReadFile(filepath.Join(dir, file))
			require.NoError(t, err)
			assert.Equal(t, content, string(got), "the clone's %s", file)
			assert.Equal(t, commit, gitHead(t, dir), "the clone's HEAD")

			peers := e.up.Peers()
			require.NotEmpty(t, peers)
			if !c.proxied {
				for _, p := range peers {
					assert.Equal(t, nstest.HostAddr, p, "a request that bypasses egressd")
				}
				assert.Len(t, e.ed.Log("request"), logged, "git went through egressd")
				return
			}
			tunnels := distinct(peers)
			assertFresh(t, tunnels, len(tunnels))
			recs := waitRequestLogs(t, e.ed, logged+len(tunnels))[logged:]
			require.Len(t, recs, len(tunnels), "one CONNECT per address the upstream saw")
			for _, rec := range recs {
				assert.Equal(t, "CONNECT", rec["method"])
				assert.Equal(t, nstest.UpstreamName+":443", rec["host"])
			}
			t.Logf("one clone: %d requests over %d tunnels", len(peers), len(tunnels))
		})
	}
}

// TestGitClonePaced: clones started all at once under a -limit rule reach the
// upstream paced by the rule, by the upstream's own clock, one tunnel per
// clone; the rule counts the tunnels, not the several requests in each. The
// AUR asks for 30 git requests a minute; 2r/s keeps the test short.
func TestGitClonePaced(t *testing.T) {
	t.Parallel()
	const (
		clones   = 6
		interval = 500 * time.Millisecond // 2r/s
		burst    = 1
	)
	e := setup(t)
	g := startGitServer(t, e.up)
	commit := g.newRepo(t, "pkg", map[string]string{"PKGBUILD": "pkgname=paced\n"})
	e.ed = e.restart(t, "-limit", nstest.UpstreamName+"=2r/s,burst=1")
	recipe := envList(parseKeyValues(t, docBlock(t, "env")))

	var wg sync.WaitGroup
	errs := make([]error, clones)
	dirs := make([]string, clones)
	for i := range clones {
		dirs[i] = filepath.Join(t.TempDir(), "pkg")
		wg.Go(func() {
			out, err := g.clone(e, recipe, e.up.HTTPSURL+"git/pkg.git", dirs[i])
			if err != nil {
				errs[i] = fmt.Errorf("clone %d: %w: %s", i, err, out)
			}
		})
	}
	wg.Wait()
	for i, err := range errs {
		require.NoError(t, err)
		assert.Equal(t, commit, gitHead(t, dirs[i]))
	}

	hits := g.hitList()
	firsts := map[netip.Addr]time.Time{}
	for _, h := range hits {
		if _, ok := firsts[h.peer]; !ok {
			firsts[h.peer] = h.at
		}
	}
	peers := slices.Collect(maps.Keys(firsts))
	assertFresh(t, peers, clones)
	opened := slices.SortedFunc(maps.Values(firsts), time.Time.Compare)
	assertPaced(t, opened, interval, burst)

	u := nstest.UpstreamStats(t, ctlStats(t, e), nstest.UpstreamName)
	assert.EqualValues(t, clones, u.Requests, "the shaper counts one per tunnel")
	assert.Greater(t, len(hits), clones, "git sends several requests inside each tunnel")
	t.Logf("%d clones: %d requests, %d tunnels, first requests %v apart in all",
		clones, len(hits), len(peers), opened[len(opened)-1].Sub(opened[0]))
}

// TestMakepkgRecipe: makepkg, run as an unprivileged user as it must be,
// fetches an https:// source with its curl DLAGENTS and a git+https:// source
// with git through egressd, configured by the recipe's environment; and the
// makepkg.conf snippet alone sends the curl downloads through egressd.
func TestMakepkgRecipe(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("makepkg"); err != nil {
		t.Fatalf("makepkg not installed (Debian package pacman-package-manager): %v", err)
	}
	nobody, err := user.Lookup("nobody")
	require.NoError(t, err)
	uid, err := strconv.Atoi(nobody.Uid)
	require.NoError(t, err)
	gid, err := strconv.Atoi(nobody.Gid)
	require.NoError(t, err)

	e := start(t)
	g := startGitServer(t, e.up)
	g.newRepo(t, "hello", map[string]string{"hello.sh": "echo hello\n"})
	const source = "the source tarball, as it were\n"
	e.up.Handle("/src/hello-1.0.txt", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, source)
	}))
	sum := sha256.Sum256([]byte(source))
	fileSource := fmt.Sprintf("hello-1.0.txt::%ssrc/hello-1.0.txt", e.up.HTTPSURL)
	gitSource := fmt.Sprintf("hello::git+%sgit/hello.git", e.up.HTTPSURL)
	recipe := envList(parseKeyValues(t, docBlock(t, "env")))

	cases := []struct {
		name     string
		env      []string
		userConf string // ~/.config/pacman/makepkg.conf
		git      bool   // a git+https:// source too
	}{
		{"environment", recipe, "", true},
		{"makepkg.conf", nil, docBlock(t, "makepkg-conf"), false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e.up.Reset()
			dir := userDir(t, uid, gid)
			ca := filepath.Join(dir, "ca.pem")
			pem, err := os.ReadFile(e.up.CAFile)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(ca, pem, 0o644))
			sources := []string{fileSource}
			sums := []string{hex.EncodeToString(sum[:])}
			if c.git {
				sources = append(sources, gitSource)
				sums = append(sums, "SKIP")
			}
			pkgbuild := fmt.Sprintf("pkgname=egressd-recipe\npkgver=1.0\npkgrel=1\narch=(any)\nsource=(%s)\nsha256sums=(%s)\n",
				shellWords(sources), shellWords(sums))
			require.NoError(t, os.WriteFile(filepath.Join(dir, "PKGBUILD"), []byte(pkgbuild), 0o644))
			if c.userConf != "" {
				conf := filepath.Join(dir, ".config", "pacman", "makepkg.conf")
				require.NoError(t, os.MkdirAll(filepath.Dir(conf), 0o755))
				require.NoError(t, os.WriteFile(conf, []byte(c.userConf), 0o644))
			}

			ctx := guardCtx(t)
			cmd := e.tp.Host.Command(ctx, "setpriv", "--reuid", strconv.Itoa(uid), "--regid", strconv.Itoa(gid),
				"--clear-groups", "makepkg", "--verifysource", "--nocolor")
			cmd.Dir = dir
			cmd.Env = append(cmd.Env, "HOME="+dir, "CURL_CA_BUNDLE="+ca, "GIT_SSL_CAINFO="+ca,
				"GIT_CONFIG_NOSYSTEM=1", "XDG_CONFIG_HOME=")
			cmd.Env = append(cmd.Env, c.env...)
			// makepkg refuses to run as root, so success also shows that
			// setpriv took effect.
			out, err := cmd.CombinedOutput()
			require.NoError(t, err, "makepkg --verifysource:\n%s", out)

			got, err := os.ReadFile(filepath.Join(dir, "hello-1.0.txt"))
			require.NoError(t, err)
			assert.Equal(t, source, string(got))
			if c.git {
				assert.DirExists(t, filepath.Join(dir, "hello"), "makepkg's mirror clone of the git source")
			}
			peers := e.up.Peers()
			tunnels := distinct(peers)
			assertFresh(t, tunnels, len(tunnels))
			want := 1
			if c.git {
				want = 2 // the download's tunnel and the clone's
			}
			assert.Len(t, tunnels, want, "tunnels, one per download and one per clone: %v", peers)
		})
	}
}

// TestServiceRecipes: SearXNG, Invidious, Piped and Whoogle are not in
// Debian. Each subtest reads the doc's snippet as the client reads its config,
// builds the proxy URL the client builds, and fetches through egressd with
// the kind of request the client sends: HTTP proxy requests and CONNECT
// tunnels, or SOCKS5 with the host name (socks5h).
func TestServiceRecipes(t *testing.T) {
	t.Parallel()
	e := start(t, "-socks5", socksAddr, "-rotate", "session")
	const n = 5

	// perRequest fetches n times over fresh connections through proxyURL
	// and checks that each left from its own fresh address.
	perRequest := func(t *testing.T, proxyURL *url.URL, urls ...string) {
		t.Helper()
		for _, u := range urls {
			e.up.Reset()
			c := proxiedClient(t, e, proxyURL)
			var bodies []netip.Addr
			for range n {
				bodies = append(bodies, fetchAddr(t, c, u))
			}
			assertFresh(t, e.up.Peers(), n)
			assert.Equal(t, e.up.Peers(), bodies)
		}
	}
	// oneAddress fetches n times over fresh connections through each
	// proxy URL and returns the one fresh address they all left from.
	oneAddress := func(t *testing.T, proxyURLs ...*url.URL) netip.Addr {
		t.Helper()
		e.up.Reset()
		for _, p := range proxyURLs {
			c := proxiedClient(t, e, p)
			for range n {
				fetchAddr(t, c, e.up.HTTPSURL)
			}
		}
		addrs := distinct(e.up.Peers())
		require.Len(t, addrs, 1, "one session, one address")
		assertFresh(t, addrs, 1)
		return addrs[0]
	}

	t.Run("searxng", func(t *testing.T) {
		for _, p := range searxngProxies(t, docBlock(t, "searxng")) {
			require.Equal(t, "http", p.Scheme)
			perRequest(t, p, e.up.HTTPSURL, e.up.HTTPURL)
		}
	})

	t.Run("searxng-socks5", func(t *testing.T) {
		for _, p := range searxngProxies(t, docBlock(t, "searxng-socks5")) {
			require.Equal(t, "socks5h", p.Scheme)
			perRequest(t, p, e.up.HTTPSURL)
			// Only this subtest uses SOCKS5.
			socks := func() []map[string]string {
				return slices.DeleteFunc(e.ed.Log("request"), func(rec map[string]string) bool { return rec["method"] != "SOCKS5" })
			}
			nstest.WaitFor(t, "SOCKS5 access lines", func() bool { return len(socks()) >= n })
			for _, rec := range socks() {
				assert.Equal(t, nstest.UpstreamName+":443", rec["host"], "egressd got the name, not an address")
			}
		}
	})

	var invidious, piped netip.Addr
	t.Run("invidious", func(t *testing.T) {
		var cfg struct {
			HTTPProxy struct {
				User     string `yaml:"user"`
				Password string `yaml:"password"`
				Host     string `yaml:"host"`
				Port     int    `yaml:"port"`
			} `yaml:"http_proxy"`
		}
		decodeYAML(t, docBlock(t, "invidious"), &cfg)
		p := cfg.HTTPProxy
		require.NotEmpty(t, p.Host)
		require.NotZero(t, p.Port)
		invidious = oneAddress(t, &url.URL{
			Scheme: "http",
			User:   url.UserPassword(p.User, p.Password),
			Host:   net.JoinHostPort(p.Host, strconv.Itoa(p.Port)),
		})
	})

	t.Run("piped", func(t *testing.T) {
		backend := parseKeyValues(t, docBlock(t, "piped-backend"))
		pipedProxy := parseKeyValues(t, docBlock(t, "piped-proxy"))
		withUser := func(raw, user, pass string) *url.URL {
			u, err := url.Parse(raw)
			require.NoError(t, err)
			require.Equal(t, "http", u.Scheme)
			if user != "" {
				u.User = url.UserPassword(user, pass)
			}
			return u
		}
		piped = oneAddress(t,
			withUser(backend["REQWEST_PROXY"], backend["REQWEST_PROXY_USER"], backend["REQWEST_PROXY_PASS"]),
			withUser(pipedProxy["PROXY"], pipedProxy["PROXY_USER"], pipedProxy["PROXY_PASS"]))
	})

	t.Run("whoogle", func(t *testing.T) {
		env := parseKeyValues(t, docBlock(t, "whoogle"))
		// As Whoogle's app/request.py builds it, for http and https alike.
		auth := ""
		if user := env["WHOOGLE_PROXY_USER"]; user != "" {
			auth = user + ":" + env["WHOOGLE_PROXY_PASS"] + "@"
		}
		p, err := url.Parse(env["WHOOGLE_PROXY_TYPE"] + "://" + auth + env["WHOOGLE_PROXY_LOC"])
		require.NoError(t, err)
		require.Equal(t, "http", p.Scheme)
		perRequest(t, p, e.up.HTTPSURL, e.up.HTTPURL)
	})

	if invidious.IsValid() && piped.IsValid() {
		assert.NotEqual(t, invidious, piped, "different session keys, different addresses")
	}
}

// docsPath is the recipes' file, relative to this package.
const docsPath = "../docs/clients.md"

// docBlock returns the fenced code block that follows the line
// "<!-- test: NAME -->" in docs/clients.md.
func docBlock(t testing.TB, name string) string {
	t.Helper()
	doc, err := os.ReadFile(docsPath)
	require.NoError(t, err)
	marker := "<!-- test: " + name + " -->\n"
	require.Equal(t, 1, strings.Count(string(doc), marker), "%s must hold %q exactly once", docsPath, marker)
	_, rest, _ := strings.Cut(string(doc), marker)
	fence, rest, ok := strings.Cut(rest, "\n")
	require.True(t, ok && strings.HasPrefix(fence, "```"), "%s: no code block right after %q", docsPath, marker)
	body, _, ok := strings.Cut(rest, "```")
	require.True(t, ok, "%s: the code block after %q does not end", docsPath, marker)
	return body
}

// parseKeyValues reads KEY=value and KEY: value lines: shell assignments
// (with or without export), env files and Java properties. Comment lines
// start with # or !; a value in matching quotes is unquoted.
func parseKeyValues(t testing.TB, block string) map[string]string {
	t.Helper()
	kv := map[string]string{}
	for line := range strings.Lines(block) {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == '!' {
			continue
		}
		line = strings.TrimPrefix(line, "export ")
		i := strings.IndexAny(line, "=: \t")
		require.Positive(t, i, "not a KEY=value line: %q", line)
		key, val := line[:i], strings.TrimSpace(line[i:])
		if val != "" && (val[0] == '=' || val[0] == ':') {
			val = strings.TrimSpace(val[1:])
		}
		if len(val) >= 2 && (val[0] == '"' || val[0] == '\'') && val[len(val)-1] == val[0] {
			val = val[1 : len(val)-1]
		}
		kv[key] = val
	}
	require.NotEmpty(t, kv, "no KEY=value line in %q", block)
	return kv
}

// envList turns parsed assignments into KEY=value environment entries.
func envList(kv map[string]string) []string {
	var env []string
	for k, v := range kv {
		env = append(env, k+"="+v)
	}
	slices.Sort(env)
	return env
}

func decodeYAML(t testing.TB, block string, v any) {
	t.Helper()
	dec := yaml.NewDecoder(strings.NewReader(block))
	require.NoError(t, dec.Decode(v), "YAML of the doc:\n%s", block)
}

// searxngProxies returns the proxy URLs of outgoing.proxies["all://"] in a
// SearXNG settings.yml.
func searxngProxies(t testing.TB, block string) []*url.URL {
	t.Helper()
	var cfg struct {
		Outgoing struct {
			Proxies map[string][]string `yaml:"proxies"`
		} `yaml:"outgoing"`
	}
	decodeYAML(t, block, &cfg)
	raw := cfg.Outgoing.Proxies["all://"]
	require.NotEmpty(t, raw, "outgoing.proxies[all://] of:\n%s", block)
	var urls []*url.URL
	for _, r := range raw {
		u, err := url.Parse(r)
		require.NoError(t, err)
		urls = append(urls, u)
	}
	return urls
}

// nsDialer dials from inside a namespace, for golang.org/x/net/proxy.
type nsDialer struct{ ns *nstest.NS }

func (d nsDialer) Dial(network, addr string) (net.Conn, error) {
	return d.ns.DialContext(context.Background(), network, addr)
}

func (d nsDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return d.ns.DialContext(ctx, network, addr)
}

// proxiedClient is a client in H that goes through the proxy at p: an HTTP
// proxy (http://, with its user name and password as Basic proxy
// credentials, as Invidious, Piped and Whoogle send them), or SOCKS5 with
// host names left to the proxy (socks5h://). Every request gets a new
// connection, so every HTTPS request its own tunnel.
func proxiedClient(t testing.TB, e *env, p *url.URL) *http.Client {
	t.Helper()
	tr := &http.Transport{
		DialContext:       nsDialer{e.tp.Host}.DialContext,
		TLSClientConfig:   &tls.Config{RootCAs: e.up.RootCAs},
		DisableKeepAlives: true,
	}
	switch p.Scheme {
	case "http":
		tr.Proxy = http.ProxyURL(p)
	case "socks5h":
		d, err := proxy.FromURL(p, nsDialer{e.tp.Host})
		require.NoError(t, err)
		tr.DialContext = d.(proxy.ContextDialer).DialContext
	default:
		t.Fatalf("proxy scheme %q of %s", p.Scheme, p)
	}
	return &http.Client{Transport: tr, Timeout: nstest.Guard}
}

// fetchAddr GETs u through c and returns the address the upstream saw.
func fetchAddr(t testing.TB, c *http.Client, u string) netip.Addr {
	t.Helper()
	resp, err := c.Get(u)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s: %s", u, body)
	a, err := netip.ParseAddr(strings.TrimSpace(string(body)))
	require.NoError(t, err, "upstream answer %q", body)
	return a
}

func distinct(addrs []netip.Addr) []netip.Addr {
	var d []netip.Addr
	for _, a := range addrs {
		if !slices.Contains(d, a) {
			d = append(d, a)
		}
	}
	return d
}

// assertPaced checks arrival times (sorted) against a rate of one per
// interval with the given burst: arrival j cannot come earlier than j-i-burst
// intervals after arrival i. One interval of slack absorbs transit jitter; a
// slow machine only widens the gaps, so this cannot fail for slowness.
func assertPaced(t *testing.T, times []time.Time, interval time.Duration, burst int) {
	t.Helper()
	for i := range times {
		for j := i + 1; j < len(times); j++ {
			least := time.Duration(j-i-burst-1) * interval
			if gap := times[j].Sub(times[i]); gap < least {
				t.Fatalf("arrivals %d and %d reached the upstream %v apart; one per %v with burst %d allows no less than %v",
					i, j, gap, interval, burst, least)
			}
		}
	}
}

// localService is an HTTP server on 127.0.0.1 inside a namespace, a local
// service that NO_PROXY must keep away from egressd.
type localService struct {
	port int
	mu   sync.Mutex
	n    int
}

func startLocalService(t testing.TB, ns *nstest.NS) *localService {
	t.Helper()
	ln, err := ns.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &localService{port: ln.Addr().(*net.TCPAddr).Port}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			s.mu.Lock()
			s.n++
			s.mu.Unlock()
			io.WriteString(w, "local\n")
		}),
		ReadHeaderTimeout: nstest.Guard,
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return s
}

func (s *localService) hits() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// userDir makes a directory owned by uid:gid that the user can reach (not
// under t.TempDir, whose parents only root may enter), removed in t.Cleanup.
func userDir(t testing.TB, uid, gid int) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "egressd-clients-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	require.NoError(t, os.Chown(dir, uid, gid))
	return dir
}

// shellWords quotes each word for bash, for a PKGBUILD array.
func shellWords(words []string) string {
	q := make([]string, len(words))
	for i, w := range words {
		q[i] = "'" + strings.ReplaceAll(w, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}
