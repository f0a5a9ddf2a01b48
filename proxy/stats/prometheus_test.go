package stats_test

import (
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/egressd/egressd/proxy/stats"
	"github.com/egressd/egressd/proxy/stats/promstats"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// parse parses an exposition as Prometheus would.
func parse(t *testing.T, text string) map[string]*dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(text))
	require.NoError(t, err, "exposition:\n%s", text)
	return mfs
}

// write returns what GET /metrics serves for s.
func write(t *testing.T, s *stats.Stats) string {
	t.Helper()
	code, body := scrape(t, s)
	require.Equal(t, http.StatusOK, code, body)
	return body
}

// scrape is GET /metrics of promstats.Handler over s, asked as curl asks:
// without Accept.
func scrape(t testing.TB, s *stats.Stats) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	promstats.Handler(func() *stats.Stats { return s }).ServeHTTP(rec, req)
	b, err := io.ReadAll(rec.Result().Body)
	require.NoError(t, err)
	if rec.Code == http.StatusOK {
		require.True(t, strings.HasPrefix(rec.Header().Get("Content-Type"), "text/plain; version=0.0.4; charset=utf-8"), rec.Header().Get("Content-Type"))
	}
	return rec.Code, string(b)
}

// byUpstream returns the metrics of mf keyed by their upstream label.
func byUpstream(t *testing.T, mf *dto.MetricFamily) map[string]*dto.Metric {
	t.Helper()
	m := map[string]*dto.Metric{}
	for _, metric := range mf.GetMetric() {
		require.Len(t, metric.GetLabel(), 1, "%s: only the upstream label", mf.GetName())
		l := metric.GetLabel()[0]
		require.Equal(t, "upstream", l.GetName())
		_, dup := m[l.GetValue()]
		require.False(t, dup, "%s: duplicate upstream %q", mf.GetName(), l.GetValue())
		m[l.GetValue()] = metric
	}
	return m
}

func TestSeriesNames(t *testing.T) {
	seen := map[string]bool{}
	for _, f := range promstats.Series {
		assert.True(t, strings.HasPrefix(f.Name, "egress_"), f.Name)
		assert.True(t, model.LegacyValidation.IsValidMetricName(f.Name), f.Name)
		assert.False(t, seen[f.Name], "duplicate %s", f.Name)
		seen[f.Name] = true
		assert.NotEmpty(t, f.Help, f.Name)
		switch f.Type {
		case "counter":
			assert.True(t, strings.HasSuffix(f.Name, "_total"), "counter %s ends in _total", f.Name)
		case "gauge", "histogram":
			assert.False(t, strings.HasSuffix(f.Name, "_total"), "%s %s does not end in _total", f.Type, f.Name)
		default:
			t.Errorf("%s: unknown type %q", f.Name, f.Type)
		}
	}
}

func TestExpositionFamilies(t *testing.T) {
	mfs := parse(t, write(t, stats.SampleStats(t)))

	var got, want []string
	for name := range mfs {
		got = append(got, name)
	}
	for _, f := range promstats.Series {
		want = append(want, f.Name)
		mf := mfs[f.Name]
		if !assert.NotNil(t, mf, f.Name) {
			continue
		}
		assert.Equal(t, f.Help, mf.GetHelp(), f.Name)
		assert.Equal(t, strings.ToUpper(f.Type), mf.GetType().String(), f.Name)
	}
	slices.Sort(got)
	slices.Sort(want)
	assert.Equal(t, want, got, "the exposition has exactly promstats.Series")
}

