package proxy

import (
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/socks5"
	"github.com/egressd/egressd/proxy/stats"
)

// maxUpstreams bounds the upstreams accounted one by one; the rest share one
// entry, so that an open-ended set of hosts cannot grow memory or the
// metrics without bound.
const maxUpstreams = 1000

// shaped is the answer to a request the shaper refused: 429 with
// Retry-After. SOCKS5 has no "slow down": "not allowed by ruleset" is the
// closest.
func shaped(rej *shape.RejectError) *Error {
	e := refusal(http.StatusTooManyRequests, typeConnLimit, "%s", rej.Reason)
	e.Reply = socks5.ReplyNotAllowed
	e.retryAfter = rej.RetryAfter
	return e
}

// pushback is called with every upstream response to a plain HTTP request:
// a 429, or a 503 with Retry-After, counts as the upstream throttling us, and
// a Retry-After holds the upstream's rule until then (the shaper caps the
// hold).
func (s *Server) pushback(x *request, resp *http.Response) {
	if resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusServiceUnavailable {
		return
	}
	after, ok := parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
	if resp.StatusCode == http.StatusServiceUnavailable && !ok {
		return // an outage, not a request to slow down
	}
	if x.upstream != nil {
		x.upstream.Throttled.Add(1)
	}
	if shaper := s.shaper.Load(); ok && shaper != nil && x.upstreamHost != "" {
		if shaper.Pushback(x.upstreamHost, after) {
			s.log.Info("upstream asked to slow down", "upstream", x.upstreamHost, "status", resp.StatusCode, "retry_after", after)
		}
	}
}

// parseRetryAfter reads a Retry-After value: delay-seconds or an HTTP-date
// (RFC 9110 section 10.2.3).
func parseRetryAfter(v string, now time.Time) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	if n, err := strconv.ParseUint(v, 10, 32); err == nil {
		return time.Duration(n) * time.Second, true
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(t.Sub(now), 0), true
	}
	return 0, false
}

// Upstreams returns the per-upstream statistics.
func (s *Server) Upstreams() []stats.UpstreamStats { return s.stats.Snapshot() }
