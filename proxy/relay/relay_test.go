package relay

import (
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	require.NoError(t, err)
	s, err := ln.Accept()
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = c.Close()
		_ = s.Close()
	})
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// Waiting for bytes and splicing them allocates nothing, and moves exactly
// what was queued; EOF is told from an empty queue.
func TestQueuedSplice(t *testing.T) {
	in, src := tcpPair(t)
	dst, out := tcpPair(t)
	var q queued
	require.NoError(t, q.init(src, nil))

	msg := []byte("chunk")
	buf := make([]byte, len(msg))
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := in.Write(msg); err != nil {
			t.Fatal(err)
		}
		n, err := q.spliceTo(dst)
		if err != nil || n != int64(len(msg)) || q.eof {
			t.Fatalf("spliceTo: %d, %v, eof %v", n, err, q.eof)
		}
		if _, err := io.ReadFull(out, buf); err != nil {
			t.Fatal(err)
		}
	})
	assert.Zero(t, allocs, "allocations per wait and splice")

	// A read deadline ends the wait.
	require.NoError(t, src.SetReadDeadline(time.Now().Add(10*time.Millisecond)))
	_, err := q.spliceTo(dst)
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	require.NoError(t, src.SetReadDeadline(time.Time{}))

	// Bytes then EOF: the bytes first, then EOF.
	_, err = in.Write(msg)
	require.NoError(t, err)
	require.NoError(t, in.CloseWrite())
	n, err := q.spliceTo(dst)
	require.NoError(t, err)
	assert.Equal(t, int64(len(msg)), n)
	assert.False(t, q.eof)
	n, err = q.spliceTo(dst)
	require.NoError(t, err)
	assert.Zero(t, n)
	assert.True(t, q.eof)
}

// A reset is the error a read would return, queued bytes first.
func TestQueuedReset(t *testing.T) {
	in, src := tcpPair(t)
	dst, out := tcpPair(t)
	var q queued
	require.NoError(t, q.init(src, nil))

	_, err := in.Write([]byte("last"))
	require.NoError(t, err)
	n, err := q.spliceTo(dst)
	require.NoError(t, err)
	assert.Equal(t, int64(4), n)
	assert.Equal(t, []byte("last"), readN(t, out, 4))

	require.NoError(t, in.SetLinger(0))
	require.NoError(t, in.Close()) // a reset
	n, err = q.spliceTo(dst)
	assert.Zero(t, n)
	assert.ErrorIs(t, err, syscall.ECONNRESET)
	assert.True(t, IsClosed(err))
	assert.False(t, q.eof)
}

func readN(t *testing.T, r io.Reader, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	_, err := io.ReadFull(r, b)
	require.NoError(t, err)
	return b
}
