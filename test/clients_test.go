package test

import (
	"cmp"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
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
	"regexp"
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
// of which spelling each client reads is checked row by row. With
// -auth-file, the recipe's auth block gets through and the block without
// credentials is refused.
func TestProxyEnvironmentRecipe(t *testing.T) {
	t.Parallel()
	e := start(t)
	local := startLocalService(t, e.tp.Host)
	g := startGitServer(t, e.up)
	commit := g.newRepo(t, "pkg", map[string]string{"PKGBUILD": "pkgname=env\n"})
	clients := envClients(t, e, e.tp.Host, g, commit)
	names := []string{"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"}

	eachVariant(t, e, nil, func(t *testing.T) map[string]string {
		return usersIn(proxyURLsIn(t, docBlock(t, "env-auth"))...)
	}, func(t *testing.T, v variant) {
		recipe := parseKeyValues(t, v.block(t, "env"))
		for _, k := range names {
			require.Contains(t, recipe, k, "the recipe sets %s", k)
		}
		only := func(keys ...string) []string {
			var env []string
			for _, k := range keys {
				env = append(env, k+"="+recipe[k])
			}
			return env
		}
		all := only(names...)
		upstreamBypassed := append(only("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"),
			"NO_PROXY="+recipe["NO_PROXY"]+","+nstest.UpstreamName,
			"no_proxy="+recipe["no_proxy"]+","+nstest.UpstreamName)
		every := func(o outcome) map[string]outcome {
			return map[string]outcome{"curl": o, "wget": o, "go": o, "git": o}
		}
		type envCase struct {
			name string
			env  []string
			url  string
			want map[string]outcome // by client name
		}
		cases := []envCase{
			{"recipe, HTTPS", all, e.up.HTTPSURL, every(proxied)},
			{"recipe, plain HTTP", all, e.up.HTTPURL, every(proxied)},
			{"NO_PROXY names the upstream", upstreamBypassed, e.up.HTTPSURL, every(direct)},
		}
		if v.auth() {
			plain := envList(parseKeyValues(t, docBlock(t, "env")))
			cases = append(cases,
				envCase{"no credentials, HTTPS", plain, e.up.HTTPSURL, every(refused)},
				envCase{"no credentials, plain HTTP", plain, e.up.HTTPURL, every(refused)})
		} else {
			cases = append(cases, []envCase{
				{"upper case only, HTTPS", only("HTTPS_PROXY"), e.up.HTTPSURL,
					map[string]outcome{"curl": proxied, "wget": direct, "go": proxied, "git": proxied}},
				{"upper case only, plain HTTP", only("HTTP_PROXY"), e.up.HTTPURL,
					map[string]outcome{"curl": direct, "wget": direct, "go": proxied, "git": direct}},
				{"upper case only, NO_PROXY", append(only("HTTPS_PROXY", "https_proxy"), "NO_PROXY="+nstest.UpstreamName), e.up.HTTPSURL,
					map[string]outcome{"curl": direct, "wget": proxied, "go": direct, "git": direct}},
				{"lower case only, HTTPS", only("https_proxy"), e.up.HTTPSURL, every(proxied)},
				{"lower case only, plain HTTP", only("http_proxy"), e.up.HTTPURL, every(proxied)},
				{"lower case only, no_proxy", append(only("https_proxy"), "no_proxy="+nstest.UpstreamName), e.up.HTTPSURL, every(direct)},
			}...)
		}
		refusals := 0
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				for _, cl := range clients {
					checkEnvClient(t, e, cl, c.env, c.url, c.want[cl.name])
					if c.want[cl.name] == refused {
						refusals++
					}
				}
			})
		}
		if v.auth() {
			// Each refused client was answered 407 at least once (git may
			// ask twice).
			waitRequestLogs(t, e.ed, refusals, statusIs("407"))
			return
		}

		t.Run("recipe, local service", func(t *testing.T) {
			hosts := []string{"localhost", "127.0.0.1"}
			for _, cl := range clients[:3] { // git has no repository there
				for _, host := range hosts {
					before := local.hits()
					u := fmt.Sprintf("http://%s:%d/", host, local.port)
					out, err := cl.fetch(t, all, u)
					require.NoError(t, err, "%s %s", cl.name, u)
					assert.Equal(t, "local\n", out, "%s %s", cl.name, u)
					assert.Equal(t, before+1, local.hits(), "%s %s reached the local service", cl.name, u)
				}
			}
			// egressd logs a request when it is done: once the access line of
			// one sent through it now is there, any line of the clients above
			// would be too.
			c := proxiedClient(t, e, &url.URL{Scheme: "http", Host: proxyAddr})
			marker := fetchAddr(t, c, e.up.HTTPURL)
			waitRequestLogs(t, e.ed, 1, egressIn([]netip.Addr{marker}))
			for _, rec := range e.ed.Log("request") {
				for _, host := range hosts {
					assert.NotEqual(t, fmt.Sprintf("%s:%d", host, local.port), rec["host"], "a request to the local service went through egressd")
				}
			}
		})

		// sudo -u USER drops the variables unless sudoers keeps them. sudo
		// reads /etc/sudoers only: each run binds a sudoers file of the
		// test's over it, in a mount namespace of its own, so the machine's
		// file stays as it is.
		t.Run("recipe through sudo", func(t *testing.T) {
			if _, err := exec.LookPath("sudo"); err != nil {
				t.Fatalf("sudo not installed (Debian package sudo): %v", err)
			}
			uid, gid := nobodyIDs(t)
			dir := userDir(t, uid, gid)
			ca := filepath.Join(dir, "ca.pem")
			pem, err := os.ReadFile(e.up.CAFile)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(ca, pem, 0o644))
			const base = "Defaults env_reset\nroot ALL=(ALL:ALL) ALL\n"
			for _, c := range []struct {
				name    string
				sudoers string
				want    outcome
			}{
				{"env_keep of the recipe", base + docBlock(t, "sudoers"), proxied},
				{"without it", base, direct},
			} {
				t.Run(c.name, func(t *testing.T) {
					sudoers := filepath.Join(t.TempDir(), "sudoers")
					require.NoError(t, os.WriteFile(sudoers, []byte(c.sudoers), 0o440))
					sudo := envClient{"curl", func(_ *testing.T, env []string, u string) (string, error) {
						return e.tp.Host.OutputEnv(env, "unshare", "--mount", "--propagation", "private", "--",
							"sh", "-c", `mount --bind "$1" /etc/sudoers && exec sudo -u nobody /usr/bin/curl -q -sS -f --max-time 30 --cacert "$2" "$3"`,
							"sh", sudoers, ca, u)
					}}
					checkEnvClient(t, e, sudo, all, e.up.HTTPSURL, c.want)
				})
			}
		})
	})
}

