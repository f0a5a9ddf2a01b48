package deploy

import (
	"bufio"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

// The files under test, relative to this package's directory.
const (
	unitFile      = "systemd/egressd.service"
	exampleFile   = "systemd/egressd.yaml"
	sysusersFile  = "systemd/egressd.sysusers"
	settingsNix   = "nixos/settings.nix"
	serviceNix    = "nixos/service.nix"
	packageNix    = "nixos/package.nix"
	reloadableNix = "nixos/reloadable.nix"
)

// TestMain builds egressd and egressctl once, into a directory every user
// may read (egressd also runs as an unprivileged user here); tests find them
// with nstest.Binary.
func TestMain(m *testing.M) {
	os.Exit(nstest.Main(m, "./cmd/egressd", "./cmd/egressctl"))
}

// requireTool returns the path of a program the test needs. Outside CI a
// missing program skips the test with the Debian package to install; under
// CI (the CI variable set) it fails, so that a runner without it cannot pass
// by skipping.
func requireTool(t testing.TB, name, debPkg string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI is set but %s is not installed (Debian package %s; .ci/run installs it)", name, debPkg)
		}
		t.Skipf("skipping: %s is not installed (Debian package %s)", name, debPkg)
	}
	return path
}

// unit is a parsed systemd unit file: the values of each key, by section, in
// file order.
type unit map[string]map[string][]string

// readUnit parses a unit file as systemd does for what these files use:
// sections, Key=Value lines, comments starting with # or ;. A continuation
// line (ending in a backslash) is an error, so that nothing is misread.
func readUnit(t testing.TB, path string) unit {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	u := unit{}
	section := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
			continue
		case strings.HasSuffix(line, `\`):
			t.Fatalf("%s:%d: continuation lines are not supported here", path, n)
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			if u[section] == nil {
				u[section] = map[string][]string{}
			}
			continue
		}
		key, val, ok := strings.Cut(line, "=")
		require.True(t, ok, "%s:%d: not Key=Value: %q", path, n, line)
		require.NotEmpty(t, section, "%s:%d: key outside a section", path, n)
		key, val = strings.TrimSpace(key), strings.TrimSpace(val)
		u[section][key] = append(u[section][key], val)
	}
	require.NoError(t, sc.Err())
	return u
}

// one returns the single value of a key, failing the test when the key is
// missing or given more than once.
func (u unit) one(t testing.TB, section, key string) string {
	t.Helper()
	vals := u[section][key]
	require.Len(t, vals, 1, "[%s] %s", section, key)
	return vals[0]
}

// execStart returns the unit's ExecStart as a program and its arguments.
// The unit quotes nothing, so splitting on white space is exact.
func (u unit) execStart(t testing.TB) (string, []string) {
	t.Helper()
	fields := strings.Fields(u.one(t, "Service", "ExecStart"))
	require.NotEmpty(t, fields)
	for _, f := range fields {
		require.NotContains(t, f, `"`, "ExecStart with quoting: parse it properly")
		require.NotContains(t, f, "%", "ExecStart with specifiers: expand them")
		require.NotContains(t, f, "$", "ExecStart with variables: expand them")
	}
	return fields[0], fields[1:]
}
