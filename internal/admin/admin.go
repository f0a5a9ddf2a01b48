// Package admin is egressd's admin API: the HTTP handler egressd serves on a
// listener of its own (NewHandler, Listen), the client egressctl uses
// (Client), the answer of POST /reload (ReloadResult; the statistics are
// proxy/stats' documents), and where the API listens (DefaultAddr, IsUnix).
//
// It imports neither the proxy nor netlink: egressd hands the handler what
// it serves as funcs, so that egressctl links only this package and
// proxy/stats.
package admin

import "strings"

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