// nobodyIDs returns the uid and gid of the user nobody.
func nobodyIDs(t *testing.T) (uid, gid int) {
	t.Helper()
	nobody, err := user.Lookup("nobody")
	require.NoError(t, err)
	uid, err = strconv.Atoi(nobody.Uid)
	require.NoError(t, err)
	gid, err = strconv.Atoi(nobody.Gid)
	require.NoError(t, err)
	return uid, gid
}

// outcome is what a recipe's request should meet.
type outcome int

const (
	proxied outcome = iota // through egressd, from a fresh address
	direct                 // around egressd, from H's own address
	refused                // refused by egressd (407): nothing reaches the upstream
)

// envClient is a program that reads the proxy environment. fetch runs it
// with env added and returns what it printed: the upstream's answer, except
// for git, which clones u's repository and prints nothing.
type envClient struct {
	name  string
	fetch func(t *testing.T, env []string, u string) (string, error)
}

// envClients are curl, wget, a Go program (http.ProxyFromEnvironment) and
// git clone, run in ns; git clones g's repository pkg, which is at commit.
func envClients(t *testing.T, e *env, ns *nstest.NS, g *gitServer, commit string) []envClient {
	fetch := binary(t, "./test/fetch")
	program := func(name string, args ...string) func(*testing.T, []string, string) (string, error) {
		return func(_ *testing.T, env []string, u string) (string, error) {
			return ns.OutputEnv(env, name, append(args, u)...)
		}
	}
	return []envClient{
		{"curl", program("curl", "-q", "-sS", "-f", "--max-time", "30", "--cacert", e.up.CAFile)},
		{"wget", program("wget", "--no-config", "-q", "-T", "30", "-t", "1", "-O", "-", "--ca-certificate="+e.up.CAFile)},
		{"go", program(fetch, "-cacert", e.up.CAFile)},
		{"git", func(t *testing.T, env []string, u string) (string, error) {
			dir := filepath.Join(t.TempDir(), "pkg")
			out, err := g.cloneIn(ns, e, env, u+"git/pkg.git", dir)
			if err == nil {
				assert.Equal(t, commit, gitHead(t, dir))
			}
			return out, err
		}},
	}
}

