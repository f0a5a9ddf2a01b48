package daemon

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

var (
	lockP64 = netip.MustParsePrefix("2001:db8:1:2::/64")
	lockP80 = netip.MustParsePrefix("2001:db8:1:2:5::/80")
)

// acquire takes a lock that the test releases at its end.
func acquire(t *testing.T, dir, ifname string, p netip.Prefix) *instanceLock {
	t.Helper()
	l, err := acquireLock(dir, ifname, p)
	require.NoError(t, err)
	t.Cleanup(func() { l.Release() })
	return l
}

// requireHeld checks that err is a one-line *heldError naming the holder's
// pid, interface, prefix and lock file.
func requireHeld(t *testing.T, err error, pid int, ifname string, p netip.Prefix, path string) {
	t.Helper()
	var h *heldError
	require.ErrorAs(t, err, &h)
	assert.Equal(t, pid, h.pid)
	assert.Equal(t, ifname, h.ifname)
	assert.Equal(t, p, h.prefix)
	assert.Equal(t, path, h.path)
	msg := err.Error()
	assert.NotContains(t, msg, "\n")
	for _, want := range []string{fmt.Sprintf("pid %d", pid), " on " + ifname, p.String(), path} {
		assert.Contains(t, msg, want)
	}
}

func TestLockTwiceInOneProcess(t *testing.T) {
	dir := t.TempDir()
	first := acquire(t, dir, "eth0", lockP64)
	data, err := os.ReadFile(first.path)
	require.NoError(t, err)
	assert.Equal(t, strconv.Itoa(os.Getpid())+"\n", string(data), "the lock file holds the owner's pid")

	// A second open of the same file is a second open file description:
	// flock refuses it as it would refuse another process.
	_, err = acquireLock(dir, "eth0", lockP64)
	requireHeld(t, err, os.Getpid(), "eth0", lockP64, first.path)
	assert.Contains(t, err.Error(), "already serves 2001:db8:1:2::/64 on eth0 (lock file ")
	assert.FileExists(t, first.path, "the refused one left the lock file alone")

	// Once released, the prefix is free again, and the file is gone.
	require.NoError(t, first.Release())
	assert.NoFileExists(t, first.path)
	acquire(t, dir, "eth0", lockP64)
}

func TestLockName(t *testing.T) {
	dir := t.TempDir()
	l := acquire(t, dir, "eth0", lockP64)
	ns, err := netnsDir(dir)
	require.NoError(t, err)
	var st unix.Stat_t
	require.NoError(t, unix.Stat("/proc/self/ns/net", &st))
	assert.Equal(t, filepath.Join(dir, fmt.Sprintf("netns-%d", st.Ino)), ns)
	assert.Equal(t, filepath.Join(ns, "eth0_2001:db8:1:2::_64.lock"), l.path)

	for _, tt := range []struct {
		ifname string
		prefix netip.Prefix
	}{
		{"eth0", lockP64},
		{"br_lan_2", lockP80},
		{"veth-a@b", netip.MustParsePrefix("::/0")},
		{"x", netip.MustParsePrefix("2001:db8::1/128")},
	} {
		name := lockName(tt.ifname, tt.prefix)
		ifname, p, ok := parseLockName(name)
		require.True(t, ok, name)
		assert.Equal(t, tt.ifname, ifname, name)
		assert.Equal(t, tt.prefix, p, name)
	}
	for _, name := range []string{"admin.sock", "eth0.lock", "_2001:db8::_64.lock", "eth0_2001:db8::_64", "eth0_nope_64.lock", "eth0_2001:db8::_129.lock"} {
		_, _, ok := parseLockName(name)
		assert.False(t, ok, name)
	}
}

