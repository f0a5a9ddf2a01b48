package admin

import (
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestListenUnix(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "run", "egressd", "admin.sock")
	ln, err := Listen(sock)
	require.NoError(t, err, "the directory is made")
	fi, err := os.Stat(sock)
	require.NoError(t, err)
	assert.Equal(t, os.ModeSocket|0o600, fi.Mode()&(os.ModeType|os.ModePerm), "only its owner may connect")

	_, err = Listen(sock)
	assert.EqualError(t, err, "admin socket "+sock+" is in use: another egressd runs (give this one its own -admin)")

	// A socket nobody answers on any more, as a killed egressd leaves it.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	require.NoError(t, ln.Close())
	_, err = os.Stat(sock)
	require.NoError(t, err, "the stale socket is there")
	ln, err = Listen(sock)
	require.NoError(t, err, "the stale socket is replaced")
	ln.Close()
}

func TestListenTCP(t *testing.T) {
	ln, err := Listen("127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	assert.Equal(t, "tcp", ln.Addr().Network())

	_, err = Listen(ln.Addr().String())
	assert.EqualError(t, err, "admin listener "+ln.Addr().String()+": bind: address already in use")
}

func TestListenError(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	_, err := Listen(filepath.Join(file, "admin.sock"))
	assert.ErrorContains(t, err, "admin socket "+file+"/admin.sock: mkdir "+file+": not a directory")
}
