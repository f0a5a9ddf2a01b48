package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/stats"
)

// maxUpstreams bounds the upstreams accounted one by one; the rest share one
// entry, so that an open-ended set of hosts cannot grow memory or the
// metrics without bound.
const maxUpstreams = 1000

// maxPushback caps how long an upstream's Retry-After may hold its rule.
const maxPushback = time.Hour

// admit accounts a request to its upstream and waits for its turn under the
// shaper. It reports whether the request may go on; if not, it has answered
// the client (429 with Retry-After) or the client has gone away. A request
// that was admitted is finished by finish, which ServeHTTP defers.
func (s *Server) admit(w http.ResponseWriter, r *http.Request, host string, rec *record, closeConn bool) bool {
	err := s.acquire(r.Context(), host, rec)
	if err == nil {
		return true
	}
	if rej, ok := errors.AsType[*shape.RejectError](err); ok {
		w.Header().Set("Retry-After", strconv.Itoa(retryAfterSeconds(rej.RetryAfter)))
		refuse(w, rec, refusal(http.StatusTooManyRequests, typeConnLimit, "%s", rej.Reason), closeConn)
		return false
	}
	// The client hung up while waiting; there is nobody to answer.
	rec.status = statusClientClosed
	return false
}

// acquire is admit without the answer, for every protocol: it accounts a
// request to its upstream (in rec, and in the request state ctx carries) and
// waits for its turn under the shaper. It returns nil if the request may go
// on, a *shape.RejectError if the shaper refused it (counted as rejected),
// or ctx's error if ctx was done first. Either way the caller finishes the
// request with finish.
func (s *Server) acquire(ctx context.Context, host string, rec *record) error {
	host = normHost(host)
	shaper := s.shaper.Load() // the same one for the whole request, across a reload
	rule := ""
	if shaper != nil {
		if ru, ok := shaper.RuleFor(host); ok {
			rule = ru.Host
		}
	}
	up := s.stats.Upstream(host, rule)
	rec.upstream = up
	if st := stateFrom(ctx); st != nil {
		st.host, st.upstream = host, up
	}
	up.Requests.Add(1)
	if shaper == nil {
		rec.admitted = time.Now()
		up.InFlight.Add(1)
		return nil
	}

	start := time.Now()
	up.Waiting.Add(1)
	permit, err := shaper.Acquire(ctx, host)
	up.Waiting.Add(-1)
	now := time.Now()
	up.WaitNanos.Add(int64(now.Sub(start)))
	if err != nil {
		if _, ok := errors.AsType[*shape.RejectError](err); ok {
			up.Rejected.Add(1)
		}
		return err
	}
	rec.admitted, rec.permit = now, permit
	up.InFlight.Add(1)
	if rule != "" && s.log.Enabled(ctx, slog.LevelDebug) {
		// When a rule let the request go upstream: the pacing egressd
		// promises, apart from the network's delays after it.
		s.log.LogAttrs(ctx, slog.LevelDebug, "admitted", slog.String("host", host),
			slog.String("rule", rule), slog.Duration("waited", now.Sub(start)))
	}
	return nil
}

// statusClientClosed is what the access log says of a request whose client
// went away before it was answered (nginx's 499).
const statusClientClosed = 499

// finish ends the accounting of a request: the fresh egress address it
// held, the refusal it counts as, its bytes, and for one that admit let
// through (rec.admitted is set only then) its permit, in-flight count,
// whether it went over IPv4, error and latency.
func (s *Server) finish(rec *record, st *reqState) {
	st.releaseAddr()
	s.clientStats.Refuse(rec.refused)
	s.clientStats.Refuse(st.refused)
	up := rec.upstream
	if up == nil {
		return // refused before it was attributed to an upstream (400)
	}
	up.BytesUp.Add(uint64(max(rec.up, 0)))
	up.BytesDown.Add(uint64(max(rec.down-rec.own, 0))) // only what came from upstream
	if rec.admitted.IsZero() {
		return // refused with 429, or the client left while waiting
	}
	rec.permit.Release()
	up.InFlight.Add(-1)
	if st.ipv4.Load() {
		up.IPv4.Add(1)
	}
	if st.failed || st.bodyErr != nil {
		up.Errors.Add(1)
	}
	if !st.answered.IsZero() {
		up.Latency.Observe(st.answered.Sub(rec.admitted))
	}
}

// pushback is called with every upstream response to a plain HTTP request:
// a 429, or a 503 with Retry-After, counts as the upstream throttling us, and
// a Retry-After holds the upstream's rule until then.
func (s *Server) pushback(st *reqState, resp *http.Response) {
	if resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusServiceUnavailable {
		return
	}
	after, ok := parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
	if resp.StatusCode == http.StatusServiceUnavailable && !ok {
		return // an outage, not a request to slow down
	}
	if st.upstream != nil {
		st.upstream.Throttled.Add(1)
	}
	if shaper := s.shaper.Load(); ok && shaper != nil && st.host != "" {
		if shaper.Pushback(st.host, min(after, maxPushback)) {
			s.log.Info("upstream asked to slow down", "upstream", st.host, "status", resp.StatusCode, "retry_after", after)
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

// retryAfterSeconds rounds d up to the whole seconds Retry-After carries.
func retryAfterSeconds(d time.Duration) int {
	return max(1, int((d+time.Second-1)/time.Second))
}

// normHost returns the host name as rules and statistics key it: lower
// case, without a trailing dot. It allocates only for upper-case names.
func normHost(h string) string {
	h = strings.TrimSuffix(h, ".")
	for i := 0; i < len(h); i++ {
		if c := h[i]; 'A' <= c && c <= 'Z' {
			return strings.ToLower(h)
		}
	}
	return h
}

// Upstreams returns the per-upstream statistics.
func (s *Server) Upstreams() []stats.UpstreamStats { return s.stats.Snapshot() }
