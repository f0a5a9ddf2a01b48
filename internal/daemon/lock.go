package daemon

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// One egressd per prefix: a second one started by hand while the service
// runs would remove the first's ready addresses as leftovers, and in routed
// mode delete the local route the first depends on. So before it changes
// anything, egressd takes an exclusive flock(2) on a lock file named by its
// network namespace, interface and prefix:
//
//	$RUNTIME_DIRECTORY/netns-INODE/IFNAME_ADDR_BITS.lock
//	/run/egressd/netns-4026531840/eth0_2001:db8:1:2::_64.lock
//
// INODE is that of /proc/self/ns/net, so that the same interface name in two
// namespaces does not collide. The file holds the owner's pid, for the
// message a second instance prints. Prefixes that overlap (a /64 and a /80
// inside it) conflict as much as equal ones: the second's leftover cleanup
// would take the first's addresses, and its local route would capture them.
// So once egressd holds its own lock it probes every other lock file of the
// namespace whose prefix overlaps its own, and gives up if one is held. Two
// starters racing with overlapping prefixes may then both give up; neither
// runs over the other.
//
// The lock is the kernel's: it goes with the process, however it ends. A
// file left by a killed egressd is simply taken over. On a clean exit the
// file is removed while still locked; whoever opened it before then and gets
// the lock after finds that the path no longer names its file, and opens
// again.

// defaultRuntimeDir is the runtime directory when systemd does not name one
// (RuntimeDirectory=egressd makes it /run/egressd too).
const defaultRuntimeDir = "/run/egressd"

// runtimeDir is where the lock files live: the first directory of
// $RUNTIME_DIRECTORY (systemd sets it, colon-separated), else
// defaultRuntimeDir.
func runtimeDir() string {
	dir, _, _ := strings.Cut(os.Getenv("RUNTIME_DIRECTORY"), ":")
	if dir == "" {
		return defaultRuntimeDir
	}
	return dir
}

// How a lock that seems taken is looked at again: a probe by another starter
// holds it for a moment only, and the owner writes its pid right after it
// took the lock.
const (
	lockRetries = 5
	lockPause   = 10 * time.Millisecond
)

// instanceLock is egressd's claim on a prefix in its network namespace.
type instanceLock struct {
	f      *os.File // holds the flock
	dir    string   // the namespace's directory of lock files
	path   string
	prefix netip.Prefix
}

// heldError is the lock of another egressd on the same or an overlapping
// prefix.
type heldError struct {
	pid    int // 0: not known
	ifname string
	prefix netip.Prefix // the other's
	want   netip.Prefix // the one asked for
	path   string
}

func (e *heldError) Error() string {
	who := "another egressd"
	if e.pid > 0 {
		who += fmt.Sprintf(" (pid %d)", e.pid)
	}
	if e.prefix == e.want {
		return fmt.Sprintf("%s already serves %s on %s (lock file %s): stop it first, or give this one another -prefix",
			who, e.prefix, e.ifname, e.path)
	}
	return fmt.Sprintf("%s already serves %s on %s, which overlaps -prefix %s (lock file %s): stop it first, or give this one a -prefix apart from it",
		who, e.prefix, e.ifname, e.want, e.path)
}

// lockName is the lock file's name for prefix on ifname. An interface name
// holds neither '/' nor ':', a prefix no '_', so the name parses back from
// its right end (parseLockName).
func lockName(ifname string, prefix netip.Prefix) string {
	return fmt.Sprintf("%s_%s_%d.lock", ifname, prefix.Addr(), prefix.Bits())
}

// parseLockName is the inverse of lockName; ok is false for any other name.
func parseLockName(name string) (ifname string, prefix netip.Prefix, ok bool) {
	rest, found := strings.CutSuffix(name, ".lock")
	if !found {
		return "", netip.Prefix{}, false
	}
	i := strings.LastIndexByte(rest, '_')
	if i < 0 {
		return "", netip.Prefix{}, false
	}
	j := strings.LastIndexByte(rest[:i], '_')
	if j <= 0 {
		return "", netip.Prefix{}, false
	}
	p, err := netip.ParsePrefix(rest[j+1:i] + "/" + rest[i+1:])
	if err != nil {
		return "", netip.Prefix{}, false
	}
	return rest[:j], p, true
}

// netnsDir is the directory, under dir, of the lock files of this process's
// network namespace.
func netnsDir(dir string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
		return "", fmt.Errorf("identifying the network namespace: stat /proc/self/ns/net: %w", err)
	}
	return filepath.Join(dir, fmt.Sprintf("netns-%d", st.Ino)), nil
}

