package daemon

import (
	"flag"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/egressd/egressd/internal/admin"
	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func writeFile(t *testing.T, name, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	require.NoError(t, os.WriteFile(path, []byte(body), 0o600))
	return path
}

// withFile returns args preceded by -config naming a file with body, when
// body is not empty.
func withFile(t *testing.T, args []string, body string) []string {
	t.Helper()
	if body == "" {
		return args
	}
	return append([]string{"-config", writeFile(t, "c.yaml", body)}, args...)
}

func TestLoadConfigDefaults(t *testing.T) {
	cfg, err := LoadConfig(nil)
	require.NoError(t, err)
	assert.Equal(t, defaultConfig(), cfg)
	assert.Equal(t, []string{"127.0.0.1:3128"}, cfg.Listen, "not an open proxy by default")
	assert.Equal(t, 1024, cfg.maxAddrs())
	assert.Equal(t, netutil.DefaultBudget, cfg.budget())
	assert.Equal(t, netutil.IPv4Direct, cfg.IPv4)
}

// TestLoadConfigBudget: -new-addrs and -neigh-window from flags and the
// file, in the same syntax as a -limit rule's rate and burst; routed mode
// has no budget and no bound on live addresses unless -max-addrs says so.
func TestLoadConfigBudget(t *testing.T) {
	for _, tt := range []struct {
		name     string
		args     []string
		file     string
		want     netutil.Budget
		maxAddrs int
		text     string // -new-addrs as the flag prints it
		err      string
	}{
		{name: "defaults", want: netutil.Budget{Rate: 5, Burst: 96, Window: time.Minute}, maxAddrs: 1024, text: "5r/s,burst=96"},
		{name: "flags", args: []string{"-new-addrs", "120r/m,burst=10", "-neigh-window", "30s"},
			want: netutil.Budget{Rate: 2, Burst: 10, Window: 30 * time.Second}, maxAddrs: 1024, text: "120r/m,burst=10"},
		{name: "burst left out", args: []string{"-new-addrs", "0.5r/s"}, want: netutil.Budget{Rate: 0.5, Burst: 96, Window: time.Minute}, maxAddrs: 1024, text: "0.5r/s,burst=96"},
		{name: "file", file: "new-addrs: 3600r/h, burst=200\nneigh-window: 2m\nmax-addrs: 2000\n",
			want: netutil.Budget{Rate: 1, Burst: 200, Window: 2 * time.Minute}, maxAddrs: 2000, text: "3600r/h,burst=200"},
		{name: "routed", args: []string{"-mode", "routed", "-new-addrs", "1r/s"}, want: netutil.Budget{}, maxAddrs: noCap, text: "1r/s,burst=96"},
		{name: "routed with max-addrs", args: []string{"-mode", "routed", "-max-addrs", "5000"}, want: netutil.Budget{}, maxAddrs: 5000, text: "5r/s,burst=96"},
		{name: "zero rate", args: []string{"-new-addrs", "0r/s"}, err: `invalid value "0r/s" for flag -new-addrs: "0r/s": rate "0r/s": must be positive`},
		{name: "no unit", args: []string{"-new-addrs", "5"}, err: `rate "5": want Nr/s, Nr/m or Nr/h`},
		{name: "too small", args: []string{"-new-addrs", "0." + strings.Repeat("0", 320) + "1r/h"}, err: "too small"},
		{name: "zero burst", args: []string{"-new-addrs", "5r/s,burst=0"}, err: "want RATE[,burst=N] with N a whole number of at least 1"},
		{name: "bad option", args: []string{"-new-addrs", "5r/s,bust=3"}, err: "want RATE[,burst=N] with N a whole number of at least 1"},
		{name: "too many", args: []string{"-new-addrs", "5r/s,burst=3,wait=1s"}, err: `"5r/s,burst=3,wait=1s": want RATE[,burst=N]`},
		{name: "zero window", args: []string{"-neigh-window", "0s"}, err: "neigh-window 0s: must be positive"},
		{name: "file bad", file: "new-addrs: fast\n", err: `line 1: key "new-addrs": "fast": rate "fast"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := LoadConfig(withFile(t, tt.args, tt.file))
			if tt.err != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, cfg.budget())
			assert.Equal(t, tt.maxAddrs, cfg.maxAddrs())
			assert.Equal(t, tt.text, cfg.NewAddrs.String())
		})
	}
}

func TestLoadConfigIPv4(t *testing.T) {
	tests := []struct {
		name string
		args []string
		file string // config file body, when set
		want netutil.IPv4Policy
	}{
		{name: "default", want: netutil.IPv4Direct},
		{name: "flag deny", args: []string{"-ipv4", "deny"}, want: netutil.IPv4Deny},
		{name: "flag direct", args: []string{"-ipv4", "direct"}, want: netutil.IPv4Direct},
		{name: "file deny", file: "ipv4: deny\n", want: netutil.IPv4Deny},
		{name: "json deny", file: `{"ipv4":"deny"}`, want: netutil.IPv4Deny},
		{name: "flag wins over file", args: []string{"-ipv4", "direct"}, file: "ipv4: deny\n", want: netutil.IPv4Direct},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := withFile(t, tt.args, tt.file)
			cfg, err := LoadConfig(args)
			require.NoError(t, err)
			assert.Equal(t, tt.want, cfg.IPv4)
		})
	}

	// A Config built in code must say which: the zero value is no policy.
	cfg := defaultConfig()
	cfg.IPv4 = ""
	assert.EqualError(t, cfg.Validate(), `ipv4 "": must be direct or deny`)
}

func TestLoadConfigFlags(t *testing.T) {
	cfg, err := LoadConfig([]string{
		"-listen", "127.0.0.1:8080", "-listen", "[::1]:8080",
		"-interface", "eth0", "-prefix", "2001:db8:1:2::7/64",
		"-pin", "2001:db8:1:2::1", "-pin", "2001:db8:1:2::2",
		"-max-addrs", "64", "-ready", "4", "-grace", "5s", "-tunnel-idle", "1m",
		"-log-level", "debug",
		"-limit", "aur.archlinux.org=60r/m,burst=10,concurrency=4,wait=2m", "-limit", "*=10r/s",
		"-admin", "127.0.0.1:9090", "-mode", "routed",
	})
	require.NoError(t, err)
	assert.Equal(t, "routed", cfg.Mode)
	require.Len(t, cfg.Limits, 2)
	assert.Equal(t, "aur.archlinux.org", cfg.Limits[0].Host)
	assert.Equal(t, 10, cfg.Limits[0].Burst)
	assert.Equal(t, 4, cfg.Limits[0].Concurrency)
	assert.Equal(t, 2*time.Minute, cfg.Limits[0].Wait)
	assert.Equal(t, "*", cfg.Limits[1].Host)
	assert.Equal(t, "127.0.0.1:9090", cfg.Admin)
	assert.Equal(t, []string{"127.0.0.1:8080", "[::1]:8080"}, cfg.Listen)
	assert.Equal(t, "eth0", cfg.Interface)
	assert.Equal(t, []netip.Prefix{netip.MustParsePrefix("2001:db8:1:2::/64")}, cfg.Prefixes)
	assert.Equal(t, []netip.Addr{netip.MustParseAddr("2001:db8:1:2::1"), netip.MustParseAddr("2001:db8:1:2::2")}, cfg.Pin)
	assert.Equal(t, 64, cfg.MaxAddrs)
	assert.Equal(t, 4, cfg.Ready)
	assert.Equal(t, 5*time.Second, cfg.Grace)
	assert.Equal(t, time.Minute, cfg.TunnelIdle)
	assert.Equal(t, slog.LevelDebug, cfg.LogLevel)
}

func TestLoadConfigFileAndFlags(t *testing.T) {
	yamlFile := writeFile(t, "egressd.yaml", `
listen:
  - 10.0.5.1:3128
  - 127.0.0.1:3128
interface: br0
allow: [10.0.5.0/24]
prefix: 2001:db8:1:2::/64
pin: [2001:db8:1:2::1]
max-addrs: 256
grace: 10s
limit:
  - aur.archlinux.org=60r/m,burst=10
admin: /run/egressd/other.sock
`)
	// The JSON Nix's builtins.toJSON writes: numbers as numbers, lists as
	// arrays, on one line.
	jsonFile := writeFile(t, "egressd.json", `{"admin":"/run/egressd/other.sock","allow":["10.0.5.0/24"],"grace":"10s","interface":"br0","limit":["aur.archlinux.org=60r/m,burst=10"],"listen":["10.0.5.1:3128","127.0.0.1:3128"],"max-addrs":256,"pin":["2001:db8:1:2::1"],"prefix":"2001:db8:1:2::/64"}`)

	for _, file := range []string{yamlFile, jsonFile} {
		t.Run(filepath.Ext(file), func(t *testing.T) {
			cfg, err := LoadConfig([]string{"-config", file})
			require.NoError(t, err)
			assert.Equal(t, []string{"10.0.5.1:3128", "127.0.0.1:3128"}, cfg.Listen)
			assert.Equal(t, "br0", cfg.Interface)
			assert.Equal(t, 256, cfg.MaxAddrs)
			assert.Equal(t, 10*time.Second, cfg.Grace)
			assert.Equal(t, []netip.Addr{netip.MustParseAddr("2001:db8:1:2::1")}, cfg.Pin)
			assert.Equal(t, defaultConfig().Ready, cfg.Ready, "keys not in the file keep their defaults")
			require.Len(t, cfg.Limits, 1)
			assert.Equal(t, 10, cfg.Limits[0].Burst)
			assert.Equal(t, "/run/egressd/other.sock", cfg.Admin)
			assert.Equal(t, []netip.Prefix{netip.MustParsePrefix("10.0.5.0/24")}, cfg.Allow)

			// A flag wins over the file, and a repeatable flag replaces
			// the file's list rather than adding to it.
			cfg, err = LoadConfig([]string{"-config", file, "-max-addrs", "32", "-listen", "127.0.0.1:9999"})
			require.NoError(t, err)
			assert.Equal(t, 32, cfg.MaxAddrs)
			assert.Equal(t, []string{"127.0.0.1:9999"}, cfg.Listen)
			assert.Equal(t, "br0", cfg.Interface)
		})
	}
}

func TestLoadConfigErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		file string // config file body, when set
		want string
	}{
		{name: "unknown flag", args: []string{"-bogus"}, want: "flag provided but not defined: -bogus"},
		{name: "stray argument", args: []string{"-allow", "127.0.0.0/8", "::1/128", "-rotate", "session"},
			want: `unexpected argument "::1/128": every value needs its flag (-allow A -allow B)`},
		{name: "stray argument first", args: []string{"eth0"}, want: `unexpected argument "eth0"`},
		{name: "stray second value", args: []string{"-allow-dest", "10.0.0.0/8", "10.1.0.0/16"}, want: `unexpected argument "10.1.0.0/16": every value needs its flag (-allow-dest A -allow-dest B)`},
		{name: "stray argument after --", args: []string{"-rotate", "session", "--", "-ready"}, want: `unexpected argument "-ready"`},
		{name: "stray argument with a file", args: []string{"-ready", "2", "x"}, file: "grace: 5s\n", want: `unexpected argument "x"`},
		{name: "version in file", file: "version: true\n", want: `line 1: unknown key "version"`},
		{name: "bad max-addrs", args: []string{"-max-addrs", "lots"}, want: `invalid value "lots" for flag -max-addrs: "lots" is not a whole number`},
		{name: "zero max-addrs", args: []string{"-max-addrs", "0"}, want: "-max-addrs: 0: must be at least 1"},
		{name: "ipv4 prefix", args: []string{"-prefix", "192.0.2.0/24"}, want: `"192.0.2.0/24" is not an IPv6 prefix`},
		{name: "bad prefix", args: []string{"-prefix", "2001:db8::"}, want: "is not a CIDR prefix"},
		{name: "prefix given twice", args: []string{"-prefix", "2001:db8:1:2::/64", "-prefix", "2001:db8:1:2::/64"},
			want: "prefix 2001:db8:1:2::/64 is given twice: give each range of addresses once"},
		{name: "prefix /6 for /64", args: []string{"-prefix", "2001:db8:1:2::/6"},
			want: `invalid value "2001:db8:1:2::/6" for flag -prefix: "2001:db8:1:2::/6" is wider than a /48, the widest prefix egressd takes (a /48 is 65,536 /64s)`},
		{name: "prefix /6 in file", file: "prefix: [2001:db8:1:2::/64, 2001:db8:1:3::/6]\n", want: `line 1: key "prefix": "2001:db8:1:3::/6" is wider than a /48`},
		{name: "two prefixes in one flag", args: []string{"-prefix", "2001:db8:1:2::/64,2001:db8:1:3::/64"},
			want: `"2001:db8:1:2::/64,2001:db8:1:3::/64" is not a CIDR prefix: give one per -prefix (-prefix A -prefix B; in the config file prefix: [A, B])`},
		{name: "two prefixes in one key", file: "prefix: 2001:db8:1:2::/64, 2001:db8:1:3::/64\n", want: `line 1: key "prefix": "2001:db8:1:2::/64, 2001:db8:1:3::/64" is not a CIDR prefix: give one per -prefix`},
		{name: "prefix inside another", file: "prefix: [2001:db8:0:100::/56, 2001:db8:0:1a0::/60]\n",
			want: "prefix 2001:db8:0:1a0::/60 overlaps prefix 2001:db8:0:100::/56"},
		{name: "bad pin", args: []string{"-pin", "nope"}, want: `-pin: ParseAddr("nope")`},
		{name: "bad listen", args: []string{"-listen", "3128"}, want: `"3128" is not host:port`},
		{name: "listen by name", args: []string{"-listen", "example.org:3128"}, want: "host must be an IP address"},
		{name: "bad socks5", args: []string{"-socks5", "1080"}, want: `invalid value "1080" for flag -socks5: "1080" is not host:port`},
		{name: "socks5 by name", args: []string{"-socks5", "localhost.example:1080"}, want: "host must be an IP address"},
		{name: "socks5 port 0", args: []string{"-socks5", "127.0.0.1:0"}, want: "port must be a number from 1 to 65535"},
		{name: "socks5 is listen", args: []string{"-socks5", "127.0.0.1:3128"}, want: "socks5 127.0.0.1:3128: also a listen address"},
		{name: "bad socks5 in file", file: "socks5: \"[::1]\"\n", want: `line 1: key "socks5": "[::1]" is not host:port`},
		{name: "bad duration", args: []string{"-grace", "soon"}, want: `"soon" is not a duration`},
		{name: "bad level", args: []string{"-log-level", "loud"}, want: `"loud" is not one of debug, info, warn, error`},
		{name: "bad ipv4", args: []string{"-ipv4", "allow"}, want: `invalid value "allow" for flag -ipv4: "allow" is not one of direct, deny`},
		{name: "bad ipv4 in file", file: "ipv4: DENY\n", want: `line 1: key "ipv4": "DENY" is not one of direct, deny`},
		{name: "ready over max", args: []string{"-max-addrs", "4", "-ready", "8"}, want: "ready 8: must not exceed max-addrs 4"},
		{name: "bad mode", args: []string{"-mode", "anyip"}, want: `invalid value "anyip" for flag -mode: "anyip" is not one of onlink, routed`},
		{name: "bad limit rate", args: []string{"-limit", "aur.archlinux.org=60r/d"}, want: `limit "aur.archlinux.org=60r/d"`},
		{name: "bad limit option", args: []string{"-limit", "x.org=1r/s,bogus=1"}, want: `bogus`},
		{name: "duplicate limit", args: []string{"-limit", "x.org=1r/s", "-limit", "x.org=2r/s"}, want: "x.org"},
		{name: "bad limit in file", file: "limit: [\"x.org=fast\"]\n", want: `line 1: key "limit"`},
		{name: "missing file", args: []string{"-config", "/nonexistent/egressd.yaml"}, want: "config: open /nonexistent/egressd.yaml"},
		{name: "unknown key", file: "listen: [127.0.0.1:3128]\nmax_addrs: 4\n", want: `line 2: unknown key "max_addrs"`},
		{name: "bad value names key", file: "max-addrs: many\n", want: `line 1: key "max-addrs": "many" is not a whole number`},
		{name: "list for scalar", file: "interface: [a, b]\n", want: `key "interface" takes one value, not a list`},
		{name: "mapping value", file: "pin: {a: b}\n", want: `key "pin": expected a value`},
		{name: "not a mapping", file: "- a\n- b\n", want: "expected a mapping"},
		{name: "config in file", file: "config: other.yaml\n", want: `unknown key "config"`},
		{name: "key twice", file: "listen: [127.0.0.1:3128]\nallow: [10.0.5.0/24]\nlisten: [10.0.5.1:3128]\n", want: `line 3: key "listen" given again (first on line 1)`},
		{name: "key twice in json", file: `{"grace": "5s", "grace": "6s"}`, want: `key "grace" given again`},
		{name: "syntax", file: "listen: [\n", want: "config "},
		{name: "json bad value", file: `{"tunnel-idle": 5}`, want: `key "tunnel-idle": "5" is not a duration`},
		{name: "bad allow", args: []string{"-allow", "10.0.5.0/33"}, want: `invalid value "10.0.5.0/33" for flag -allow: "10.0.5.0/33" is not a CIDR prefix like 10.0.5.0/24 or an address`},
		{name: "bad allow in file", file: "allow: [10.0.5.0/24, bridge]\n", want: `line 1: key "allow": "bridge" is not a CIDR prefix`},
		{name: "open proxy", args: []string{"-listen", "10.0.5.1:3128"}, want: "listen 10.0.5.1:3128 is not a loopback address: give -allow CIDR (the clients' networks) or -auth-file FILE, or egressd would be an open proxy"},
		{name: "open proxy, all addresses", args: []string{"-listen", ":3128"}, want: "listen :3128 is not a loopback address"},
		{name: "open proxy, second listener", args: []string{"-listen", "127.0.0.1:3128", "-listen", "[::]:3128"}, want: "listen [::]:3128 is not a loopback address"},
		{name: "open proxy, socks5", args: []string{"-socks5", "0.0.0.0:1080"}, want: "socks5 0.0.0.0:1080 is not a loopback address"},
		{name: "open proxy in file", file: "listen: [\"10.0.5.1:3128\"]\n", want: "listen 10.0.5.1:3128 is not a loopback address"},
		{name: "bad allow-dest", args: []string{"-allow-dest", "mirror"}, want: `invalid value "mirror" for flag -allow-dest: "mirror" is not a CIDR prefix`},
		{name: "bad connect-ports", args: []string{"-connect-ports", "443,https"}, want: `invalid value "443,https" for flag -connect-ports: "443,https": port "https" is not a number from 1 to 65535`},
		{name: "connect port 0", args: []string{"-connect-ports", "0"}, want: `port "0" is not a number from 1 to 65535`},
		{name: "backward range", args: []string{"-http-ports", "9000-8000"}, want: "range 9000-8000 ends before it starts"},
		{name: "bad ports in file", file: "connect-ports: [443, 70000]\n", want: `line 1: key "connect-ports": "70000": port "70000" is not a number from 1 to 65535`},
		{name: "admin on the network", args: []string{"-admin", "0.0.0.0:9090"}, want: "admin 0.0.0.0:9090 is not a loopback address: the admin API has no authentication, so it listens on a unix socket (a path) or a loopback host:port only"},
		{name: "admin on all addresses", args: []string{"-admin", ":9090"}, want: "admin :9090 is not a loopback address"},
		{name: "admin on a link", file: "admin: \"[2001:db8::2]:9090\"\n", want: "admin [2001:db8::2]:9090 is not a loopback address"},
		{name: "zero max-conns", args: []string{"-max-conns", "0"}, want: "invalid value \"0\" for flag -max-conns: 0: must be at least 1"},
		{name: "bad max-conns-per-client", file: "max-conns-per-client: many\n", want: `line 1: key "max-conns-per-client": "many" is not a whole number`},
		{name: "zero max-addrs-per-client", args: []string{"-max-addrs-per-client", "0"}, want: "-max-addrs-per-client: 0: must be at least 1"},
		{name: "zero client-timeout", args: []string{"-client-timeout", "0s"}, want: "client-timeout 0s: must be positive"},
		{name: "bad client-timeout", args: []string{"-client-timeout", "soon"}, want: `invalid value "soon" for flag -client-timeout: "soon" is not a duration`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := withFile(t, tt.args, tt.file)
			_, err := LoadConfig(args)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
			assert.NotContains(t, err.Error(), "\n", "errors are one line")
		})
	}
}

// TestLoadConfigVersion: -version wins over everything else on the command
// line, even a stray argument or a bad file, so that it always answers.
func TestLoadConfigVersion(t *testing.T) {
	for _, args := range [][]string{
		{"-version"},
		{"-version=true"},
		{"-rotate", "session", "-version", "stray"},
		{"-config", "/nonexistent/egressd.yaml", "-version"},
	} {
		_, err := LoadConfig(args)
		assert.ErrorIs(t, err, ErrVersion, "%q", args)
	}
	cfg, err := LoadConfig([]string{"-version=false", "-ready", "2"})
	require.NoError(t, err)
	assert.Equal(t, 2, cfg.Ready)
}

func TestLoadConfigSOCKS5(t *testing.T) {
	cfg, err := LoadConfig(nil)
	require.NoError(t, err)
	assert.Empty(t, cfg.SOCKS5, "SOCKS5 is off by default")

	cfg, err = LoadConfig([]string{"-socks5", "127.0.0.1:1080"})
	require.NoError(t, err)
	assert.Equal(t, "127.0.0.1:1080", cfg.SOCKS5)

	file := writeFile(t, "egressd.yaml", "socks5: \"[::1]:1080\"\n")
	cfg, err = LoadConfig([]string{"-config", file})
	require.NoError(t, err)
	assert.Equal(t, "[::1]:1080", cfg.SOCKS5)
	cfg, err = LoadConfig([]string{"-config", file, "-socks5", ""})
	require.NoError(t, err)
	assert.Empty(t, cfg.SOCKS5, "an empty flag turns off what the file set")
}

func TestLoadConfigRotate(t *testing.T) {
	tests := []struct {
		name   string
		args   []string
		file   string // config file body, when set
		rotate proxy.Rotate
		idle   time.Duration
		err    string
	}{
		{name: "default", rotate: proxy.RotateRequest, idle: 10 * time.Minute},
		{name: "flag session", args: []string{"-rotate", "session", "-session-idle", "1s"}, rotate: proxy.RotateSession, idle: time.Second},
		{name: "flag connection", args: []string{"-rotate", "connection"}, rotate: proxy.RotateConnection, idle: 10 * time.Minute},
		{name: "file", file: "rotate: session\nsession-idle: 90s\n", rotate: proxy.RotateSession, idle: 90 * time.Second},
		{name: "flag wins over file", args: []string{"-rotate", "request"}, file: "rotate: session\n", rotate: proxy.RotateRequest, idle: 10 * time.Minute},
		{name: "bad rotate", args: []string{"-rotate", "hourly"}, err: `invalid value "hourly" for flag -rotate: "hourly" is not one of request, connection, session`},
		{name: "bad rotate in file", file: "rotate: always\n", err: `line 1: key "rotate": "always" is not one of request, connection, session`},
		{name: "zero idle", args: []string{"-session-idle", "0s"}, err: "session-idle 0s: must be positive"},
		{name: "bad idle", args: []string{"-session-idle", "soon"}, err: `"soon" is not a duration`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := withFile(t, tt.args, tt.file)
			cfg, err := LoadConfig(args)
			if tt.err != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.rotate, cfg.Rotate)
			assert.Equal(t, tt.idle, cfg.SessionIdle)
		})
	}
}

// TestLoadConfigRotateOn: -rotate-on is a list of HTTP statuses, from the
// flag or the config key, for -rotate session only; a bad one is a
// one-line error naming it.
func TestLoadConfigRotateOn(t *testing.T) {
	tests := []struct {
		name string
		args []string
		file string
		want Statuses
		err  string
	}{
		{name: "default", args: []string{"-rotate", "session"}},
		{name: "flag", args: []string{"-rotate", "session", "-rotate-on", "403,429"}, want: Statuses{403, 429}},
		{name: "spaces and repeats", args: []string{"-rotate", "session", "-rotate-on", " 429 , 403,429"}, want: Statuses{429, 403}},
		{name: "file", file: "rotate: session\nrotate-on: 429\n", want: Statuses{429}},
		{name: "file list as text", file: "rotate: session\nrotate-on: \"403,429\"\n", want: Statuses{403, 429}},
		{name: "file list", file: "rotate: session\nrotate-on: [403, 429]\n", want: Statuses{403, 429}},
		{name: "flag repeated", args: []string{"-rotate", "session", "-rotate-on", "403", "-rotate-on", "429,403"}, want: Statuses{403, 429}},
		{name: "flag replaces the file's list", args: []string{"-rotate-on", "503"}, file: "rotate: session\nrotate-on: [403, 429]\n", want: Statuses{503}},
		{name: "a redirect", args: []string{"-rotate", "session", "-rotate-on", "302"}, want: Statuses{302}},
		{name: "a success", args: []string{"-rotate", "session", "-rotate-on", "200"},
			err: `invalid value "200" for flag -rotate-on: "200" is not a refusal (300-599): the session would move after every answer; want a list like 403,429`},
		{name: "a success in a list", file: "rotate: session\nrotate-on: [429, 204]\n", err: `line 2: key "rotate-on": "204" is not a refusal (300-599)`},
		{name: "two digits", args: []string{"-rotate", "session", "-rotate-on", "42"}, err: `invalid value "42" for flag -rotate-on: "42" is not an HTTP status (100-599); want a list like 403,429`},
		{name: "empty flag turns the file's off", args: []string{"-rotate-on", ""}, file: "rotate: session\nrotate-on: 429\n"},
		{name: "not a number", args: []string{"-rotate", "session", "-rotate-on", "403,often"},
			err: `invalid value "403,often" for flag -rotate-on: "403,often": "often" is not an HTTP status (100-599); want a list like 403,429`},
		{name: "too low", args: []string{"-rotate", "session", "-rotate-on", "99"}, err: `"99" is not an HTTP status (100-599)`},
		{name: "too high", args: []string{"-rotate", "session", "-rotate-on", "600"}, err: `"600" is not an HTTP status (100-599)`},
		{name: "empty item", args: []string{"-rotate", "session", "-rotate-on", "403,,429"}, err: `"" is not an HTTP status`},
		{name: "in file", file: "rotate: session\nrotate-on: 4290\n", err: `line 2: key "rotate-on": "4290" is not an HTTP status (100-599)`},
		{name: "without sessions", args: []string{"-rotate-on", "429"},
			err: "rotate-on 429: needs -rotate session (only a session holds an address to give up), not -rotate request"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := LoadConfig(withFile(t, tt.args, tt.file))
			if tt.err != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.err)
				assert.NotContains(t, err.Error(), "\n")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, cfg.RotateOn)
		})
	}
}

func TestEmptyConfigFile(t *testing.T) {
	cfg, err := LoadConfig([]string{"-config", writeFile(t, "empty.yaml", "")})
	require.NoError(t, err)
	assert.Equal(t, defaultConfig().Listen, cfg.Listen)
}

func TestUsageListsEveryFlag(t *testing.T) {
	var names []string
	flagSet(&Config{}).VisitAll(func(f *flag.Flag) { names = append(names, f.Name) })
	assert.Equal(t, strings.Fields("admin allow allow-dest auth-file client-timeout config connect-ports dial-timeout grace http-ports interface ipv4 limit limit-store listen log-level max-addrs max-addrs-per-client max-conns max-conns-per-client mode neigh-window new-addrs pin prefix ready rotate rotate-on session-idle socks5 tunnel-idle"), names)
}

// TestLoadConfigDest: the destination settings from flags and the file,
// with their defaults; a flag replaces the file's list.
func TestLoadConfigDest(t *testing.T) {
	cfg, err := LoadConfig(nil)
	require.NoError(t, err)
	assert.Equal(t, "443,80", cfg.ConnectPorts.String())
	assert.Equal(t, "80,443,1024-65535", cfg.HTTPPorts.String())
	assert.Empty(t, cfg.AllowDest)

	for _, tt := range []struct {
		name, file    string
		args          []string
		connect, http string
		allowDest     []string
		admin         string
	}{
		{name: "flags", args: []string{"-connect-ports", "443,8443", "-connect-ports", "22", "-http-ports", "80", "-allow-dest", "10.0.5.7", "-allow-dest", "fd00::/8", "-admin", "127.0.0.1:9090"},
			connect: "443,8443,22", http: "80", allowDest: []string{"10.0.5.7/32", "fd00::/8"}, admin: "127.0.0.1:9090"},
		{name: "file lists", file: "connect-ports: [443, 8443]\nhttp-ports: \"80,8000-8999\"\nallow-dest: [10.0.0.0/8]\nadmin: \"[::1]:9090\"\n",
			connect: "443,8443", http: "80,8000-8999", allowDest: []string{"10.0.0.0/8"}, admin: "[::1]:9090"},
		{name: "json", file: `{"connect-ports":[443,5222],"allow-dest":["100.64.0.0/10"]}`,
			connect: "443,5222", http: "80,443,1024-65535", allowDest: []string{"100.64.0.0/10"}, admin: admin.DefaultAddr},
		{name: "flag over file", file: "connect-ports: [443, 8443]\n", args: []string{"-connect-ports", "443"},
			connect: "443", http: "80,443,1024-65535", admin: admin.DefaultAddr},
		{name: "admin path", args: []string{"-admin", "/tmp/egressd.sock"}, connect: "443,80", http: "80,443,1024-65535", admin: "/tmp/egressd.sock"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := LoadConfig(withFile(t, tt.args, tt.file))
			require.NoError(t, err)
			assert.Equal(t, tt.connect, cfg.ConnectPorts.String())
			assert.Equal(t, tt.http, cfg.HTTPPorts.String())
			var dest []string
			for _, p := range cfg.AllowDest {
				dest = append(dest, p.String())
			}
			assert.Equal(t, tt.allowDest, dest)
			assert.Equal(t, tt.admin, cfg.Admin)
		})
	}
}

func TestLoadConfigAccess(t *testing.T) {
	p := netip.MustParsePrefix
	tests := []struct {
		name     string
		args     []string
		file     string // config file body, when set
		allow    []netip.Prefix
		authFile string
	}{
		{name: "default: loopback only", allow: nil},
		{name: "flags", args: []string{"-allow", "10.0.5.0/24", "-allow", "fd00:5::/64", "-allow", "192.0.2.7"},
			allow: []netip.Prefix{p("10.0.5.0/24"), p("fd00:5::/64"), p("192.0.2.7/32")}},
		{name: "host bits dropped", args: []string{"-allow", "10.0.5.1/24"}, allow: []netip.Prefix{p("10.0.5.0/24")}},
		{name: "file", file: "allow: [10.0.5.0/24]\nauth-file: /etc/egressd/users\n",
			allow: []netip.Prefix{p("10.0.5.0/24")}, authFile: "/etc/egressd/users"},
		{name: "json as the NixOS module writes it", file: `{"allow":["10.0.5.0/24"],"auth-file":"/run/secrets/egressd","listen":["10.0.5.1:3128"]}`,
			allow: []netip.Prefix{p("10.0.5.0/24")}, authFile: "/run/secrets/egressd"},
		{name: "flag replaces file's list", args: []string{"-allow", "10.0.6.0/24"}, file: "allow: [10.0.5.0/24]\n",
			allow: []netip.Prefix{p("10.0.6.0/24")}},
		{name: "off loopback with allow", args: []string{"-listen", "10.0.5.1:3128", "-socks5", "10.0.5.1:1080", "-allow", "10.0.5.0/24"},
			allow: []netip.Prefix{p("10.0.5.0/24")}},
		{name: "off loopback with auth", args: []string{"-listen", "[::]:3128", "-auth-file", "/etc/egressd/users"}, authFile: "/etc/egressd/users"},
		{name: "loopback by name", args: []string{"-listen", "localhost:3128", "-listen", "[::1]:3128", "-listen", "127.0.0.2:3128"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := LoadConfig(withFile(t, tt.args, tt.file))
			require.NoError(t, err)
			assert.Equal(t, tt.allow, cfg.Allow)
			assert.Equal(t, tt.authFile, cfg.AuthFile)
		})
	}

	// What is admitted: -allow; else anyone who authenticates; else loopback.
	for _, tt := range []struct {
		args []string
		want string
	}{
		{nil, "127.0.0.0/8,::1/128"},
		{[]string{"-auth-file", "/etc/egressd/users"}, "0.0.0.0/0,::/0"},
		{[]string{"-auth-file", "/etc/egressd/users", "-allow", "10.0.5.0/24"}, "10.0.5.0/24"},
		{[]string{"-allow", "10.0.5.0/24"}, "10.0.5.0/24"},
	} {
		cfg, err := LoadConfig(tt.args)
		require.NoError(t, err)
		assert.Equal(t, tt.want, allowList(cfg.allowed()), "%v", tt.args)
	}
}

// TestLoadConfigLimits: the client limits and timeout from flags and the
// file, with their defaults; -max-addrs-per-client defaults to a quarter of
// -max-addrs, at least 1.
func TestLoadConfigLimits(t *testing.T) {
	for _, tt := range []struct {
		name    string
		args    []string
		file    string
		want    proxy.Limits
		timeout time.Duration
	}{
		{name: "defaults", want: proxy.Limits{MaxConns: 16384, MaxConnsPerClient: 4096, MaxAddrsPerClient: 256}, timeout: 30 * time.Second},
		{name: "a quarter of max-addrs", args: []string{"-max-addrs", "100"}, want: proxy.Limits{MaxConns: 16384, MaxConnsPerClient: 4096, MaxAddrsPerClient: 25}, timeout: 30 * time.Second},
		{name: "at least 1", args: []string{"-max-addrs", "3", "-ready", "1"}, want: proxy.Limits{MaxConns: 16384, MaxConnsPerClient: 4096, MaxAddrsPerClient: 1}, timeout: 30 * time.Second},
		{name: "routed: no address cap", args: []string{"-mode", "routed"}, want: proxy.Limits{MaxConns: 16384, MaxConnsPerClient: 4096, MaxAddrsPerClient: noCap}, timeout: 30 * time.Second},
		{name: "routed with max-addrs", args: []string{"-mode", "routed", "-max-addrs", "2000"}, want: proxy.Limits{MaxConns: 16384, MaxConnsPerClient: 4096, MaxAddrsPerClient: 500}, timeout: 30 * time.Second},
		{name: "a quarter of max-conns", args: []string{"-max-conns", "100"}, want: proxy.Limits{MaxConns: 100, MaxConnsPerClient: 25, MaxAddrsPerClient: 256}, timeout: 30 * time.Second},
		{name: "flags", args: []string{"-max-conns", "500", "-max-conns-per-client", "50", "-max-addrs-per-client", "7", "-client-timeout", "5s"},
			want: proxy.Limits{MaxConns: 500, MaxConnsPerClient: 50, MaxAddrsPerClient: 7}, timeout: 5 * time.Second},
		{name: "file", file: "max-conns: 600\nmax-conns-per-client: 60\nmax-addrs-per-client: 8\nclient-timeout: 1m\n",
			want: proxy.Limits{MaxConns: 600, MaxConnsPerClient: 60, MaxAddrsPerClient: 8}, timeout: time.Minute},
		{name: "json", file: `{"max-conns":700,"client-timeout":"2s"}`,
			want: proxy.Limits{MaxConns: 700, MaxConnsPerClient: 175, MaxAddrsPerClient: 256}, timeout: 2 * time.Second},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := LoadConfig(withFile(t, tt.args, tt.file))
			require.NoError(t, err)
			assert.Equal(t, tt.want, cfg.limits())
			assert.Equal(t, tt.timeout, cfg.ClientTimeout)
		})
	}
}

// TestLoadConfigLimitStore: -limit-store from a flag or the file; a bad URL
// is a one-line error naming the flag and never the password, and the
// flag prints the URL without it.
func TestLoadConfigLimitStore(t *testing.T) {
	const secret = "s3cret-Pa55"
	for _, tt := range []struct {
		name string
		args []string
		file string
		want string // the URL as the flag prints it
		err  string
	}{
		{name: "default"},
		{name: "flag", args: []string{"-limit-store", "redis://:" + secret + "@10.0.0.5:6379/2"}, want: "redis://:xxxxx@10.0.0.5:6379/2"},
		{name: "file", file: "limit-store: rediss://egressd:" + secret + "@[2001:db8::5]/0\n", want: "rediss://egressd:xxxxx@[2001:db8::5]/0"},
		{name: "flag over file", args: []string{"-limit-store", "redis://store.test"}, file: "limit-store: redis://other.test\n", want: "redis://store.test"},
		{name: "empty turns it off", args: []string{"-limit-store", ""}, file: "limit-store: redis://other.test\n"},
		{name: "scheme", args: []string{"-limit-store", "http://:" + secret + "@store.test"}, err: `limit-store: scheme "http": want redis://`},
		{name: "port", args: []string{"-limit-store", "redis://:" + secret + "@store.test:0"}, err: `limit-store: port "0"`},
		{name: "database", args: []string{"-limit-store", "redis://:" + secret + "@store.test/db1"}, err: `limit-store: database "db1"`},
		{name: "bad escape", args: []string{"-limit-store", "redis://:" + secret + "%zz@store.test"}, err: "limit-store: not a URL (a bad %-escape)"},
		{name: "file bad", file: "limit-store: \"redis://:" + secret + "@store.test?x=1\"\n", err: "limit-store: no query or fragment allowed"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := LoadConfig(withFile(t, tt.args, tt.file))
			if tt.err != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.err)
				assert.NotContains(t, err.Error(), secret)
				assert.NotContains(t, err.Error(), "\n")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, flagSet(&cfg).Lookup("limit-store").Value.String())
			assert.Equal(t, tt.want == "", cfg.LimitStore == "")
		})
	}
}

