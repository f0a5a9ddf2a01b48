package proxy

import (
	"context"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/egressd/egressd/proxy/stats"
)

// TestCountAddrAfterEnd: a dial that outlives its request (Go's transport
// finishes a dial whose request was canceled) neither counts a fresh
// address against the client nor is let through, so finish's release is
// never undone and -max-addrs-per-client never refuses a client for an
// address nobody holds.
func TestCountAddrAfterEnd(t *testing.T) {
	tbl := newClientTable(Limits{MaxAddrsPerClient: 1}, &stats.Clients{})
	c, e := tbl.enter(netip.MustParseAddr("192.0.2.7"))
	require.Nil(t, e)

	x := &request{client: c}
	require.NoError(t, x.countAddr())
	require.NoError(t, x.countAddr(), "a second dial of the request (a retry) counts nothing more")
	assert.Equal(t, 1, c.addrs)
	x.releaseAddr(true) // the request ends
	assert.Equal(t, 0, c.addrs)

	assert.ErrorIs(t, x.countAddr(), context.Canceled, "a dial after the end")
	assert.Equal(t, 0, c.addrs)
	x.releaseAddr(false) // that dial's IPv4 path, say
	assert.ErrorIs(t, x.countAddr(), context.Canceled, "still ended")
	assert.Equal(t, 0, c.addrs)

	// The client's next request may take its one address.
	y := &request{client: c}
	require.NoError(t, y.countAddr())
	assert.Equal(t, 1, c.addrs)
	y.releaseAddr(false) // went over IPv4: gives it back, may count again
	assert.Equal(t, 0, c.addrs)
	require.NoError(t, y.countAddr())
	y.releaseAddr(true)
	assert.Equal(t, 0, c.addrs)
}
