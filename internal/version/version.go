// Package version says which build of egressd's programs is running, from
// what the Go toolchain records in every binary (debug.ReadBuildInfo): the
// module version, the commit it was built from and its time, whether the
// tree had changes, and the Go version.
package version

import (
	"runtime/debug"
	"strings"
)

// Line returns one line for a -version flag, e.g.
//
//	egressd v0.0.0-20260501100000-3f2a9c1d8e7b+dirty (commit 3f2a9c1d8e7b…, 2026-05-01T10:00:00Z, modified) go1.26.8
func Line(prog string) string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return prog + " (no build information)"
	}
	return line(prog, bi)
}

func line(prog string, bi *debug.BuildInfo) string {
	v := bi.Main.Version
	if v == "" {
		v = "(devel)"
	}
	settings := map[string]string{}
	for _, s := range bi.Settings {
		settings[s.Key] = s.Value
	}
	var vcs []string
	if rev := settings["vcs.revision"]; rev != "" {
		vcs = append(vcs, "commit "+rev)
	}
	if t := settings["vcs.time"]; t != "" {
		vcs = append(vcs, t)
	}
	if settings["vcs.modified"] == "true" {
		vcs = append(vcs, "modified")
	}
	out := prog + " " + v
	if len(vcs) > 0 {
		out += " (" + strings.Join(vcs, ", ") + ")"
	}
	if bi.GoVersion != "" {
		out += " " + bi.GoVersion
	}
	return out
}
