package main

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/egressd/egressd/proxy/stats"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestAddrsTable(t *testing.T) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			admin := new(fakeEgressd).serve(t, network)
			r := egressctl(t, "-admin", admin, "addrs")
			require.Equal(t, 0, r.code, r.stderr)
			assert.Empty(t, r.stderr)
			assert.Equal(t, [][]string{
				{"ADDRESS", "STATE", "AGE"},
				{"2001:db8::3", "warm", "2h00m"},
				{"2001:db8::2", "in-use", "1m30s"},
				{"2001:db8::1", "ready", "2.00s"}, // same age: by address, numerically
				{"2001:db8::10", "ready", "2.00s"},
			}, table(t, r.stdout, "ADDRESS"))
		})
	}
}

func TestAddrsEmpty(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, writeAddrs(&out, nil))
	assert.Equal(t, "egressd holds no egress address.\n", out.String())
}

func TestAddrsJSON(t *testing.T) {
	admin := new(fakeEgressd).serve(t, "unix")
	r := egressctl(t, "-admin", admin, "addrs", "-json")
	require.Equal(t, 0, r.code, r.stderr)

	want, err := json.MarshalIndent(cannedAddrs(), "", "  ")
	require.NoError(t, err)
	assert.Equal(t, string(want)+"\n", r.stdout, "as received (not sorted), indented")
	var got []stats.Addr
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &got))
	assert.Equal(t, cannedAddrs(), got)
}

func TestCompareAddrs(t *testing.T) {
	assert.Negative(t, compareAddrs("2001:db8::2", "2001:db8::10"))
	assert.Positive(t, compareAddrs("2001:db8::10", "2001:db8::2"))
	assert.Zero(t, compareAddrs("2001:db8::1", "2001:db8::1"))
	assert.Negative(t, compareAddrs("2001:db8::1", "junk"), "addresses before anything else")
	assert.Positive(t, compareAddrs("junk", "2001:db8::1"))
	assert.Negative(t, compareAddrs("a", "b"))
}