// checkEnvClient runs cl with env on u and checks that the upstream saw what
// want says: requests from fresh addresses (one per tunnel), from H's own
// address, or nothing.
func checkEnvClient(t *testing.T, e *env, cl envClient, env []string, u string, want outcome) {
	t.Helper()
	e.up.Reset()
	out, err := cl.fetch(t, env, u)
	peers := e.up.Peers()
	if want == refused {
		assert.Error(t, err, "%s got through without credentials: %s", cl.name, out)
		assert.Empty(t, peers, "%s: requests at the upstream", cl.name)
		return
	}
	require.NoError(t, err, cl.name)
	require.NotEmpty(t, peers, "%s: requests at the upstream", cl.name)
	if cl.name != "git" {
		require.Len(t, peers, 1, "%s: requests at the upstream", cl.name)
		assert.Equal(t, peers, parseBodies(t, out), cl.name)
	}
	if want == proxied {
		// A tunnel has one address for all its requests; plain HTTP gets
		// one per request.
		assertFresh(t, distinct(peers), len(distinct(peers)))
		return
	}
	for _, p := range peers {
		assert.Equal(t, nstest.HostAddr, p, "%s should have gone direct, from H's own address", cl.name)
	}
}

// TestGitCloneRecipe: git clone https://upstream.test/… from a smart-HTTP
// server (git http-backend) through egressd, configured by the recipe's
// environment or by its http.proxy snippet; and NO_PROXY keeping git direct
// even with http.proxy set. With -auth-file, both auth blocks get through
// and http.proxy without credentials is refused.
func TestGitCloneRecipe(t *testing.T) {
	t.Parallel()
	e := start(t)
	g := startGitServer(t, e.up)
	const file, content = "PKGBUILD", "pkgname=egressd-recipe\n"
	commit := g.newRepo(t, "pkg", map[string]string{file: content})
	// writeConfig writes a gitconfig file holding s.
	writeConfig := func(t *testing.T, s string) string {
		path := filepath.Join(t.TempDir(), "gitconfig")
		require.NoError(t, os.WriteFile(path, []byte(s), 0o644))
		return path
	}
	// Nothing listens there: a client that used it would fail.
	const deadProxy = "http://127.0.0.1:9"

	eachVariant(t, e, nil, func(t *testing.T) map[string]string {
		return usersIn(append(proxyURLsIn(t, docBlock(t, "env-auth")), proxyURLsIn(t, docBlock(t, "gitconfig-auth"))...)...)
	}, func(t *testing.T, v variant) {
		recipe := envList(parseKeyValues(t, v.block(t, "env")))
		snippet := v.block(t, "gitconfig")
		gitconfig := writeConfig(t, snippet)
		type gitCase struct {
			name string
			env  []string
			want outcome
		}
		cases := []gitCase{
			{"environment", recipe, proxied},
			{"http.proxy", []string{"GIT_CONFIG_GLOBAL=" + gitconfig}, proxied},
		}
		if v.auth() {
			plain := writeConfig(t, docBlock(t, "gitconfig"))
			cases = append(cases, gitCase{"http.proxy without credentials", []string{"GIT_CONFIG_GLOBAL=" + plain}, refused})
		} else {
			// The doc's variant for one site: [http "URL"] instead of [http].
			require.Contains(t, snippet, "[http]\n")
			perURL := writeConfig(t, strings.Replace(snippet, "[http]", `[http "`+e.up.HTTPSURL+`"]`, 1))
			cases = append(cases, []gitCase{
				{"http.proxy wins over the environment", []string{"GIT_CONFIG_GLOBAL=" + gitconfig, "https_proxy=" + deadProxy}, proxied},
				{"http.URL.proxy", []string{"GIT_CONFIG_GLOBAL=" + perURL}, proxied},
				{"http.proxy and NO_PROXY", []string{"GIT_CONFIG_GLOBAL=" + gitconfig, "NO_PROXY=" + nstest.UpstreamName}, direct},
			}...)
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				g.reset()
				e.up.Reset()
				dir := filepath.Join(t.TempDir(), "pkg")
				out, err := g.clone(e, c.env, e.up.HTTPSURL+"git/pkg.git", dir)
				peers := e.up.Peers()
				if c.want == refused {
					assert.Error(t, err, "git got through without credentials: %s", out)
					assert.Empty(t, peers, "requests at the upstream")
					waitRequestLogs(t, e.ed, 1, statusIs("407"))
					return
				}
				require.NoError(t, err, out)
				got, err := os.ReadFile(filepath.Join(dir, file))
				require.NoError(t, err)
				assert.Equal(t, content, string(got), "the clone's %s", file)
				assert.Equal(t, commit, gitHead(t, dir), "the clone's HEAD")

				require.NotEmpty(t, peers)
				if c.want == direct {
					// egressd never sends from H's own address.
					for _, p := range peers {
						assert.Equal(t, nstest.HostAddr, p, "a request that bypasses egressd")
					}
					return
				}
				tunnels := distinct(peers)
				assertFresh(t, tunnels, len(tunnels))
				recs := waitRequestLogs(t, e.ed, len(tunnels), egressIn(tunnels))
				require.Len(t, recs, len(tunnels), "one CONNECT per address the upstream saw")
				for _, rec := range recs {
					assert.Equal(t, "CONNECT", rec["method"])
					assert.Equal(t, nstest.UpstreamName+":443", rec["host"])
				}
				t.Logf("one clone: %d requests over %d tunnels", len(peers), len(tunnels))
			})
		}
	})
}