// acquireLock takes the lock for prefix on ifname in the runtime directory
// dir (made if missing), or returns a *heldError naming the egressd that
// holds it or one on an overlapping prefix.
func acquireLock(dir, ifname string, prefix netip.Prefix) (*instanceLock, error) {
	nsdir, err := netnsDir(dir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(nsdir, 0o755); err != nil {
		return nil, fmt.Errorf("lock directory: %w", err)
	}
	l := &instanceLock{dir: nsdir, path: filepath.Join(nsdir, lockName(ifname, prefix)), prefix: prefix}
	if l.f, err = lockFile(l.path); errors.Is(err, unix.EWOULDBLOCK) {
		return nil, &heldError{pid: readPid(l.path), ifname: ifname, prefix: prefix, want: prefix, path: l.path}
	} else if err != nil {
		return nil, err
	}
	if err = l.f.Truncate(0); err == nil {
		_, err = l.f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	if err != nil {
		l.Release()
		return nil, fmt.Errorf("lock file %s: writing the pid: %w", l.path, err)
	}
	if err := l.Overlapping(); err != nil {
		l.Release()
		return nil, err
	}
	return l, nil
}

// lockFile opens path and takes an exclusive flock on it without waiting.
// It returns an error wrapping EWOULDBLOCK if somebody holds it.
func lockFile(path string) (*os.File, error) {
	busy := 0
	for range 100 { // only a storm of unlinks by exiting owners goes round more than twice
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("lock file: %w", err)
		}
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			if busy++; busy > lockRetries {
				return nil, fmt.Errorf("lock file %s: %w", path, err)
			}
			time.Sleep(lockPause)
			continue
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		// The owner before may have removed the file after we opened it
		// and before it let go: then the lock is on a file nobody else
		// will open, and the path names another one or none.
		if sameFile(f, path) {
			return f, nil
		}
		f.Close()
	}
	return nil, fmt.Errorf("lock file %s: replaced again and again while taking it", path)
}

// sameFile reports whether path still names the open file f.
func sameFile(f *os.File, path string) bool {
	fi, err := f.Stat()
	if err != nil {
		return false
	}
	pi, err := os.Stat(path)
	return err == nil && os.SameFile(fi, pi)
}

// held reports whether somebody holds the lock file at path. It takes a
// shared lock for a moment to find out; a file that is gone is not held.
func held(path string) (bool, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("lock file: %w", err)
	}
	defer f.Close()
	err = unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB)
	switch {
	case errors.Is(err, unix.EWOULDBLOCK):
		return true, nil
	case err != nil:
		return false, fmt.Errorf("probing lock file %s: %w", path, err)
	}
	return false, nil // closing lets go
}

// readPid reads the pid an owner wrote into its lock file; 0 if there is
// none yet, after a short wait for the owner to write it.
func readPid(path string) int {
	for range lockRetries {
		data, err := os.ReadFile(path)
		if err != nil {
			return 0
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil && pid > 0 {
			return pid
		}
		time.Sleep(lockPause)
	}
	return 0
}

// Overlapping returns a *heldError if another egressd holds a lock, in this
// network namespace, on a prefix that overlaps l's; nil if none does.
func (l *instanceLock) Overlapping() error {
	entries, err := os.ReadDir(l.dir)
	if err != nil {
		return fmt.Errorf("lock directory: %w", err)
	}
	for _, e := range entries {
		ifname, p, ok := parseLockName(e.Name())
		path := filepath.Join(l.dir, e.Name())
		if !ok || path == l.path || !p.Overlaps(l.prefix) {
			continue
		}
		if h, err := held(path); err != nil {
			return err
		} else if h {
			return &heldError{pid: readPid(path), ifname: ifname, prefix: p, want: l.prefix, path: path}
		}
	}
	return nil
}

// Release removes the lock file and lets go of the lock, in that order (see
// lockFile).
func (l *instanceLock) Release() error {
	err := os.Remove(l.path)
	if errors.Is(err, syscall.ENOENT) {
		err = nil
	}
	return errors.Join(err, l.f.Close())
}

// instanceLocks are egressd's claims on each of its prefixes: a lock file
// per prefix, so that an egressd of one of them, or of a prefix that
// overlaps one, conflicts as it would with an egressd of that prefix alone.
type instanceLocks []*instanceLock

// acquireLocks takes the lock of every prefix on ifname (see acquireLock),
// or none: on a failure it lets go of those it took.
func acquireLocks(dir, ifname string, prefixes []netip.Prefix) (instanceLocks, error) {
	ls := make(instanceLocks, 0, len(prefixes))
	for _, p := range prefixes {
		l, err := acquireLock(dir, ifname, p)
		if err != nil {
			_ = ls.Release()
			return nil, err
		}
		ls = append(ls, l)
	}
	return ls, nil
}

// Overlapping returns a *heldError if another egressd holds a lock on a
// prefix that overlaps prefix, one of ls's; nil if none does.
func (ls instanceLocks) Overlapping(prefix netip.Prefix) error {
	for _, l := range ls {
		if l.prefix == prefix {
			return l.Overlapping()
		}
	}
	return nil
}

// Release lets go of every lock (see instanceLock.Release).
func (ls instanceLocks) Release() error {
	var errs []error
	for _, l := range ls {
		errs = append(errs, l.Release())
	}
	return errors.Join(errs...)
}
