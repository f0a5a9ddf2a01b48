package stats

import "sync/atomic"

// RotateReason is what made a session (-rotate session) give up its address
// for a new one, for the counters of Sessions and the reason label of
// egress_session_rotations_total. The set is fixed.
type RotateReason int

// The reasons, in the order the exposition lists them. The zero RotateReason
// is none: it is never counted.
const (
	_ RotateReason = iota
	// RotatedHeader: a request carried X-Egress-Rotate: 1.
	RotatedHeader
	// RotatedUserName: a request or SOCKS5 tunnel came with the proxy user
	// name session-KEY-rotate (or USER-session-KEY-rotate).
	RotatedUserName
	// RotatedAdmin: POST /sessions/KEY/rotate of the admin API (egressctl
	// rotate).
	RotatedAdmin
	// RotatedStatus: the upstream answered a plain HTTP request of the
	// session with a status of -rotate-on.
	RotatedStatus

	numRotateReasons
)

var rotateReasonNames = [numRotateReasons]string{
	RotatedHeader:   "header",
	RotatedUserName: "user_name",
	RotatedAdmin:    "admin",
	RotatedStatus:   "status",
}

// String is the reason's name: the key in SessionStats.Rotations and the
// value of the reason label.
func (r RotateReason) String() string { return nameOf(rotateReasonNames[:], int(r)) }

func (r RotateReason) valid() bool { return r > 0 && r < numRotateReasons }

// RotateReasons lists every reason name, in the order of the constants.
var RotateReasons = rotateReasonNames[1:]

// Sessions holds the live counters of sessions. It is safe for concurrent
// use; the zero value is ready.
type Sessions struct {
	rotations [numRotateReasons]atomic.Uint64
}

// Rotated counts one rotation. The zero RotateReason is not counted.
func (s *Sessions) Rotated(r RotateReason) {
	if r.valid() {
		s.rotations[r].Add(1)
	}
}

// Snapshot returns the counters as the JSON of GET /stats carries them, with
// open the sessions open now, and every reason named, zeros included.
func (s *Sessions) Snapshot(open int) SessionStats {
	return SessionStats{Open: open, Rotations: countsByName(s.rotations[:], rotateReasonNames[:])}
}

// nameOf is the name of kind k of an enumeration named by names, whose
// zero value (index 0) is none: "unknown" for none or out of range.
func nameOf(names []string, k int) string {
	if k <= 0 || k >= len(names) {
		return "unknown"
	}
	return names[k]
}

// countsByName is counts[k] by names[k] for every kind k of an
// enumeration but none (index 0), zeros included.
func countsByName(counts []atomic.Uint64, names []string) map[string]uint64 {
	m := make(map[string]uint64, len(names)-1)
	for k := 1; k < len(names); k++ {
		m[names[k]] = counts[k].Load()
	}
	return m
}

// SessionStats is the "sessions" section of GET /stats.
type SessionStats struct {
	// Open is the sessions open now (-rotate session; 0 otherwise).
	Open int `json:"open"`
	// Rotations counts the sessions that gave up their address for a new
	// one, by reason (see RotateReason); every name is there.
	Rotations map[string]uint64 `json:"rotations"`
}