// TestGitClonePaced: clones started all at once under a -limit rule are let
// upstream paced by the rule, one tunnel per clone, by egressd's own log of
// its admissions, and each tunnel reaches the upstream only after it was
// let go; the rule counts the tunnels, not the several requests in each.
// The AUR asks for 30 git requests a minute; 2r/s keeps the test short.
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
	admitted := admissions(t, e.ed, nstest.UpstreamName, clones)
	assertPaced(t, admitted, interval, burst)
	assertAdmittedFirst(t, admitted, opened)

	u := nstest.UpstreamStats(t, ctlStats(t, e), nstest.UpstreamName)
	assert.EqualValues(t, clones, u.Requests, "the shaper counts one per tunnel")
	assert.Greater(t, len(hits), clones, "git sends several requests inside each tunnel")
	t.Logf("%d clones: %d requests, %d tunnels admitted over %v, their first requests at the upstream over %v",
		clones, len(hits), len(peers), admitted[len(admitted)-1].Sub(admitted[0]), opened[len(opened)-1].Sub(opened[0]))
}

// TestMakepkgRecipe: makepkg, run as an unprivileged user as it must be,
// fetches an https:// source with its curl DLAGENTS and a git+https:// source
// with git through egressd, configured by the recipe's environment; and the
// makepkg.conf snippet alone sends the curl downloads through egressd. With
// -auth-file, both auth blocks get through and the makepkg.conf line without
// credentials is refused.
func TestMakepkgRecipe(t *testing.T) {
	t.Parallel()
	// makepkg looks up pacman and, for its default OPTIONS, strip before
	// it does anything; its Debian package depends on neither.
	for _, tool := range []struct{ name, pkg string }{
		{"makepkg", "makepkg"}, {"pacman", "pacman-package-manager"}, {"strip", "binutils"},
	} {
		if _, err := exec.LookPath(tool.name); err != nil {
			t.Fatalf("%s not installed (Debian package %s; makepkg needs it): %v", tool.name, tool.pkg, err)
		}
	}
	uid, gid := nobodyIDs(t)

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

	eachVariant(t, e, nil, func(t *testing.T) map[string]string {
		return usersIn(append(proxyURLsIn(t, docBlock(t, "env-auth")), proxyURLsIn(t, docBlock(t, "makepkg-conf-auth"))...)...)
	}, func(t *testing.T, v variant) {
		type makepkgCase struct {
			name     string
			env      []string
			userConf string // ~/.config/pacman/makepkg.conf
			git      bool   // a git+https:// source too
			want     outcome
		}
		cases := []makepkgCase{
			{"environment", envList(parseKeyValues(t, v.block(t, "env"))), "", true, proxied},
			{"makepkg.conf", nil, v.block(t, "makepkg-conf"), false, proxied},
		}
		if v.auth() {
			cases = append(cases, makepkgCase{"makepkg.conf without credentials", nil, docBlock(t, "makepkg-conf"), false, refused})
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
				if c.want == refused {
					assert.Error(t, err, "makepkg got through without credentials:\n%s", out)
					assert.Empty(t, e.up.Peers(), "requests at the upstream")
					waitRequestLogs(t, e.ed, 1, statusIs("407"))
					return
				}
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
	})
}

// TestServiceRecipes: SearXNG, Invidious, Piped and Whoogle are not in
// Debian. Each subtest reads the doc's snippet as the client reads its config,
// builds the proxy URL the client builds, and fetches through egressd with
// the kind of request the client sends: HTTP proxy requests and CONNECT
// tunnels, or SOCKS5 with the host name (socks5h). With -auth-file, every
// auth block gets through, session keys in user names still hold, and the
// blocks without credentials are refused.
func TestServiceRecipes(t *testing.T) {
	t.Parallel()
	extra := []string{"-socks5", socksAddr, "-rotate", "session"}
	e := start(t, extra...)
	const n = 5

	// perRequest fetches n times over fresh connections through proxyURL
	// and checks that each left from its own fresh address. It returns the
	// addresses.
	perRequest := func(t *testing.T, proxyURL *url.URL, urls ...string) []netip.Addr {
		t.Helper()
		var all []netip.Addr
		for _, u := range urls {
			e.up.Reset()
			c := proxiedClient(t, e, proxyURL)
			var bodies []netip.Addr
			for range n {
				bodies = append(bodies, fetchAddr(t, c, u))
			}
			assertFresh(t, e.up.Peers(), n)
			assert.Equal(t, e.up.Peers(), bodies)
			all = append(all, bodies...)
		}
		return all
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

	eachVariant(t, e, extra, func(t *testing.T) map[string]string {
		urls := append(searxngProxies(t, docBlock(t, "searxng-auth")), searxngProxies(t, docBlock(t, "searxng-socks5-auth"))...)
		urls = append(urls, pipedProxies(t, "-auth")...)
		return usersIn(append(urls, invidiousProxy(t, docBlock(t, "invidious-auth")), whoogleProxy(t, docBlock(t, "whoogle-auth")))...)
	}, func(t *testing.T, v variant) {
		t.Run("searxng", func(t *testing.T) {
			for _, p := range searxngProxies(t, v.block(t, "searxng")) {
				require.Equal(t, "http", p.Scheme)
				perRequest(t, p, e.up.HTTPSURL, e.up.HTTPURL)
			}
		})

		t.Run("searxng-socks5", func(t *testing.T) {
			for _, p := range searxngProxies(t, v.block(t, "searxng-socks5")) {
				require.Equal(t, "socks5h", p.Scheme)
				addrs := perRequest(t, p, e.up.HTTPSURL)
				for _, rec := range waitRequestLogs(t, e.ed, n, egressIn(addrs)) {
					assert.Equal(t, "SOCKS5", rec["method"])
					assert.Equal(t, nstest.UpstreamName+":443", rec["host"], "egressd got the name, not an address")
				}
			}
		})

		var invidious, piped netip.Addr
		t.Run("invidious", func(t *testing.T) {
			invidious = oneAddress(t, invidiousProxy(t, v.block(t, "invidious")))
		})

		t.Run("piped", func(t *testing.T) {
			piped = oneAddress(t, pipedProxies(t, v.suffix)...)
		})

		t.Run("whoogle", func(t *testing.T) {
			p := whoogleProxy(t, v.block(t, "whoogle"))
			require.Equal(t, "http", p.Scheme)
			perRequest(t, p, e.up.HTTPSURL, e.up.HTTPURL)
		})

		if invidious.IsValid() && piped.IsValid() {
			assert.NotEqual(t, invidious, piped, "different session keys, different addresses")
		}

		if v.auth() {
			t.Run("no credentials", func(t *testing.T) {
				e.up.Reset()
				proxies := append(searxngProxies(t, docBlock(t, "searxng")), searxngProxies(t, docBlock(t, "searxng-socks5"))...)
				proxies = append(proxies, invidiousProxy(t, docBlock(t, "invidious"))) // session-invidious is no user
				refusals := 0
				for _, p := range proxies {
					c := proxiedClient(t, e, p)
					_, err := c.Get(e.up.HTTPSURL)
					assert.Error(t, err, "%s: HTTPS without credentials", p.Redacted())
					refusals++
					if p.Scheme == "http" {
						resp, err := c.Get(e.up.HTTPURL)
						require.NoError(t, err)
						resp.Body.Close()
						assert.Equal(t, http.StatusProxyAuthRequired, resp.StatusCode, "%s: plain HTTP without credentials", p.Redacted())
						refusals++
					}
				}
				assert.Empty(t, e.up.Peers(), "requests at the upstream")
				waitRequestLogs(t, e.ed, refusals, statusIs("407"))
			})
		}
	})
}

// A recipe runs in two variants: as written for an egressd without
// -auth-file, and as its "-auth" block against an egressd started with
// -auth-file holding the users that block names.
type variant struct {
	name   string
	suffix string // of the doc blocks' names
}

var variants = []variant{{"no auth", ""}, {"auth", "-auth"}}

func (v variant) auth() bool { return v.suffix != "" }

// block returns the variant's doc block called name (name-auth for auth).
func (v variant) block(t testing.TB, name string) string { return docBlock(t, name+v.suffix) }

// eachVariant runs run in a subtest per variant, one egressd each: e's own,
// started with extra, for the recipes as written, then one started with extra
// and -auth-file holding users (htpasswd -B) in its place.
func eachVariant(t *testing.T, e *env, extra []string, users func(*testing.T) map[string]string, run func(*testing.T, variant)) {
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			if v.auth() {
				file := filepath.Join(t.TempDir(), "users")
				nstest.HTPasswd(t, file, users(t))
				e.replace(t, append(slices.Clone(extra), "-auth-file", file)...)
			}
			run(t, v)
		})
	}
}

