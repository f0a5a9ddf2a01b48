// Package shape paces the requests egressd sends to each upstream host.
//
// An operator writes rules such as
//
//	aur.archlinux.org=60r/m,burst=10,concurrency=4,wait=2m
//
// (ParseRule). A rule names an exact host, a "*.suffix" wildcard or "*" for
// every other host; the most specific rule that matches a host applies
// (Shaper.RuleFor), and a host that matches none is not shaped at all. Every
// host gets its own token bucket (golang.org/x/time/rate) and its own cap on
// requests in flight, with its rule's parameters: "*=10r/s" gives each host
// 10 requests a second.
//
// A request over the rate is not refused outright: it waits in line, first
// come first served, for at most its rule's wait, then for a concurrency slot
// within the same deadline. Only the head of the line holds a rate
// reservation, so a client that hangs up leaves the line at once and everyone
// behind it moves up a place. A request that could not get through in time,
// or finds the line full, is rejected with a *RejectError that says when to
// retry; the proxy answers it with 429 and Retry-After.
//
// An upstream that answers 429 or 503 with Retry-After can hold its host
// (Shaper.Pushback): requests wait until the hold ends if their wait allows,
// and are rejected otherwise.
//
// Memory is bounded: at most 10,000 hosts keep a state of their own; when
// that is full, idle states are dropped, and if none is idle the new hosts of
// a rule share one overflow state.
//
// With a Shared (egressd's -limit-store), the rate and burst of every rule
// are a budget that all egressd instances naming the same Store share, one
// bucket per rule and upstream host (package redisstore keeps them in
// Redis): only the head of a host's line asks the store, and waits the
// retry it names before asking again. Concurrency caps and Pushback holds
// stay per process. A store that does not answer in time is replaced by
// the in-process buckets until it answers again.
//
// All time comes from a Clock, so tests drive the shaper with a fake one.
package shape