func TestExpositionValues(t *testing.T) {
	s := stats.SampleStats(t)
	mfs := parse(t, write(t, s))
	const api, odd = "api.example.com", "we\"ird\\host\n"

	counter := func(name, up string) float64 {
		t.Helper()
		m := byUpstream(t, mfs[name])[up]
		require.NotNil(t, m, "%s{upstream=%q}", name, up)
		return m.GetCounter().GetValue()
	}
	gauge := func(name, up string) float64 {
		t.Helper()
		m := byUpstream(t, mfs[name])[up]
		require.NotNil(t, m, "%s{upstream=%q}", name, up)
		return m.GetGauge().GetValue()
	}
	plain := func(name string) *dto.Metric {
		t.Helper()
		require.Len(t, mfs[name].GetMetric(), 1, name)
		m := mfs[name].GetMetric()[0]
		assert.Empty(t, m.GetLabel(), name)
		return m
	}

	assert.Equal(t, 120.0, counter("egress_upstream_requests_total", api))
	assert.Equal(t, 1.0, counter("egress_upstream_requests_total", odd))
	assert.Equal(t, 0.0, counter("egress_upstream_ipv4_requests_total", api))
	assert.Equal(t, 1.0, counter("egress_upstream_ipv4_requests_total", odd))
	assert.Equal(t, 2.5, counter("egress_upstream_wait_seconds_total", api))
	assert.Equal(t, 4.0, counter("egress_upstream_rejected_total", api))
	assert.Equal(t, 1.0, counter("egress_upstream_throttled_total", api))
	assert.Equal(t, 2.0, counter("egress_upstream_errors_total", api))
	assert.Equal(t, float64(1<<20), counter("egress_upstream_sent_bytes_total", api))
	assert.Equal(t, float64(3<<20), counter("egress_upstream_received_bytes_total", api))
	assert.Equal(t, 10.0, counter("egress_upstream_received_bytes_total", odd))
	assert.Equal(t, 3.0, gauge("egress_upstream_requests_in_flight", api))
	assert.Equal(t, 2.0, gauge("egress_upstream_requests_waiting", api))
	assert.Equal(t, 0.0, gauge("egress_upstream_requests_waiting", odd))

	h := byUpstream(t, mfs["egress_upstream_request_duration_seconds"])[api].GetHistogram()
	require.NotNil(t, h)
	assert.Equal(t, uint64(11), h.GetSampleCount())
	assert.InDelta(t, 300.0015, h.GetSampleSum(), 1e-9)
	buckets := h.GetBucket()
	require.Len(t, buckets, 22)
	assert.Equal(t, 0.0001, buckets[0].GetUpperBound())
	assert.Equal(t, uint64(0), buckets[0].GetCumulativeCount())
	assert.Equal(t, uint64(10), buckets[1].GetCumulativeCount())
	assert.Equal(t, uint64(10), buckets[20].GetCumulativeCount(), "cumulative; the 5m one is only in +Inf")
	assert.Equal(t, 104.8576, buckets[20].GetUpperBound())
	assert.True(t, math.IsInf(buckets[21].GetUpperBound(), 1))
	assert.Equal(t, uint64(11), buckets[21].GetCumulativeCount())

	assert.Equal(t, 9.0, plain("egress_address_live").GetGauge().GetValue())
	assert.Equal(t, 4.0, plain("egress_address_ready").GetGauge().GetValue())
	assert.Equal(t, 3.0, plain("egress_address_in_use").GetGauge().GetValue())
	assert.Equal(t, 2.0, plain("egress_address_warm").GetGauge().GetValue())
	assert.Equal(t, 600.0, plain("egress_address_fresh_total").GetCounter().GetValue())
	assert.Equal(t, 400.0, plain("egress_address_reused_total").GetCounter().GetValue())
	assert.Equal(t, 3.0, plain("egress_address_retries_total").GetCounter().GetValue())
	assert.Equal(t, 1.0, plain("egress_address_overflows_total").GetCounter().GetValue())
	assert.Equal(t, 2.5, plain("egress_address_budget_rate").GetGauge().GetValue())
	assert.Equal(t, 5.0, plain("egress_address_budget_max_rate").GetGauge().GetValue())
	assert.Equal(t, 96.0, plain("egress_address_budget_burst").GetGauge().GetValue())
	assert.Equal(t, 246.0, plain("egress_address_budget_cap").GetGauge().GetValue())
	assert.Equal(t, 60.0, plain("egress_address_budget_window_seconds").GetGauge().GetValue())
	assert.Equal(t, 1000.0, plain("egress_address_added_total").GetCounter().GetValue())
	assert.Equal(t, 991.0, plain("egress_address_removed_total").GetCounter().GetValue())
	assert.Equal(t, 1.0, plain("egress_address_add_failures_total").GetCounter().GetValue())
	assert.Equal(t, 2.0, plain("egress_address_remove_failures_total").GetCounter().GetValue())
	ah := plain("egress_address_add_duration_seconds").GetHistogram()
	assert.Equal(t, uint64(2), ah.GetSampleCount())
	assert.InDelta(t, 0.001, ah.GetSampleSum(), 1e-12)
	assert.Equal(t, uint64(1), ah.GetBucket()[2].GetCumulativeCount()) // (200µs, 400µs]
	assert.Equal(t, uint64(2), ah.GetBucket()[3].GetCumulativeCount()) // (400µs, 800µs]

	assert.Equal(t, 0.0, plain("egress_limit_store_up").GetGauge().GetValue())
	assert.Equal(t, 5000.0, plain("egress_limit_store_decisions_total").GetCounter().GetValue())
	assert.Equal(t, 40.0, plain("egress_limit_store_local_decisions_total").GetCounter().GetValue())
	assert.Equal(t, 3.0, plain("egress_limit_store_errors_total").GetCounter().GetValue())
	assert.Equal(t, 1.0, plain("egress_limit_store_fallbacks_total").GetCounter().GetValue())
	subnets := map[string][2]float64{}
	for _, m := range mfs["egress_subnet_connections_total"].GetMetric() {
		require.Len(t, m.GetLabel(), 1)
		require.Equal(t, "subnet", m.GetLabel()[0].GetName())
		subnets[m.GetLabel()[0].GetValue()] = [2]float64{m.GetCounter().GetValue(), -1}
	}
	for _, m := range mfs["egress_subnet_open_connections"].GetMetric() {
		v := subnets[m.GetLabel()[0].GetValue()]
		v[1] = m.GetGauge().GetValue()
		subnets[m.GetLabel()[0].GetValue()] = v
	}
	assert.Equal(t, map[string][2]float64{
		"3fff:0:0:100::/64": {300, 2}, "3fff:0:0:101::/64": {299, 1}, stats.OtherSubnet: {401, 0},
	}, subnets, "connections made and open, per /64")

	assert.Equal(t, 7.0, plain("egress_client_connections").GetGauge().GetValue())
	assert.Equal(t, 3.0, plain("egress_client_accept_errors_total").GetCounter().GetValue())
	refused := map[string]float64{}
	for _, m := range mfs["egress_client_refused_total"].GetMetric() {
		require.Len(t, m.GetLabel(), 1)
		require.Equal(t, "reason", m.GetLabel()[0].GetName())
		refused[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
	}
	assert.Len(t, refused, len(stats.Refusals), "a series per reason, zeros included")
	assert.Equal(t, 1.0, refused["max_conns_per_client"])
	assert.Equal(t, 2.0, refused["login_throttled"])
	assert.Equal(t, 0.0, refused["header_timeout"])

	assert.Equal(t, 5.0, plain("egress_session_open").GetGauge().GetValue())
	rotations := map[string]float64{}
	for _, m := range mfs["egress_session_rotations_total"].GetMetric() {
		require.Len(t, m.GetLabel(), 1)
		require.Equal(t, "reason", m.GetLabel()[0].GetName())
		rotations[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
	}
	assert.Equal(t, map[string]float64{"header": 1, "user_name": 0, "admin": 0, "status": 2}, rotations, "a series per reason, zeros included")

	assert.Equal(t, 3661.5, plain("egress_uptime_seconds").GetGauge().GetValue())
	assert.Equal(t, float64(s.Started.Unix())+0.5, plain("egress_start_time_seconds").GetGauge().GetValue())
}

func TestExpositionText(t *testing.T) {
	// What a person reading /metrics sees: HELP before TYPE before the
	// samples, and the buckets.
	text := write(t, stats.SampleStats(t))
	assert.Contains(t, text, "# HELP egress_upstream_requests_total Requests and CONNECT tunnels")
	assert.Contains(t, text, "# TYPE egress_upstream_requests_total counter\n"+
		`egress_upstream_requests_total{upstream="api.example.com"} 120`+"\n"+
		`egress_upstream_requests_total{upstream="we\"ird\\host\n"} 1`+"\n")
	assert.Contains(t, text, `egress_upstream_request_duration_seconds_bucket{upstream="api.example.com",le="0.0002"} 10`+"\n")
	assert.Contains(t, text, `egress_upstream_request_duration_seconds_bucket{upstream="api.example.com",le="+Inf"} 11`+"\n")
	assert.Contains(t, text, `egress_upstream_request_duration_seconds_count{upstream="api.example.com"} 11`+"\n")
	assert.Contains(t, text, `egress_address_add_duration_seconds_bucket{le="+Inf"} 2`+"\n")
	assert.Contains(t, text, "egress_address_live 9\n")
	assert.NotContains(t, text, "2001:db8", "never labelled by address")
}

func TestExpositionLabelEscaping(t *testing.T) {
	hosts := []string{
		`quo"te`,
		`back\slash`,
		"new\nline",
		`trailing\`,
		`\"`,
		"tab\there",
		"spa ce",
		"brace}s{",
		"comma,le=\"1\"",
		"ünïcödé.example",
		"xn--bcher-kva.example",
		"[2001:db8::1]",
		"#comment",
	}
	s := &stats.Stats{}
	for i, h := range hosts {
		s.Upstreams = append(s.Upstreams, stats.UpstreamStats{Upstream: h, Counters: stats.Counters{Requests: uint64(i + 1)}})
	}
	mfs := parse(t, write(t, s))
	got := byUpstream(t, mfs["egress_upstream_requests_total"])
	require.Len(t, got, len(hosts))
	for i, h := range hosts {
		m := got[h]
		if assert.NotNil(t, m, "%q survives the round trip", h) {
			assert.Equal(t, float64(i+1), m.GetCounter().GetValue(), "%q", h)
		}
	}
}

func TestExpositionInvalidUTF8(t *testing.T) {
	// The Registry keeps such hosts out, but a Stats built otherwise must
	// still produce an exposition Prometheus accepts.
	s := &stats.Stats{Upstreams: []stats.UpstreamStats{{Upstream: "bad\xff\xfehost", Counters: stats.Counters{Requests: 1}}}}
	got := byUpstream(t, parse(t, write(t, s))["egress_upstream_requests_total"])
	assert.Contains(t, got, "bad\uFFFDhost")
}

func TestExpositionEmpty(t *testing.T) {
	// No upstreams, and histograms without buckets as in a Stats decoded
	// from JSON: still valid. A family without samples is left out whole:
	// the text format has no family without samples.
	text := write(t, &stats.Stats{Started: time.Unix(1700000000, 0)})
	mfs := parse(t, text)
	assert.NotContains(t, mfs, "egress_upstream_requests_total")
	assert.NotContains(t, text, "egress_upstream_requests_total")
	assert.Equal(t, 1.7e9, mfs["egress_start_time_seconds"].GetMetric()[0].GetGauge().GetValue())
	assert.Equal(t, uint64(0), mfs["egress_address_add_duration_seconds"].GetMetric()[0].GetHistogram().GetSampleCount())
	assert.NotContains(t, mfs, "egress_address_budget_rate", "no budget (routed mode): no sample")
	assert.NotContains(t, text, "egress_address_budget_rate")
	assert.NotContains(t, mfs, "egress_limit_store_up", "no -limit-store: no sample")
}

func TestExpositionError(t *testing.T) {
	// Two samples of one series make no valid exposition: a 500 saying
	// why, not a page Prometheus would reject.
	s := &stats.Stats{Upstreams: []stats.UpstreamStats{{Upstream: "twice.example"}, {Upstream: "twice.example"}}}
	code, body := scrape(t, s)
	assert.Equal(t, http.StatusInternalServerError, code)
	assert.Contains(t, body, "twice.example")
}

func TestCollectorPedantic(t *testing.T) {
	// Every sample matches a described family; collecting twice registers
	// nothing new and yields the same families.
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(promstats.NewCollector(func() *stats.Stats { return stats.SampleStats(t) })))
	first, err := reg.Gather()
	require.NoError(t, err)
	second, err := reg.Gather()
	require.NoError(t, err)
	assert.Len(t, first, len(promstats.Series))
	assert.Len(t, second, len(first))
}

func BenchmarkExposition(b *testing.B) {
	r := stats.NewRegistry(100)
	for i := range 100 {
		u := r.Upstream(strings.Repeat("x", i%7)+".example.com"+string(rune('a'+i%26))+string(rune('a'+i/26)), "")
		u.Latency.Observe(time.Duration(i) * time.Millisecond)
	}
	s := &stats.Stats{Upstreams: r.Snapshot()}
	h := promstats.Handler(func() *stats.Stats { return s })
	req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	b.ReportAllocs()
	for b.Loop() {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			b.Fatal(rec.Body.String())
		}
	}
}

// TestDocsListEverySeries keeps the table of series in docs/design.md true.
func TestDocsListEverySeries(t *testing.T) {
	doc, err := os.ReadFile("../../docs/design.md")
	require.NoError(t, err)
	for _, f := range promstats.Series {
		assert.True(t, strings.Contains(string(doc), "| `"+f.Name+"` |"), "docs/design.md's table does not list %s", f.Name)
	}
}
