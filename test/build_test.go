package test

import (
	"bytes"
	"debug/elf"
	"io"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/test/nstest"
)

// TestStaticBuild: `make build`, the recipe users run, makes static
// binaries: no program interpreter (PT_INTERP, the dynamic loader) and no
// shared library needed (DT_NEEDED), so that they run on a server whatever
// its libc, including a glibc older than the build machine's. It needs no
// root.
func TestStaticBuild(t *testing.T) {
	t.Parallel()
	mk, err := exec.LookPath("make")
	require.NoError(t, err, "make is needed (Debian package make)")
	root, err := nstest.ModuleRoot()
	require.NoError(t, err)
	bin := t.TempDir()
	out, err := exec.Command(mk, "-C", root, "build", "BIN="+bin).CombinedOutput()
	require.NoError(t, err, "make build BIN=%s:\n%s", bin, out)

	for _, name := range []string{"egressd", "egressctl", "echo-upstream"} {
		t.Run(name, func(t *testing.T) {
			assert.Empty(t, dynamicLinking(t, filepath.Join(bin, name)), "%s is not static", name)
		})
	}
	// make itself is a C program linked against libc: the check sees that.
	assert.NotEmpty(t, dynamicLinking(t, mk), "%s looks static to the check", mk)
}

// dynamicLinking lists what the ELF file at path needs at run time: its
// program interpreter and the shared libraries of its dynamic section.
func dynamicLinking(t *testing.T, path string) []string {
	t.Helper()
	f, err := elf.Open(path)
	require.NoError(t, err)
	defer f.Close()
	var needs []string
	for _, p := range f.Progs {
		if p.Type != elf.PT_INTERP {
			continue
		}
		interp, err := io.ReadAll(p.Open())
		require.NoError(t, err, "%s: reading PT_INTERP", path)
		needs = append(needs, "interpreter "+string(bytes.TrimRight(interp, "\x00")))
	}
	libs, err := f.ImportedLibraries() // DT_NEEDED
	require.NoError(t, err, "%s: reading the dynamic section", path)
	for _, lib := range libs {
		needs = append(needs, "library "+lib)
	}
	return needs
}