// proxyURLsIn returns the proxy URLs written in a doc block.
func proxyURLsIn(t testing.TB, block string) []*url.URL {
	t.Helper()
	var urls []*url.URL
	for _, raw := range proxyURLPattern.FindAllString(block, -1) {
		u, err := url.Parse(raw)
		require.NoError(t, err)
		urls = append(urls, u)
	}
	require.NotEmpty(t, urls, "no proxy URL in %q", block)
	return urls
}

var proxyURLPattern = regexp.MustCompile(`\b(?:https?|socks5h?)://[^\s"']+`)

// usersIn returns the user names and passwords that proxy URLs carry, for
// an auth file: a user name USER-session-KEY is user USER.
func usersIn(urls ...*url.URL) map[string]string {
	users := make(map[string]string)
	for _, u := range urls {
		if u.User == nil {
			continue
		}
		name, _, _ := strings.Cut(u.User.Username(), "-session-")
		users[name], _ = u.User.Password()
	}
	return users
}

// invidiousProxy returns the proxy URL of an Invidious config.yml's
// http_proxy block, with user and password as Basic proxy credentials.
func invidiousProxy(t testing.TB, block string) *url.URL {
	t.Helper()
	var cfg struct {
		HTTPProxy struct {
			User     string `yaml:"user"`
			Password string `yaml:"password"`
			Host     string `yaml:"host"`
			Port     int    `yaml:"port"`
		} `yaml:"http_proxy"`
	}
	decodeYAML(t, block, &cfg)
	p := cfg.HTTPProxy
	require.NotEmpty(t, p.Host)
	require.NotZero(t, p.Port)
	return &url.URL{
		Scheme: "http",
		User:   url.UserPassword(p.User, p.Password),
		Host:   net.JoinHostPort(p.Host, strconv.Itoa(p.Port)),
	}
}

