// Package imports holds the test that keeps the module's layers apart: the
// proxy never links netlink, the network code never links net/http, and
// egressctl links neither the proxy nor the kernel code it only talks to.
package imports

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const module = "github.com/egressd/egressd"

// boundaries lists, per package pattern, the packages that it must not
// depend on, directly or through anything it imports.
var boundaries = []struct {
	pkgs      string
	forbidden []string
	why       string
}{
	{
		pkgs:      "./proxy/...",
		forbidden: []string{"github.com/vishvananda/netlink"},
		why:       "the proxy speaks HTTP and SOCKS5; addresses and routes are netutil/kernel's",
	},
	{
		pkgs:      "./netutil/...",
		forbidden: []string{"net/http"},
		why:       "netutil knows addresses, not requests",
	},
	{
		pkgs: "./cmd/egressctl",
		forbidden: []string{
			module + "/proxy",
			"github.com/elazarl/goproxy",
			"github.com/vishvananda/netlink",
		},
		why: "egressctl talks to the admin API; it links internal/admin and proxy/stats only",
	},
}

func TestImportBoundaries(t *testing.T) {
	root := filepath.Join("..", "..")
	for _, b := range boundaries {
		t.Run(strings.Trim(b.pkgs, "./"), func(t *testing.T) {
			// One line per package: its path, then every package it depends on.
			// (go test puts the go command that runs it first on PATH.)
			cmd := exec.Command("go", "list", "-f", `{{.ImportPath}}{{range .Deps}} {{.}}{{end}}`, b.pkgs)
			cmd.Dir = root
			out, err := cmd.Output()
			require.NoError(t, err, "go list %s: %s", b.pkgs, stderr(err))
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			require.NotEmpty(t, lines)
			for _, line := range lines {
				fields := strings.Fields(line)
				pkg, deps := fields[0], fields[1:]
				for _, f := range b.forbidden {
					for _, d := range deps {
						if d == f {
							t.Errorf("%s depends on %s: %s", pkg, f, b.why)
						}
					}
				}
			}
		})
	}
}

func stderr(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}
