package deploy

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
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
)

// nix runs a Nix command with the dummy store, which evaluates and parses
// without a daemon and without reading or writing /nix, and with a scratch
// HOME for anything Nix caches. It returns standard output; the error
// carries standard error.
func nix(t testing.TB, name string, args ...string) (string, error) {
	t.Helper()
	path := requireTool(t, name, "nix-bin")
	cmd := exec.Command(path, append([]string{"--store", "dummy://"}, args...)...)
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir(), "XDG_CACHE_HOME="+t.TempDir())
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// nixEval evaluates expr (in this package's directory, so that
// ./nixos/settings.nix resolves) strictly and decodes its JSON into v.
func nixEval(t testing.TB, expr string, v any) {
	t.Helper()
	out, err := nix(t, "nix-instantiate", "--eval", "--strict", "--json", "-E", expr)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal([]byte(out), v), "%s", out)
}

// nixConfigFile is the config file the NixOS module writes for the module
// options in args (a Nix attribute set without its braces):
// builtins.toJSON of settings.nix, byte for byte.
func nixConfigFile(t testing.TB, args string) string {
	t.Helper()
	var s string
	nixEval(t, "builtins.toJSON (import ./"+settingsNix+" { "+args+" })", &s)
	return s
}

// reloadableKeys is the list in reloadable.nix: the config keys a reload
// applies.
func reloadableKeys(t testing.TB) []string {
	t.Helper()
	var keys []string
	nixEval(t, "import ./"+reloadableNix, &keys)
	require.NotEmpty(t, keys)
	return keys
}

// TestNixParse: every .nix file of the repository parses (CI's check), and a
// broken one does not, so that the check can fail.
func TestNixParse(t *testing.T) {
	var files []string
	require.NoError(t, filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "bin") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(path, ".nix") {
			files = append(files, path)
		}
		return nil
	}))
	for _, want := range []string{"module.nix", "package.nix", "settings.nix", "service.nix", "reloadable.nix"} {
		assert.Contains(t, files, filepath.Join("..", "deploy", "nixos", want))
	}
	for _, f := range files {
		_, err := nix(t, "nix-instantiate", "--parse", f)
		assert.NoError(t, err, f)
	}

	broken := filepath.Join(t.TempDir(), "broken.nix")
	require.NoError(t, os.WriteFile(broken, []byte("{ lib, ... }: { x = lib.mkIf cfg.enable { }; }\n"), 0o644))
	_, err := nix(t, "nix-instantiate", "--parse", broken)
	assert.ErrorContains(t, err, "undefined variable 'cfg'")
}

// TestNixSettings: settings.nix turns the module's options into egressd's
// config keys: unset options (null, empty lists) are left out for egressd's
// defaults, settings wins over the typed options, and a null in settings
// removes a key.
func TestNixSettings(t *testing.T) {
	// What the module passes when only enable is set: its defaults.
	const defaults = `interface = null; prefix = null; mode = "onlink"; listen = [ "127.0.0.1:3128" ]; allow = [ ]; limits = [ ]; authFile = null; settings = { };`
	for _, tt := range []struct {
		name, args, want string
	}{
		{
			name: "module defaults",
			args: defaults,
			want: `{"listen":["127.0.0.1:3128"],"mode":"onlink"}`,
		},
		{
			name: "every option",
			args: `interface = "br0"; prefix = "2001:db8:1:2::/64"; mode = "routed"; listen = [ "127.0.0.1:3128" "10.0.5.1:3128" ];
				allow = [ "10.0.5.0/24" ]; limits = [ "aur.archlinux.org=60r/m,burst=10" "*=10r/s" ]; authFile = "/run/secrets/htpasswd";
				settings = { max-addrs = 512; rotate = "session"; };`,
			want: `{"allow":["10.0.5.0/24"],"auth-file":"/run/secrets/htpasswd","interface":"br0",` +
				`"limit":["aur.archlinux.org=60r/m,burst=10","*=10r/s"],"listen":["127.0.0.1:3128","10.0.5.1:3128"],` +
				`"max-addrs":512,"mode":"routed","prefix":"2001:db8:1:2::/64","rotate":"session"}`,
		},
		{
			name: "settings win, null removes",
			args: strings.Replace(defaults, "settings = { };", `settings = { listen = [ "[::1]:3128" ]; mode = null; socks5 = "127.0.0.1:1080"; };`, 1),
			want: `{"listen":["[::1]:3128"],"socks5":"127.0.0.1:1080"}`,
		},
		{
			name: "nothing given",
			args: ``,
			want: `{}`,
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, nixConfigFile(t, tt.args))
		})
	}
}