// pipedProxies returns the proxy URLs of Piped's backend (config.properties)
// and piped-proxy (environment) from the doc blocks piped-backend and
// piped-proxy with suffix.
func pipedProxies(t testing.TB, suffix string) []*url.URL {
	t.Helper()
	withUser := func(raw, user, pass string) *url.URL {
		u, err := url.Parse(raw)
		require.NoError(t, err)
		require.Equal(t, "http", u.Scheme)
		if user != "" {
			u.User = url.UserPassword(user, pass)
		}
		return u
	}
	backend := parseKeyValues(t, docBlock(t, "piped-backend"+suffix))
	relay := parseKeyValues(t, docBlock(t, "piped-proxy"+suffix))
	return []*url.URL{
		withUser(backend["REQWEST_PROXY"], backend["REQWEST_PROXY_USER"], backend["REQWEST_PROXY_PASS"]),
		withUser(relay["PROXY"], relay["PROXY_USER"], relay["PROXY_PASS"]),
	}
}

// whoogleProxy returns the proxy URL Whoogle's app/request.py builds from
// its environment, for http and https alike.
func whoogleProxy(t testing.TB, block string) *url.URL {
	t.Helper()
	env := parseKeyValues(t, block)
	auth := ""
	if user := env["WHOOGLE_PROXY_USER"]; user != "" {
		auth = user + ":" + env["WHOOGLE_PROXY_PASS"] + "@"
	}
	p, err := url.Parse(env["WHOOGLE_PROXY_TYPE"] + "://" + auth + env["WHOOGLE_PROXY_LOC"])
	require.NoError(t, err)
	return p
}

