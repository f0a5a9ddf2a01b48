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
func (r RotateReason) String() string {
	if !r.valid() {
		return "unknown"
	}
	return rotateReasonNames[r]
}

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
	st := SessionStats{Open: open, Rotations: make(map[string]uint64, len(RotateReasons))}
	for r := RotatedHeader; r < numRotateReasons; r++ {
		st.Rotations[r.String()] = s.rotations[r].Load()
	}
	return st
}

// SessionStats is the "sessions" section of GET /stats.
type SessionStats struct {
	// Open is the sessions open now (-rotate session; 0 otherwise).
	Open int `json:"open"`
	// Rotations counts the sessions that gave up their address for a new
	// one, by reason (see RotateReason); every name is there.
	Rotations map[string]uint64 `json:"rotations"`
}