// TestLoadConfigPrefixes: -prefix is repeatable, and the config key takes a
// list or one value; a prefix shorter than /64 is kept whole (the pool
// spreads over its /64s).
func TestLoadConfigPrefixes(t *testing.T) {
	p := netip.MustParsePrefix
	for _, tt := range []struct {
		name string
		args []string
		file string
		want []netip.Prefix
	}{
		{name: "none", want: nil},
		{name: "one", args: []string{"-prefix", "2001:db8:1:2::/64"}, want: []netip.Prefix{p("2001:db8:1:2::/64")}},
		{name: "a /56 and a /64", args: []string{"-prefix", "2001:db8:0:100::/56", "-prefix", "2001:db8:5:5::/64"},
			want: []netip.Prefix{p("2001:db8:0:100::/56"), p("2001:db8:5:5::/64")}},
		{name: "a list in the file", file: "prefix: [2001:db8:1:2::/64, 2001:db8:5:5::/64]\n",
			want: []netip.Prefix{p("2001:db8:1:2::/64"), p("2001:db8:5:5::/64")}},
		{name: "one value in the file", file: "prefix: 2001:db8:0:100::/56\n", want: []netip.Prefix{p("2001:db8:0:100::/56")}},
		{name: "a /48, the widest", args: []string{"-prefix", "2001:db8:7::/48"}, want: []netip.Prefix{p("2001:db8:7::/48")}},
		{name: "flags replace the file's list", file: "prefix: [2001:db8:1:2::/64, 2001:db8:5:5::/64]\n",
			args: []string{"-prefix", "2001:db8:9:9::/64"}, want: []netip.Prefix{p("2001:db8:9:9::/64")}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			args := tt.args
			if tt.file != "" {
				args = append([]string{"-config", writeFile(t, "egressd.yaml", tt.file)}, args...)
			}
			cfg, err := LoadConfig(args)
			require.NoError(t, err)
			assert.Equal(t, tt.want, cfg.Prefixes)
		})
	}
}