// TestContainerRecipe: the container setup of docs/clients.md in the
// namespaces, with H as the host and R as a container on its bridge: the
// doc's bridge network and host address become the link's IPv4 network and
// H's address on it. egressd runs with the doc's command line (listening on
// H's link address, -allow for the bridge network); in R, clients use the
// proxy environment that a NixOS container's networking.proxy, a Docker
// container's environment: and the Docker daemon's daemon.json give them.
// Every request leaves from a fresh address, and egressd logged R's own
// address as the client.
func TestContainerRecipe(t *testing.T) {
	t.Parallel()
	bridge := netip.PrefixFrom(nstest.HostAddr4, 24).Masked()
	topo := strings.NewReplacer("10.0.5.0/24", bridge.String(), "10.0.5.1", nstest.HostAddr4.String())
	block := func(name string) string { return topo.Replace(docBlock(t, name)) }

	e := setup(t)
	cmdline := strings.Fields(block("container-egressd"))
	require.Equal(t, "egressd", cmdline[0], "the command line of the doc")
	e.ed = e.tp.StartEgressd(t, e.bin, egressdArgs(e.tp, cmdline[1:]...)...)
	e.ed.WaitListening(t, 2) // loopback (egressdArgs) and the bridge address
	g := startGitServer(t, e.up)
	commit := g.newRepo(t, "pkg", map[string]string{"PKGBUILD": "pkgname=container\n"})
	clients := envClients(t, e, e.tp.Router, g, commit)

	var compose struct {
		Services map[string]struct {
			Environment map[string]string `yaml:"environment"`
		} `yaml:"services"`
	}
	decodeYAML(t, block("docker-compose"), &compose)
	require.NotEmpty(t, compose.Services)
	var daemon struct {
		Proxies map[string]string `json:"proxies"`
	}
	require.NoError(t, json.Unmarshal([]byte(block("docker-daemon")), &daemon))

	type containerCase struct {
		name    string
		env     []string
		clients []string // the envClients that run there
	}
	cases := []containerCase{
		{"NixOS container", nixosProxyEnv(t, block("nixos-proxy")), []string{"curl", "wget", "go", "git"}},
		{"Docker daemon", dockerdProxyEnv(daemon.Proxies), []string{"go"}}, // dockerd is a Go program
	}
	for name, svc := range compose.Services {
		cases = append(cases, containerCase{"Docker container " + name, envList(svc.Environment), []string{"curl", "wget", "go"}})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, cl := range clients {
				if slices.Contains(c.clients, cl.name) {
					checkEnvClient(t, e, cl, c.env, e.up.HTTPSURL, proxied)
					if cl.name != "git" {
						checkEnvClient(t, e, cl, c.env, e.up.HTTPURL, proxied)
					}
				}
			}
		})
	}
	for _, rec := range e.ed.Log("request") {
		assert.True(t, strings.HasPrefix(rec["client"], nstest.RouterAddr4.String()+":"), "a client other than R: %v", rec)
	}
}

