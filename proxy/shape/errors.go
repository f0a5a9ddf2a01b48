package shape

import (
	"fmt"
	"math"
	"time"
)

// RejectError is a request the shaper turned away; the proxy answers it with
// 429 Too Many Requests and a Retry-After of RetryAfter. Reason names only
// the host the client asked for, so it is safe to send to the client.
type RejectError struct {
	Host       string        // the host of the request, normalized
	Rule       string        // the Host of the rule that applied
	RetryAfter time.Duration // whole seconds, at least 1s
	Reason     string        // one line, e.g. "too many requests waiting for example.org"
}

// Error returns Reason.
func (e *RejectError) Error() string { return e.Reason }

// reject builds a RejectError for host under rule, with retry rounded up.
func reject(host string, rule *Rule, retry time.Duration, format string, args ...any) *RejectError {
	return &RejectError{
		Host:       host,
		Rule:       rule.Host,
		RetryAfter: ceilSeconds(retry),
		Reason:     fmt.Sprintf(format, args...),
	}
}

// RetryAfterSeconds is d as the whole seconds a Retry-After header carries:
// rounded up, at least one.
func RetryAfterSeconds(d time.Duration) int { return int(ceilSeconds(d) / time.Second) }

// ceilSeconds rounds d up to whole seconds, at least one.
func ceilSeconds(d time.Duration) time.Duration {
	const most = time.Duration(math.MaxInt64) / time.Second * time.Second
	switch {
	case d <= time.Second:
		return time.Second
	case d > most-time.Second:
		return most
	}
	return (d + time.Second - 1) / time.Second * time.Second
}
