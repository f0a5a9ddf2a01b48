// Package admin is egressd's admin API: the HTTP handler egressd serves on a
// listener of its own (NewHandler, Listen), the client egressctl uses
// (Client), the answers of POST /reload and POST /sessions/KEY/rotate
// (ReloadResult, RotateResult; the statistics are proxy/stats' documents),
// and where the API listens (DefaultAddr, IsUnix).
//
// It imports neither the proxy nor netlink: egressd hands the handler what
// it serves as funcs, so that egressctl links only this package and
// proxy/stats.
package admin

import (
	"errors"
	"strings"
)

// DefaultAddr is where the admin API listens unless -admin says otherwise;
// systemd's RuntimeDirectory=egressd makes the directory.
const DefaultAddr = "/run/egressd/admin.sock"

// IsUnix reports whether an -admin value names a unix socket (a path)
// rather than a TCP host:port: it starts with '/' or '.', or has no ':'.
func IsUnix(addr string) bool {
	return strings.HasPrefix(addr, "/") || strings.HasPrefix(addr, ".") || !strings.Contains(addr, ":")
}

// ReloadResult is the JSON answer of POST /reload: 200 with OK set and
// Message saying what changed, or 422 with Error saying why the new
// configuration was refused.
type ReloadResult struct {
	OK      bool   `json:"ok"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

// RotateResult is the JSON answer of POST /sessions/KEY/rotate: 200 with OK
// set, Message saying what happened, and Old the address the session's
// connections left from (empty if it had not connected yet); or 404 (no
// such session), 409 (egressd does not run -rotate session) or 400 (an
// empty key) with Error saying why. The new address is not known yet: the
// session's next connection leases it.
type RotateResult struct {
	OK      bool   `json:"ok"`
	Session string `json:"session"`
	Rotated bool   `json:"rotated"`
	Old     string `json:"old,omitempty"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

// The errors of Config.Rotate that the handler answers with a status and a
// line of its own: ErrNoSession 404 (no session open with the key),
// ErrNoSessions 409 (egressd does not run -rotate session).
var (
	ErrNoSession  = errors.New("no such session")
	ErrNoSessions = errors.New("no sessions")
)