func TestLockOverlappingPrefixes(t *testing.T) {
	tests := []struct {
		name          string
		firstIf       string
		first         netip.Prefix
		secondIf      string
		second        netip.Prefix
		refused       bool
		overlapReason bool // the message says which prefix overlaps
	}{
		{name: "a /80 inside a running /64", firstIf: "eth0", first: lockP64, secondIf: "eth0", second: lockP80, refused: true, overlapReason: true},
		{name: "a /64 around a running /80", firstIf: "eth0", first: lockP80, secondIf: "eth0", second: lockP64, refused: true, overlapReason: true},
		{name: "the same prefix on another interface", firstIf: "eth0", first: lockP64, secondIf: "eth1", second: lockP64, refused: true},
		{name: "another /80 of the same /64", firstIf: "eth0", first: lockP80, secondIf: "eth0", second: netip.MustParsePrefix("2001:db8:1:2:6::/80")},
		{name: "another /64", firstIf: "eth0", first: lockP64, secondIf: "eth0", second: netip.MustParsePrefix("2001:db8:1:3::/64")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			first := acquire(t, dir, tt.firstIf, tt.first)
			second, err := acquireLock(dir, tt.secondIf, tt.second)
			if !tt.refused {
				require.NoError(t, err)
				require.NoError(t, second.Release())
				return
			}
			requireHeld(t, err, os.Getpid(), tt.firstIf, tt.first, first.path)
			if tt.overlapReason {
				assert.Contains(t, err.Error(), "which overlaps -prefix "+tt.second.String())
			}
			// The refused one took its own lock for a moment, and gave it
			// back with its file.
			assert.NoFileExists(t, filepath.Join(first.dir, lockName(tt.secondIf, tt.second)))
			entries, err := os.ReadDir(first.dir)
			require.NoError(t, err)
			assert.Len(t, entries, 1)
		})
	}
}

// TestLockOverlappingAtStop: Overlapping, the guard before removing the local
// route, sees another holder of an overlapping prefix that came after.
func TestLockOverlappingAtStop(t *testing.T) {
	dir := t.TempDir()
	l := acquire(t, dir, "eth0", lockP64)
	require.NoError(t, l.Overlapping())

	// Another egressd (a file locked without the checks of acquireLock, as
	// an older or differently started egressd might), with no pid written.
	path := filepath.Join(l.dir, lockName("eth1", lockP80))
	other, err := lockFile(path)
	require.NoError(t, err)
	err = l.Overlapping()
	var h *heldError
	require.ErrorAs(t, err, &h)
	assert.Equal(t, path, h.path)
	assert.Zero(t, h.pid, "no pid in the file")
	assert.True(t, strings.HasPrefix(err.Error(), "another egressd already serves "+lockP80.String()+" on eth1"), err.Error())

	// Once it lets go, the file left behind is no obstacle.
	require.NoError(t, other.Close())
	assert.FileExists(t, path)
	assert.NoError(t, l.Overlapping())
}

// TestLockStaleFile: the file of an egressd that died (its pid written, its
// lock gone with it) is taken over, and a dead holder of an overlapping
// prefix does not stand in the way either.
func TestLockStaleFile(t *testing.T) {
	dir := t.TempDir()
	dead := exec.Command("true")
	require.NoError(t, dead.Run())
	deadPid := []byte(strconv.Itoa(dead.Process.Pid) + "\n")

	ns, err := netnsDir(dir)
	require.NoError(t, err)
	require.NoError(t, os.MkdirAll(ns, 0o755))
	stale := filepath.Join(ns, lockName("eth0", lockP64))
	require.NoError(t, os.WriteFile(stale, append(deadPid, "trailing junk of a longer pid\n"...), 0o644))
	staleOverlap := filepath.Join(ns, lockName("eth0", lockP80))
	require.NoError(t, os.WriteFile(staleOverlap, deadPid, 0o644))

	l := acquire(t, dir, "eth0", lockP64)
	assert.Equal(t, stale, l.path)
	data, err := os.ReadFile(stale)
	require.NoError(t, err)
	assert.Equal(t, strconv.Itoa(os.Getpid())+"\n", string(data), "the pid is ours now, and only ours")
	assert.FileExists(t, staleOverlap, "another's file is never removed")
}

// TestLockUnlinkRace: a starter that opened the lock file before its owner
// removed it and let go gets the lock on a file nobody else will see; it must
// notice, and lockFile does by comparing the path with what it holds.
func TestLockUnlinkRace(t *testing.T) {
	dir := t.TempDir()
	owner := acquire(t, dir, "eth0", lockP64)
	late, err := os.OpenFile(owner.path, os.O_RDWR, 0)
	require.NoError(t, err)
	defer late.Close()
	require.NoError(t, owner.Release())

	require.NoError(t, unix.Flock(int(late.Fd()), unix.LOCK_EX|unix.LOCK_NB), "the old file is free")
	assert.False(t, sameFile(late, owner.path), "the path no longer names it")
	// Another starter makes the file anew and holds it.
	next := acquire(t, dir, "eth0", lockP64)
	assert.False(t, sameFile(late, next.path))
	f, err := os.Open(next.path)
	require.NoError(t, err)
	defer f.Close()
	assert.True(t, sameFile(f, next.path))
}