// TestNixServiceMatchesUnit: the module's serviceConfig (service.nix) and
// the unit file say the same, directive for directive, but for ExecStart
// and ExecReload, whose paths differ. Values are compared as NixOS writes
// them: a list is one line per element, true is "true" (systemd reads
// "yes" and "true" alike).
func TestNixServiceMatchesUnit(t *testing.T) {
	var nixCfg map[string]any
	nixEval(t, "import ./"+serviceNix, &nixCfg)
	unitCfg := readUnit(t, unitFile)["Service"]
	require.NotEmpty(t, unitCfg)

	render := func(v any) []string {
		switch v := v.(type) {
		case bool:
			return []string{strconv.FormatBool(v)}
		case float64: // JSON numbers
			return []string{strconv.FormatFloat(v, 'f', -1, 64)}
		case string:
			return []string{v}
		case []any:
			var out []string
			for _, x := range v {
				out = append(out, fmt.Sprint(x))
			}
			return out
		}
		t.Fatalf("service.nix: value %v of type %T", v, v)
		return nil
	}
	normalize := func(vals []string) []string {
		out := slices.Clone(vals)
		for i, v := range out {
			switch v {
			case "yes":
				out[i] = "true"
			case "no":
				out[i] = "false"
			}
		}
		return out
	}
	for key, vals := range unitCfg {
		if key == "ExecStart" || key == "ExecReload" {
			assert.NotContains(t, nixCfg, key, "the module sets %s itself", key)
			continue
		}
		if assert.Contains(t, nixCfg, key, "%s is in the unit, not in service.nix", key) {
			assert.Equal(t, normalize(vals), render(nixCfg[key]), key)
		}
	}
	for key := range nixCfg {
		assert.Contains(t, unitCfg, key, "%s is in service.nix, not in the unit", key)
	}
}

// vendorHash matches package.nix's vendorHash line.
var vendorHash = regexp.MustCompile(`(?m)^\s*vendorHash = "(sha256-[A-Za-z0-9+/=]+)";`)

// TestVendorHash: package.nix's vendorHash is what buildGoModule will find:
// the NAR hash (SHA-256, SRI form) of `go mod vendor` of this module. When
// go.mod or go.sum change, it fails with the new value.
func TestVendorHash(t *testing.T) {
	text, err := os.ReadFile(packageNix)
	require.NoError(t, err)
	m := vendorHash.FindSubmatch(text)
	require.NotNil(t, m, "%s has no vendorHash = \"sha256-…\"; line", packageNix)
	nixHash := requireTool(t, "nix-hash", "nix-bin")

	dir := filepath.Join(t.TempDir(), "vendor")
	cmd := exec.Command("go", "mod", "vendor", "-o", dir)
	cmd.Dir = ".." // the module's root
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "go mod vendor: %s", out)
	// nix-hash 2.8 prints base16 only; SRI is base64 of the same bytes.
	out, err = exec.Command(nixHash, "--type", "sha256", dir).Output()
	require.NoError(t, err)
	sum, err := hex.DecodeString(strings.TrimSpace(string(out)))
	require.NoError(t, err, "nix-hash printed %q", out)
	want := "sha256-" + base64.StdEncoding.EncodeToString(sum)

	assert.Equal(t, want, string(m[1]), "go.mod/go.sum changed: set vendorHash = %q; in %s", want, packageNix)
}

// TestNixPackage: package.nix builds egressd and egressctl static, as `make
// build` does: env.CGO_ENABLED = 0. It is evaluated with a buildGoModule
// that returns its arguments, so no nixpkgs is needed.
func TestNixPackage(t *testing.T) {
	var pkg struct {
		SubPackages []string `json:"subPackages"`
		Env         struct {
			CGOEnabled *int `json:"CGO_ENABLED"`
		} `json:"env"`
	}
	nixEval(t, `let args = import ./`+packageNix+` {
		lib = { cleanSource = s: s; cleanSourceWith = a: a.src; platforms.linux = [ ]; };
		buildGoModule = a: a;
	}; in { inherit (args) subPackages; env = args.env or { }; }`, &pkg)
	assert.Equal(t, []string{"cmd/egressd", "cmd/egressctl"}, pkg.SubPackages)
	if assert.NotNil(t, pkg.Env.CGOEnabled, "%s sets no env.CGO_ENABLED", packageNix) {
		assert.Zero(t, *pkg.Env.CGOEnabled, "%s: env.CGO_ENABLED", packageNix)
	}
}