// nixosProxyEnv returns the environment NixOS makes of networking.proxy
// (nixos/modules/config/networking.nix): default goes to http_proxy,
// https_proxy, ftp_proxy, rsync_proxy and all_proxy, and no_proxy is
// noProxy, or "127.0.0.1,localhost" when only default is set. Lower case
// only.
func nixosProxyEnv(t testing.TB, block string) []string {
	t.Helper()
	opts := map[string]string{}
	for _, m := range regexp.MustCompile(`networking\.proxy\.(\w+)\s*=\s*"([^"]*)"\s*;`).FindAllStringSubmatch(block, -1) {
		opts[m[1]] = m[2]
	}
	def := opts["default"]
	require.NotEmpty(t, def, "networking.proxy.default in %q", block)
	noProxy := cmp.Or(opts["noProxy"], "127.0.0.1,localhost")
	return []string{"http_proxy=" + def, "https_proxy=" + def, "ftp_proxy=" + def, "rsync_proxy=" + def,
		"all_proxy=" + def, "no_proxy=" + noProxy}
}

// dockerdProxyEnv returns the environment dockerd gives itself from
// daemon.json's proxies (moby's configureProxyEnv): both spellings of each.
func dockerdProxyEnv(proxies map[string]string) []string {
	var env []string
	for key, name := range map[string]string{"http-proxy": "HTTP_PROXY", "https-proxy": "HTTPS_PROXY", "no-proxy": "NO_PROXY"} {
		if v := proxies[key]; v != "" {
			env = append(env, name+"="+v, strings.ToLower(name)+"="+v)
		}
	}
	return env
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

// assertPaced checks admission times (sorted, from admissions) against a
// rate of one per interval with the given burst. A token bucket lets
// admission j come no earlier than j-i-burst+1 intervals after admission i;
// this allows two intervals less, so that an admission logged late (its
// goroutine kept waiting after the shaper let it go) cannot fail it. A slow
// machine only widens the gaps.
func assertPaced(t *testing.T, times []time.Time, interval time.Duration, burst int) {
	t.Helper()
	for i := range times {
		for j := i + 1; j < len(times); j++ {
			least := time.Duration(j-i-burst-1) * interval
			if gap := times[j].Sub(times[i]); gap < least {
				t.Fatalf("admissions %d and %d were %v apart; one per %v with burst %d allows no less than %v",
					i, j, gap, interval, burst, least)
			}
		}
	}
}

// admissions waits until egressd's debug log (egressdArgs sets -log-level
// debug) has n "admitted" lines for host and returns their times, sorted:
// when its -limit rule let each request or tunnel go upstream. That moment
// is what egressd's pacing promises; when a request then reaches the
// upstream also depends on the network (a SYN can wait seconds for the
// router's neighbour table, which every namespace of the machine shares).
func admissions(t *testing.T, ed *nstest.Process, host string, n int) []time.Time {
	t.Helper()
	var recs []map[string]string
	nstest.WaitFor(t, fmt.Sprintf("%d admissions to %s in egressd's log", n, host), func() bool {
		recs = slices.DeleteFunc(ed.Log("admitted"), func(rec map[string]string) bool { return rec["host"] != host })
		return len(recs) >= n
	})
	require.Len(t, recs, n, "admissions to %s", host)
	times := make([]time.Time, n)
	for i, rec := range recs {
		at, err := time.Parse(time.RFC3339Nano, rec["time"])
		require.NoError(t, err, "the time of %v", rec)
		times[i] = at
	}
	slices.SortFunc(times, time.Time.Compare)
	return times
}

// assertAdmittedFirst checks that the requests reached the upstream only
// after egressd admitted them: with both lists sorted, arrival k comes no
// earlier than admission k, as it must when every arrival follows an
// admission of its own. The log cuts its times to the millisecond, so they
// are never later than the admission itself.
func assertAdmittedFirst(t *testing.T, admitted, arrived []time.Time) {
	t.Helper()
	require.Len(t, arrived, len(admitted), "arrivals at the upstream, one per admission")
	for k := range arrived {
		if arrived[k].Before(admitted[k]) {
			t.Errorf("arrival %d at the upstream (%s) came before admission %d (%s): requests went upstream before the rule let them",
				k, arrived[k].Format(time.StampMicro), k, admitted[k].Format(time.StampMicro))
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