// TestLockDirErrors: a runtime directory egressd cannot use is one line that
// names it.
func TestLockDirErrors(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) string // returns the runtime dir
		want  string
	}{
		{
			name: "runtime directory is a file",
			setup: func(t *testing.T, dir string) string {
				path := filepath.Join(dir, "run")
				require.NoError(t, os.WriteFile(path, nil, 0o644))
				return path
			},
			want: "lock directory: mkdir ",
		},
		{
			name: "namespace directory is a file",
			setup: func(t *testing.T, dir string) string {
				ns, err := netnsDir(dir)
				require.NoError(t, err)
				require.NoError(t, os.WriteFile(ns, nil, 0o644))
				return dir
			},
			want: "lock directory: mkdir ",
		},
		{
			name: "lock file is a directory",
			setup: func(t *testing.T, dir string) string {
				ns, err := netnsDir(dir)
				require.NoError(t, err)
				require.NoError(t, os.MkdirAll(filepath.Join(ns, lockName("eth0", lockP64)), 0o755))
				return dir
			},
			want: "lock file: open ",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := tt.setup(t, t.TempDir())
			_, err := acquireLock(dir, "eth0", lockP64)
			require.Error(t, err)
			assert.False(t, errors.As(err, new(*heldError)))
			assert.Contains(t, err.Error(), tt.want)
			assert.Contains(t, err.Error(), dir)
			assert.NotContains(t, err.Error(), "\n")
		})
	}
}

func TestRuntimeDir(t *testing.T) {
	t.Setenv("RUNTIME_DIRECTORY", "")
	assert.Equal(t, "/run/egressd", runtimeDir())
	t.Setenv("RUNTIME_DIRECTORY", "/run/egressd-a:/run/egressd-b")
	assert.Equal(t, "/run/egressd-a", runtimeDir(), "the first of systemd's list")
	t.Setenv("RUNTIME_DIRECTORY", "/tmp/x")
	assert.Equal(t, "/tmp/x", runtimeDir())
}

// TestLocksOfSeveralPrefixes: an egressd of several prefixes holds a lock
// per prefix: another egressd of any of them, or of one overlapping one,
// is refused; the locks are taken all or none, and Overlapping answers per
// prefix.
func TestLocksOfSeveralPrefixes(t *testing.T) {
	dir := t.TempDir()
	p56 := netip.MustParsePrefix("2001:db8:0:100::/56")
	p64 := netip.MustParsePrefix("2001:db8:5:5::/64")
	ls, err := acquireLocks(dir, "eth0", []netip.Prefix{p56, p64})
	require.NoError(t, err)
	require.Len(t, ls, 2)

	for _, other := range []netip.Prefix{p64, netip.MustParsePrefix("2001:db8:0:1ff::/64"), netip.MustParsePrefix("2001:db8::/32")} {
		_, err := acquireLock(dir, "eth0", other)
		var h *heldError
		require.ErrorAs(t, err, &h, "%s", other)
	}

	// All or none: a set with one prefix taken leaves no lock behind.
	free := netip.MustParsePrefix("2001:db8:9:9::/64")
	_, err = acquireLocks(dir, "eth1", []netip.Prefix{free, p64})
	require.Error(t, err)
	l, err := acquireLock(dir, "eth1", free)
	require.NoError(t, err, "the lock of the set that failed was let go")
	require.NoError(t, l.Release())

	// At stop, each route asks about its own prefix.
	other, err := lockFile(filepath.Join(ls[0].dir, lockName("eth1", netip.MustParsePrefix("2001:db8:0:1a0::/60"))))
	require.NoError(t, err)
	assert.Error(t, ls.Overlapping(p56))
	assert.NoError(t, ls.Overlapping(p64))
	require.NoError(t, other.Close())

	require.NoError(t, ls.Release())
	l, err = acquireLock(dir, "eth0", p64)
	require.NoError(t, err, "released")
	require.NoError(t, l.Release())
}
