package daemon

import (
	"flag"
	"github.com/egressd/egressd/proxy"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// FuzzLoadConfig feeds config files through LoadConfig (the seeds, in
// testdata/fuzz, are the README's and the systemd unit's examples, JSON as
// Nix writes it, and broken files). It either returns a one-line error that
// names a line of the file and the key at fault (a YAML syntax error names
// what the YAML parser can), or a key when Validate refuses the whole; or a
// Config that Validate accepts, which written out as a file again loads as
// the same Config.
func FuzzLoadConfig(f *testing.F) {
	dir := f.TempDir()
	path := filepath.Join(dir, "egressd.yaml")
	fileErr := regexp.MustCompile(`^line [1-9][0-9]*: (unknown key "|key "|expected a mapping)`)
	f.Fuzz(func(t *testing.T, file []byte) {
		if err := os.WriteFile(path, file, 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := LoadConfig([]string{"-config", path})
		if err != nil {
			msg := err.Error()
			if strings.Contains(msg, "\n") {
				t.Fatalf("error of more than one line: %q", msg)
			}
			if rest, ok := strings.CutPrefix(msg, "config "+path+": "); ok {
				if !strings.HasPrefix(rest, "yaml: ") && !fileErr.MatchString(rest) {
					t.Fatalf("error %q names no line and key", msg)
				}
				return
			}
			key, _, _ := strings.Cut(msg, " ")
			if flagSet(new(Config)).Lookup(strings.TrimSuffix(key, ":")) == nil {
				t.Fatalf("error %q names no key", msg)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("loaded a Config that Validate refuses: %v", err)
		}

		again := filepath.Join(dir, "again.yaml")
		out := configFile(t, cfg)
		if err := os.WriteFile(again, out, 0o600); err != nil {
			t.Fatal(err)
		}
		cfg2, err := LoadConfig([]string{"-config", again})
		if err != nil {
			t.Fatalf("%+v written as\n%s\ndoes not load: %v", cfg, out, err)
		}
		cfg.args, cfg.File, cfg2.args, cfg2.File = nil, "", nil, ""
		if !reflect.DeepEqual(cfg, cfg2) {
			t.Fatalf("%+v written as\n%s\nloads as %+v", cfg, out, cfg2)
		}
	})
}

// configFile writes cfg as a config file with every key but config.
func configFile(t *testing.T, cfg Config) []byte {
	t.Helper()
	strs := func(n int, s func(i int) string) []string {
		out := make([]string, n)
		for i := range out {
			out[i] = s(i)
		}
		return out
	}
	keys := map[string]any{
		"listen":         cfg.Listen,
		"socks5":         cfg.SOCKS5,
		"mode":           cfg.Mode,
		"interface":      cfg.Interface,
		"pin":            strs(len(cfg.Pin), func(i int) string { return cfg.Pin[i].String() }),
		"ready":          cfg.Ready,
		"grace":          cfg.Grace.String(),
		"tunnel-idle":    cfg.TunnelIdle.String(),
		"dial-timeout":   cfg.DialTimeout.String(),
		"rotate":         string(cfg.Rotate),
		"session-idle":   cfg.SessionIdle.String(),
		"rotate-on":      cfg.RotateOn.String(),
		"ipv4":           string(cfg.IPv4),
		"limit":          strs(len(cfg.Limits), func(i int) string { return cfg.Limits[i].String() }),
		"limit-store":    cfg.LimitStore,
		"allow":          strs(len(cfg.Allow), func(i int) string { return cfg.Allow[i].String() }),
		"auth-file":      cfg.AuthFile,
		"admin":          cfg.Admin,
		"log-level":      levelValue(&cfg.LogLevel).String(),
		"allow-dest":     strs(len(cfg.AllowDest), func(i int) string { return cfg.AllowDest[i].String() }),
		"connect-ports":  portsKey(cfg.ConnectPorts),
		"http-ports":     portsKey(cfg.HTTPPorts),
		"max-conns":      cfg.MaxConns,
		"client-timeout": cfg.ClientTimeout.String(),
		"new-addrs":      cfg.NewAddrs.String(),
		"neigh-window":   cfg.NeighWindow.String(),
	}
	// 0: derived from the mode or another key; the file cannot say 0.
	derived := map[string]int{"max-addrs": cfg.MaxAddrs, "max-addrs-per-client": cfg.MaxAddrsPerClient,
		"max-conns-per-client": cfg.MaxConnsPerClient}
	for k, v := range derived {
		if v != 0 {
			keys[k] = v
		}
	}
	if len(cfg.Prefixes) > 0 {
		keys["prefix"] = strs(len(cfg.Prefixes), func(i int) string { return cfg.Prefixes[i].String() })
	}
	flagSet(new(Config)).VisitAll(func(f *flag.Flag) {
		if _, ok := derived[f.Name]; ok {
			return
		}
		if _, ok := keys[f.Name]; !ok && f.Name != "config" && f.Name != "prefix" {
			t.Fatalf("configFile does not write key %q", f.Name)
		}
	})
	out, err := yaml.Marshal(keys)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// portsKey is a port list as the config file holds it: an empty list is [].
func portsKey(p *proxy.Ports) any {
	if p.String() == "" {
		return []string{}
	}
	return p.String()
}
