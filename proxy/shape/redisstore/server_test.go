package redisstore

import (
	"bytes"
	"net"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// guard bounds every wait of these tests: a failure guard, not a timing.
const guard = 30 * time.Second

// redisServer is a redis-server of the test's own, on a free loopback port,
// without persistence. It is stopped by its pid in t.Cleanup.
type redisServer struct {
	t        testing.TB
	port     int
	password string // "" for none
	cmd      *exec.Cmd
	done     chan struct{}
}

// startRedis starts a redis-server (Debian package redis-server) that
// requires password, unless it is empty.
func startRedis(t testing.TB, password string) *redisServer {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatalf("redis-server is needed (Debian package redis-server): %v", err)
	}
	r := &redisServer{t: t, password: password}
	t.Cleanup(r.stop)
	for try := 0; ; try++ {
		r.port = freePort(t)
		if r.run() {
			return r
		}
		if try == 5 {
			t.Fatal("redis-server did not start")
		}
	}
}

// URL is the store URL of the server, with its password.
func (r *redisServer) URL() string {
	u := "redis://127.0.0.1:" + strconv.Itoa(r.port) + "/0"
	if r.password != "" {
		u = "redis://:" + r.password + "@127.0.0.1:" + strconv.Itoa(r.port) + "/0"
	}
	return u
}

// run starts the server on r.port and waits until it accepts connections.
// It reports false if the server exited first (the port was taken).
func (r *redisServer) run() bool {
	r.t.Helper()
	args := []string{"--port", strconv.Itoa(r.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--daemonize", "no", "--dir", r.t.TempDir(), "--logfile", ""}
	if r.password != "" {
		args = append(args, "--requirepass", r.password)
	}
	r.cmd = exec.Command("redis-server", args...)
	if err := r.cmd.Start(); err != nil {
		r.t.Fatalf("starting redis-server: %v", err)
	}
	done := make(chan struct{})
	r.done = done
	go func() {
		r.cmd.Wait()
		close(done)
	}()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(r.port))
	for end := time.Now().Add(guard); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		select {
		case <-done:
			return false
		default:
		}
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return true
		}
	}
	r.t.Fatalf("redis-server not listening on %s after %v", addr, guard)
	return false
}

// stop kills the server by its pid and waits for it to end.
func (r *redisServer) stop() {
	if r.cmd == nil || r.cmd.Process == nil {
		return
	}
	select {
	case <-r.done:
		return
	default:
	}
	syscall.Kill(r.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-r.done:
	case <-time.After(guard):
		r.t.Errorf("redis-server (pid %d) did not end", r.cmd.Process.Pid)
	}
}

// restart starts the server again on the same port, empty.
func (r *redisServer) restart() {
	r.t.Helper()
	if !r.run() {
		r.t.Fatalf("redis-server did not start again on port %d", r.port)
	}
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func itoa(n int) string { return strconv.Itoa(n) }

// syncBuffer is a buffer a logger may write from several goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
