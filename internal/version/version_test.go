package version

import (
	"runtime/debug"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestLine(t *testing.T) {
	const rev = "3f2a9c1d8e7b00112233445566778899aabbccdd"
	vcs := func(modified string) []debug.BuildSetting {
		return []debug.BuildSetting{
			{Key: "-compiler", Value: "gc"},
			{Key: "vcs", Value: "git"},
			{Key: "vcs.revision", Value: rev},
			{Key: "vcs.time", Value: "2026-05-01T10:00:00Z"},
			{Key: "vcs.modified", Value: modified},
		}
	}
	tests := []struct {
		name string
		bi   debug.BuildInfo
		want string
	}{
		{
			name: "release",
			bi:   debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "v1.2.3"}, Settings: vcs("false")},
			want: "egressd v1.2.3 (commit " + rev + ", 2026-05-01T10:00:00Z) go1.26.8",
		},
		{
			name: "changed tree",
			bi:   debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "v0.0.0-20260501100000-3f2a9c1d8e7b+dirty"}, Settings: vcs("true")},
			want: "egressd v0.0.0-20260501100000-3f2a9c1d8e7b+dirty (commit " + rev + ", 2026-05-01T10:00:00Z, modified) go1.26.8",
		},
		{
			name: "no vcs",
			bi:   debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"}},
			want: "egressd (devel) go1.26.8",
		},
		{
			name: "no main version",
			bi:   debug.BuildInfo{GoVersion: "go1.26.8"},
			want: "egressd (devel) go1.26.8",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, line("egressd", &tt.bi))
		})
	}
}

// TestLineOfThisBinary: the test binary has build information too, and its
// line is one line naming the Go version.
func TestLineOfThisBinary(t *testing.T) {
	got := Line("egressd")
	assert.True(t, strings.HasPrefix(got, "egressd "), got)
	assert.NotContains(t, got, "\n")
	bi, ok := debug.ReadBuildInfo()
	if assert.True(t, ok) {
		assert.True(t, strings.HasSuffix(got, " "+bi.GoVersion), got)
	}
}
