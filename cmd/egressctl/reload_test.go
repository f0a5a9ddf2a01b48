package main

import (
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/egressd/egressd/internal/admin"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestReload runs egressctl reload against egressd's own admin handler: the
// line egressd sends is printed, a refusal is one line on stderr and exit 1.
func TestReload(t *testing.T) {
	var answer error
	calls := 0
	reload := func() (string, error) {
		calls++
		if answer != nil {
			return "", answer
		}
		return "reloaded: limit, allow changed", nil
	}
	sock := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := net.Listen("unix", sock)
	require.NoError(t, err)
	srv := &http.Server{Handler: admin.NewHandler(admin.Config{Reload: reload}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	r := egressctl(t, "-admin", sock, "reload")
	assert.Equal(t, result{0, "reloaded: limit, allow changed\n", ""}, r)

	answer = errors.New("reload refused, the running config stays: config /etc/egressd.yaml: line 3: unknown key \"limits\"")
	r = egressctl(t, "-admin", sock, "reload")
	assert.Equal(t, 1, r.code)
	assert.Empty(t, r.stdout)
	assert.Equal(t, "egressctl: reload refused, the running config stays: config /etc/egressd.yaml: line 3: unknown key \"limits\"\n", r.stderr)
	assert.Equal(t, 2, calls)

	r = egressctl(t, "-admin", sock, "reload", "now")
	assert.Equal(t, 2, r.code, "no arguments")
	assert.Equal(t, 2, calls)

	r = egressctl(t, "-admin", sock, "reload", "-h")
	assert.Equal(t, 0, r.code)
	assert.Contains(t, r.stdout, "Usage: egressctl [-admin ADDR] reload")

	// An egressd without reload (an older one) answers 405 or 404.
	ln2, err := net.Listen("unix", filepath.Join(t.TempDir(), "old.sock"))
	require.NoError(t, err)
	old := &http.Server{Handler: admin.NewHandler(admin.Config{}), ReadHeaderTimeout: 5 * time.Second}
	go old.Serve(ln2)
	t.Cleanup(func() { old.Close() })
	r = egressctl(t, "-admin", ln2.Addr().String(), "reload")
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, "answered POST /reload with 40")
}
