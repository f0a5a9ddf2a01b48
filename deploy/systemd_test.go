package deploy

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

// TestUnitShape: the unit has what the issue asks of it, so that an edit
// that drops one of them fails here and not on a server.
func TestUnitShape(t *testing.T) {
	u := readUnit(t, unitFile)
	for _, tt := range []struct{ key, want string }{
		{"Type", "notify"},
		{"ExecReload", "kill -HUP $MAINPID"},
		{"AmbientCapabilities", "CAP_NET_ADMIN"},
		{"CapabilityBoundingSet", "CAP_NET_ADMIN"},
		{"RuntimeDirectory", "egressd"},
		{"Restart", "on-failure"},
		{"RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"},
		{"ProtectSystem", "strict"},
		{"NoNewPrivileges", "yes"},
		{"DynamicUser", "yes"},
		{"User", "egressd"},
	} {
		assert.Equal(t, tt.want, u.one(t, "Service", tt.key), tt.key)
	}
	assert.Equal(t, []string{"@system-service", "~@privileged @resources"}, u["Service"]["SystemCallFilter"])
	// It needs the host's network, and a capability held in a user
	// namespace of its own would not reach it.
	for _, key := range []string{"PrivateNetwork", "PrivateUsers", "IPAddressDeny"} {
		assert.NotContains(t, u["Service"], key)
	}
	nofile, err := strconv.Atoi(u.one(t, "Service", "LimitNOFILE"))
	require.NoError(t, err)
	assert.GreaterOrEqual(t, nofile, 65536, "two sockets per tunnel")
	prog, args := u.execStart(t)
	assert.Equal(t, "/usr/local/bin/egressd", prog, "where the unit's header says the binary goes")
	assert.Equal(t, []string{"-config", "/etc/egressd/egressd.yaml"}, args, "where the example config's header says it goes")
}

// TestUnitVerify: `systemd-analyze verify` finds nothing to say about the
// unit, with ExecStart pointing at a freshly built egressd (verify checks
// that the program exists and is executable). The same run on a copy with a
// misspelled directive shows that the check sees mistakes.
func TestUnitVerify(t *testing.T) {
	analyze := requireTool(t, "systemd-analyze", "systemd")
	bin := nstest.Binary(t, "./cmd/egressd")
	text, err := os.ReadFile(unitFile)
	require.NoError(t, err)
	prog, _ := readUnit(t, unitFile).execStart(t)
	shipped := strings.Replace(string(text), "ExecStart="+prog+" ", "ExecStart="+bin+" ", 1)
	require.NotEqual(t, string(text), shipped, "ExecStart not rewritten")

	verify := func(content string) []string {
		path := filepath.Join(t.TempDir(), "egressd.service")
		require.NoError(t, os.WriteFile(path, []byte(content), 0o644))
		cmd := exec.Command(analyze, "verify", "--no-pager", path)
		cmd.Env = append(os.Environ(), "SYSTEMD_LOG_LEVEL=info", "SYSTEMD_LOG_COLOR=0")
		out, err := cmd.CombinedOutput()
		var about []string
		for line := range strings.Lines(string(out)) {
			if strings.Contains(line, "egressd.service") {
				about = append(about, strings.TrimSpace(line))
			} else if strings.TrimSpace(line) != "" {
				t.Logf("systemd-analyze verify, about another unit: %s", strings.TrimSpace(line))
			}
		}
		if err != nil {
			about = append(about, "exit: "+err.Error())
		}
		return about
	}

	assert.Empty(t, verify(shipped), "systemd-analyze verify %s", unitFile)
	bad := strings.Replace(shipped, "ProtectSystem=strict", "ProtectSystem=strict\nProtectSytem=strict", 1)
	assert.NotEmpty(t, slices.DeleteFunc(verify(bad), func(l string) bool { return !strings.Contains(l, "ProtectSytem") }),
		"verify should report the misspelled ProtectSytem=")
}

// overallExposure matches the last line of `systemd-analyze security`.
var overallExposure = regexp.MustCompile(`Overall exposure level for egressd\.service: ([0-9.]+) ([A-Z]+)`)

// TestUnitSecurity: `systemd-analyze security --offline=yes` rates the unit
// OK or better (exposure below 5.0 of 10: OK, SAFE or PERFECT).
func TestUnitSecurity(t *testing.T) {
	analyze := requireTool(t, "systemd-analyze", "systemd")
	out, err := exec.Command(analyze, "security", "--offline=yes", "--no-pager", unitFile).CombinedOutput()
	require.NoError(t, err, "%s", out)
	m := overallExposure.FindStringSubmatch(string(out))
	require.NotNil(t, m, "no overall exposure line in:\n%s", out)
	exposure, err := strconv.ParseFloat(m[1], 64)
	require.NoError(t, err)
	t.Logf("overall exposure level: %s %s", m[1], m[2])
	assert.Contains(t, []string{"OK", "SAFE", "PERFECT"}, m[2], "rating; the details:\n%s", out)
	assert.Less(t, exposure, 5.0)
}

