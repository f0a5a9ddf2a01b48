package stats

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// sampleStats returns a Stats with two upstreams, the second with a name
// that needs escaping in the exposition, and a few latencies.
func sampleStats(t testing.TB) *Stats {
	t.Helper()
	r := NewRegistry(10)
	a := r.Upstream("api.example.com", "*.example.com")
	a.Requests.Add(120)
	a.InFlight.Add(3)
	a.Waiting.Add(2)
	a.WaitNanos.Add(int64(2500 * time.Millisecond))
	a.Rejected.Add(4)
	a.Throttled.Add(1)
	a.Errors.Add(2)
	a.BytesUp.Add(1 << 20)
	a.BytesDown.Add(3 << 20)
	for range 10 {
		a.Latency.Observe(150 * time.Microsecond)
	}
	a.Latency.Observe(5 * time.Minute)

	b := r.Upstream(`we"ird\host`+"\n", "")
	b.Requests.Add(1)
	b.IPv4.Add(1)
	b.BytesDown.Add(10)
	b.Latency.Observe(3 * time.Millisecond)

	var add Histogram
	add.Observe(300 * time.Microsecond)
	add.Observe(700 * time.Microsecond)
	addSnap := add.Snapshot()

	var clients Clients
	clients.Connections.Add(7)
	clients.AcceptErrors.Add(3)
	clients.Refuse(RefusedMaxConnsPerClient)
	clients.Refuse(RefusedLoginThrottled)
	clients.Refuse(RefusedLoginThrottled)

	var sessions Sessions
	sessions.Rotated(RotatedHeader)
	sessions.Rotated(RotatedStatus)
	sessions.Rotated(RotatedStatus)

	ups := r.Snapshot()
	started := time.Date(2025, 3, 1, 12, 0, 0, 500_000_000, time.UTC)
	return &Stats{
		Started:       started,
		UptimeSeconds: 3661.5,
		Totals:        SumTotals(ups),
		Upstreams:     ups,
		Addresses: AddressStats{
			Live: 9, Ready: 4, InUse: 3, Warm: 2,
			Fresh: 600, Reused: 400, Retries: 3, Overflows: 1,
			Budget: &Budget{Rate: 2.5, MaxRate: 5, Burst: 96, Cap: 246, WindowSeconds: 60},
			Added:  1000, Removed: 991, AddFailures: 1, RemoveFailures: 2,
			AddLatency:          addSnap.Quantiles(),
			AddLatencyHistogram: addSnap,
			// 3fff::/20 is a documentation prefix too (RFC 9637); /64s are
			// labels, addresses never are (TestExpositionText).
			Subnets: []Subnet{
				{Subnet: "3fff:0:0:100::/64", Conns: 300, Open: 2},
				{Subnet: "3fff:0:0:101::/64", Conns: 299, Open: 1},
				{Subnet: OtherSubnet, Conns: 401},
			},
		},
		Clients:  clients.Snapshot(),
		Sessions: sessions.Snapshot(5),
		LimitStore: &LimitStore{Store: "redis://:xxxxx@store.example:6379/0", Shared: false, Since: started.Add(time.Hour),
			Decisions: 5000, LocalDecisions: 40, Errors: 3, Fallbacks: 1, LastError: "connection refused"},
	}
}

func TestSumTotals(t *testing.T) {
	assert.Equal(t, Counters{}, SumTotals(nil))
	got := SumTotals([]UpstreamStats{
		{Counters: Counters{Requests: 1, IPv4: 1, InFlight: 2, Waiting: 3, WaitSeconds: 0.5, Rejected: 4, Throttled: 5, Errors: 6, BytesUp: 7, BytesDown: 8}},
		{Counters: Counters{Requests: 10, IPv4: 2, InFlight: -1, Waiting: 30, WaitSeconds: 1.25, Rejected: 40, Throttled: 50, Errors: 60, BytesUp: 70, BytesDown: 80}},
	})
	assert.Equal(t, Counters{
		Requests: 11, IPv4: 3, InFlight: 1, Waiting: 33, WaitSeconds: 1.75, Rejected: 44,
		Throttled: 55, Errors: 66, BytesUp: 77, BytesDown: 88,
	}, got)
}

func TestJSONGolden(t *testing.T) {
	tests := []struct {
		name string
		v    any
	}{
		{"stats", sampleStats(t)},
		{"addrs", []Addr{
			{Addr: "2001:db8::1", State: "in-use", Since: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC), AgeSeconds: 12.5},
			{Addr: "2001:db8::2", State: "warm", Since: time.Date(2025, 3, 1, 12, 0, 1, 0, time.UTC), AgeSeconds: 11.5},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := json.MarshalIndent(tt.v, "", "  ")
			require.NoError(t, err)
			golden := filepath.Join("testdata", tt.name+".golden.json")
			if *update {
				require.NoError(t, os.WriteFile(golden, append(got, '\n'), 0o644))
			}
			want, err := os.ReadFile(golden)
			require.NoError(t, err)
			assert.JSONEq(t, string(want), string(got))
		})
	}
}

func TestJSONRoundTrip(t *testing.T) {
	s := sampleStats(t)
	b, err := json.Marshal(s)
	require.NoError(t, err)
	var back Stats
	require.NoError(t, json.Unmarshal(b, &back))

	// The histograms are not part of the JSON; everything else is.
	want := *s
	want.Upstreams = append([]UpstreamStats(nil), s.Upstreams...)
	for i := range want.Upstreams {
		want.Upstreams[i].LatencyHistogram = HistogramSnapshot{}
	}
	want.Addresses.AddLatencyHistogram = HistogramSnapshot{}
	assert.Equal(t, want, back)
}

func TestSessions(t *testing.T) {
	var s Sessions
	assert.Equal(t, SessionStats{Open: 0, Rotations: map[string]uint64{"header": 0, "user_name": 0, "admin": 0, "status": 0}},
		s.Snapshot(0), "every reason is listed, zeros included")
	s.Rotated(RotatedAdmin)
	s.Rotated(RotatedAdmin)
	s.Rotated(RotatedUserName)
	s.Rotated(0) // none: not counted
	s.Rotated(RotateReason(-1))
	s.Rotated(numRotateReasons)
	assert.Equal(t, SessionStats{Open: 3, Rotations: map[string]uint64{"header": 0, "user_name": 1, "admin": 2, "status": 0}},
		s.Snapshot(3))
	assert.Equal(t, "unknown", numRotateReasons.String())
	assert.Equal(t, []string{"header", "user_name", "admin", "status"}, RotateReasons)
}

func TestClients(t *testing.T) {
	var c Clients
	assert.Len(t, c.Snapshot().Refused, len(Refusals), "every refusal is listed, zeros included")
	c.Refuse(RefusedHeaderTimeout)
	c.Refuse(RefusedHeaderTimeout)
	c.Refuse(0) // none: not counted
	c.Refuse(Refusal(-1))
	c.Refuse(numRefusals)
	c.Connections.Add(2)
	s := c.Snapshot()
	assert.Equal(t, uint64(2), s.Refused["header_timeout"])
	assert.Equal(t, uint64(2), c.Refused(RefusedHeaderTimeout))
	assert.Equal(t, int64(2), s.Connections)
	var sum uint64
	for _, n := range s.Refused {
		sum += n
	}
	assert.Equal(t, uint64(2), sum)
	assert.Equal(t, "unknown", numRefusals.String())
	for i, name := range Refusals {
		assert.Equal(t, name, Refusal(i+1).String())
		assert.NotEmpty(t, name)
	}
}
