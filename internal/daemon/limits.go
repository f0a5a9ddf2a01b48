package daemon

import (
	"log/slog"
	"strings"

	"github.com/egressd/egressd/proxy/auth"
	"golang.org/x/sys/unix"
)

// checkFileLimit warns, in one line, when the open-file limit is too low
// for -max-conns: every client connection takes a descriptor, and so does
// its upstream connection, plus a few dozen for listeners, netlink and the
// admin API. Go has already raised the soft limit to the hard one, so what
// is left to raise is the hard limit: LimitNOFILE= under systemd.
func checkFileLimit(log *slog.Logger, maxConns int) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return
	}
	if want := 2*uint64(maxConns) + 64; rl.Cur < want {
		log.Warn("the open-file limit is below what -max-conns needs: raise LimitNOFILE= (systemd) or ulimit -n, or lower -max-conns",
			"limit", rl.Cur, "max_conns", maxConns, "needs", want)
	}
}

// warnWeakHashes warns, in one line, about users of the auth file whose
// bcrypt hashes are cheap to guess: htpasswd -B makes cost 5 by default,
// about 1,000 guesses a second from one client.
func warnWeakHashes(log *slog.Logger, file string, users *auth.Users) {
	if users == nil {
		return
	}
	weak, cost := users.Weak()
	if len(weak) == 0 {
		return
	}
	log.Warn("auth-file has bcrypt hashes cheap to guess: make them again with htpasswd -B -C 10",
		"file", file, "users", strings.Join(weak, ","), "cost", cost, "want_cost", auth.MinCost)
}
