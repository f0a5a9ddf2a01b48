package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/egressd/egressd/internal/admin"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestRotate runs egressctl rotate against egressd's own admin handler: the
// line egressd sends is printed, -json prints its document, an unknown
// session is one line on stderr and exit 1, a bad command line exit 2.
func TestRotate(t *testing.T) {
	var keys []string
	rotate := func(_ context.Context, key string) (bool, netip.Addr, error) {
		keys = append(keys, key)
		if key == "gone" {
			return false, netip.Addr{}, fmt.Errorf("%w: gone", admin.ErrNoSession)
		}
		return true, netip.MustParseAddr("2001:db8::7"), nil
	}
	sock := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := net.Listen("unix", sock)
	require.NoError(t, err)
	srv := &http.Server{Handler: admin.NewHandler(admin.Config{Rotate: rotate}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	r := egressctl(t, "-admin", sock, "rotate", "build42")
	assert.Equal(t, result{0, `session "build42" gave up 2001:db8::7: its next connection leaves from a new address; connections open from the old one keep going` + "\n", ""}, r)

	r = egressctl(t, "-admin", sock, "rotate", "-json", "a/b c")
	assert.Equal(t, 0, r.code, r.stderr)
	assert.JSONEq(t, `{"ok":true,"session":"a/b c","rotated":true,"old":"2001:db8::7",
		"message":"session \"a/b c\" gave up 2001:db8::7: its next connection leaves from a new address; connections open from the old one keep going"}`, r.stdout)

	r = egressctl(t, "-admin", sock, "rotate", "gone")
	assert.Equal(t, result{1, "", "egressctl: no session \"gone\" is open: no request had that key, or it idled out (-session-idle)\n"}, r)
	assert.Equal(t, []string{"build42", "a/b c", "gone"}, keys)

	for _, args := range [][]string{{"rotate"}, {"rotate", ""}, {"rotate", "a", "b"}, {"rotate", "a", "-json"}, {"rotate", "-x", "a"}} {
		r = egressctl(t, append([]string{"-admin", sock}, args...)...)
		assert.Equal(t, 2, r.code, "%q", args)
		assert.Contains(t, r.stderr, "(run 'egressctl rotate -h' for usage)", "%q", args)
	}
	assert.Len(t, keys, 3, "a bad command line asks egressd nothing")

	r = egressctl(t, "-admin", sock, "rotate", "-h")
	assert.Equal(t, 0, r.code)
	assert.Contains(t, r.stdout, "Usage: egressctl [-admin ADDR] rotate [-json] KEY")
}