// TestSysusers: systemd-sysusers, run on a scratch root, makes the egressd
// user and group from the sysusers file, without a complaint.
func TestSysusers(t *testing.T) {
	sysusers := requireTool(t, "systemd-sysusers", "systemd")
	root := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(root, "etc"), 0o755))
	f, err := os.Open(sysusersFile)
	require.NoError(t, err)
	defer f.Close()
	cmd := exec.Command(sysusers, "--root="+root, "-")
	cmd.Stdin = f
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	for line := range strings.Lines(string(out)) {
		assert.True(t, strings.HasPrefix(line, "Creating "), "systemd-sysusers says: %s", line)
	}

	passwd := readColonFile(t, filepath.Join(root, "etc/passwd"))
	group := readColonFile(t, filepath.Join(root, "etc/group"))
	require.Contains(t, passwd, "egressd")
	require.Contains(t, group, "egressd")
	user := passwd["egressd"] // name:x:uid:gid:gecos:home:shell
	assert.NotEqual(t, "0", user[2], "not root")
	assert.Equal(t, group["egressd"][2], user[3], "primary group egressd")
	assert.Contains(t, user[6], "nologin")
}

// readColonFile reads a passwd or group file into its lines' fields, by name.
func readColonFile(t *testing.T, path string) map[string][]string {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	m := map[string][]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		m[fields[0]] = fields
	}
	require.NoError(t, sc.Err())
	return m
}

// commentedKey matches a key commented out in the example config:
// "# max-addrs: 1024".
var commentedKey = regexp.MustCompile(`^# ?([a-z][a-z0-9-]*): \S`)

// TestUnitFlagsKnown: every flag of the unit's ExecStart, and every key of
// the example config, set or commented out, is one of egressd's flags.
func TestUnitFlagsKnown(t *testing.T) {
	known := map[string]bool{}
	for _, f := range egressdFlags(t) {
		known[f] = true
	}

	// The admin socket's default place is the unit's RuntimeDirectory.
	u := readUnit(t, unitFile)
	help := egressdHelp(t)
	admin := regexp.MustCompile(`(?m)^  -admin .*\n.*\(default "([^"]+)"\)`).FindStringSubmatch(help)
	require.NotNil(t, admin, "egressd -h shows no default for -admin:\n%s", help)
	assert.Equal(t, "/run/"+u.one(t, "Service", "RuntimeDirectory"), filepath.Dir(admin[1]), "-admin's default %s", admin[1])

	_, args := u.execStart(t)
	for _, a := range args {
		if name, ok := strings.CutPrefix(a, "-"); ok {
			assert.True(t, known[name], "ExecStart uses %s, which egressd -h does not list", a)
		}
	}

	text, err := os.ReadFile(exampleFile)
	require.NoError(t, err)
	var set, commented []string
	for line := range strings.Lines(string(text)) {
		if m := commentedKey.FindStringSubmatch(line); m != nil {
			commented = append(commented, m[1])
		} else if key, _, ok := strings.Cut(line, ":"); ok && !strings.HasPrefix(line, "#") && !strings.HasPrefix(line, " ") {
			set = append(set, key)
		}
	}
	assert.NotEmpty(t, set)
	assert.NotEmpty(t, commented)
	for _, key := range append(set, commented...) {
		assert.True(t, known[key], "%s mentions key %q, which egressd -h does not list", exampleFile, key)
	}
}

// egressdHelp is what `egressd -h` prints.
func egressdHelp(t *testing.T) string {
	t.Helper()
	out, err := exec.Command(nstest.Binary(t, "./cmd/egressd"), "-h").CombinedOutput()
	require.NoError(t, err, "%s", out)
	return string(out)
}

// egressdFlags lists the flags `egressd -h` shows, by name: the keys of its
// config file, and config. -version, the other flag of the command line
// alone, is left out.
func egressdFlags(t *testing.T) []string {
	t.Helper()
	help := egressdHelp(t)
	var flags []string
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`).FindAllStringSubmatch(help, -1) {
		flags = append(flags, m[1])
	}
	require.Contains(t, flags, "config", "egressd -h lists no -config:\n%s", help)
	require.Contains(t, flags, "version", "egressd -h lists no -version:\n%s", help)
	return slices.DeleteFunc(flags, func(f string) bool { return f == "version" })
}

// reloadSentence matches the sentence of a comment that lists the keys a
// reload applies: "... applies [new] limit, allow, ... and grace ...".
var reloadSentence = regexp.MustCompile(`applies (?:new )?((?:[a-z0-9-]+, )*[a-z0-9-]+ and [a-z0-9-]+)\b`)

// TestReloadDocumented: the unit's comment on ExecReload and the example
// config's header name the keys of reloadable.nix as those a reload applies,
// the list TestNixConfigRuns checks against a running egressd.
func TestReloadDocumented(t *testing.T) {
	want := reloadableKeys(t)
	for _, file := range []string{unitFile, exampleFile} {
		text, err := os.ReadFile(file)
		require.NoError(t, err)
		var comments []string
		for line := range strings.Lines(string(text)) {
			if c, ok := strings.CutPrefix(strings.TrimSpace(line), "#"); ok {
				comments = append(comments, strings.TrimSpace(c))
			}
		}
		m := reloadSentence.FindAllStringSubmatch(strings.Join(comments, " "), -1)
		require.Len(t, m, 1, "%s: one comment saying \"applies KEY, ... and KEY\" on reload", file)
		keys := strings.Split(strings.Replace(m[0][1], " and ", ", ", 1), ", ")
		assert.ElementsMatch(t, want, keys, "%s: the keys a reload applies, against %s", file, reloadableNix)
	}
}
