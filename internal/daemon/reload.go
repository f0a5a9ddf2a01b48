package daemon

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy"
	"github.com/egressd/egressd/proxy/auth"
	"github.com/egressd/egressd/proxy/shape"
)

// reloadable are the settings a reload applies to the running egressd; every
// other one (listen, mode, prefix, interface, ...) needs a restart.
var reloadable = []string{"limit", "allow", "auth-file", "allow-dest", "connect-ports", "http-ports", "log-level", "grace",
	"max-conns", "max-conns-per-client", "max-addrs-per-client"}

// live is what a Config makes of the settings that can change while egressd
// runs, ready to be swapped in.
type live struct {
	access   proxy.Access
	shaper   *shape.Shaper // nil: no -limit
	authHash [sha256.Size]byte
}

// newLive reads the auth file and builds the shaper of cfg, sharing its
// budgets through shared when it is not nil (-limit-store).
func newLive(cfg Config, shared *shape.Shared) (live, error) {
	var l live
	l.access.Allow = cfg.allowed()
	l.access.ConnectPorts, l.access.HTTPPorts = cfg.ConnectPorts, cfg.HTTPPorts
	if cfg.AuthFile != "" {
		data, err := os.ReadFile(cfg.AuthFile)
		if err != nil {
			return live{}, fmt.Errorf("auth-file: %w", err)
		}
		if l.access.Users, err = auth.Parse(bytes.NewReader(data), cfg.AuthFile); err != nil {
			return live{}, err
		}
		l.authHash = sha256.Sum256(data)
	}
	if len(cfg.Limits) > 0 {
		var err error
		if l.shaper, err = shape.New(shape.Config{Rules: cfg.Limits, Shared: shared}); err != nil {
			return live{}, fmt.Errorf("limit: %w", err)
		}
	}
	return l, nil
}

// reloader applies a new configuration to a running egressd: on SIGHUP and
// on POST /reload of the admin API. Reloads run one at a time.
type reloader struct {
	srv    *proxy.Server
	guard  *netutil.Guard
	level  *slog.LevelVar
	log    *slog.Logger
	notify *notifier
	shared *shape.Shared // -limit-store, for every new shaper; nil without

	mu       sync.Mutex
	cfg      Config // in force: the reloadable settings as last applied, the others as at start
	live     live
	stopping bool // shutdown began: no more reloads, nor READY=1
}

// stop refuses further reloads, once shutdown has begun, and tells systemd.
func (r *reloader) stop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stopping = true
	_ = r.notify.send("STOPPING=1", "STATUS=shutting down")
}

// current returns the configuration in force.
func (r *reloader) current() Config {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cfg
}

// Reload reads the config file and the command line again, as at start, and
// applies the settings that can change live: the -limit rules (a new shaper
// for new requests; those waiting finish under the old one), the allow list,
// the users (the auth file is read again even if its name did not change),
// the log level and the grace period. Open connections and tunnels go on.
// Settings that need a restart keep their running values, and the line
// returned names them. A config that does not load leaves everything as it
// was, and is the error.
func (r *reloader) Reload() (string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stopping {
		return "", errors.New("reload refused: egressd is shutting down")
	}
	_ = r.notify.send(reloading()...)
	defer func() { _ = r.notify.send("READY=1", "STATUS=serving") }()

	next, err := LoadConfig(r.cfg.args)
	if err == nil {
		var l live
		if l, err = newLive(next, r.shared); err == nil {
			warnWeakHashes(r.log, next.AuthFile, l.access.Users)
			return r.apply(next, l), nil
		}
	}
	err = fmt.Errorf("reload refused, the running config stays: %s", oneLine(err.Error()))
	r.log.Error(err.Error())
	return "", err
}

// apply swaps in next's reloadable settings and returns the line that says
// what changed.
func (r *reloader) apply(next Config, l live) string {
	changed, restart := diffConfig(r.cfg, next)
	authChanged := l.authHash != r.live.authHash
	if authChanged && !slices.Contains(changed, "auth-file") {
		changed = append(changed, "auth-file") // same name, new users
	}
	if !authChanged {
		l.access.Users = r.live.access.Users // keep the verified-password cache
	}
	if slices.Contains(changed, "limit") {
		r.srv.SetShaper(l.shaper)
	} else {
		l.shaper = r.live.shaper // token buckets keep their state
	}
	r.srv.SetAccess(l.access)
	r.guard.SetAllow(next.AllowDest)
	r.level.Set(next.LogLevel)
	r.live = l

	kept := r.cfg
	kept.Limits, kept.Allow, kept.AuthFile, kept.LogLevel, kept.Grace =
		next.Limits, next.Allow, next.AuthFile, next.LogLevel, next.Grace
	kept.AllowDest, kept.ConnectPorts, kept.HTTPPorts = next.AllowDest, next.ConnectPorts, next.HTTPPorts
	kept.MaxConns, kept.MaxConnsPerClient, kept.MaxAddrsPerClient = next.MaxConns, next.MaxConnsPerClient, next.MaxAddrsPerClient
	r.cfg = kept
	r.srv.SetLimits(kept.limits()) // max-addrs, which the default derives from, stays as it runs

	msg := "reloaded: nothing changed"
	if len(changed) > 0 {
		msg = "reloaded: " + strings.Join(changed, ", ") + " changed"
	}
	if len(restart) > 0 {
		msg += "; restart to apply " + strings.Join(restart, ", ") + " (the running values stay)"
		r.log.Warn("config reloaded, but some settings need a restart: running with the old values for those",
			"restart", strings.Join(restart, ","), "changed", strings.Join(changed, ","))
	} else {
		r.log.Info("config reloaded", "changed", strings.Join(changed, ","))
	}
	return msg
}

// diffConfig lists the settings that differ between a and b, by flag name:
// those a reload applies, and those that need a restart.
func diffConfig(a, b Config) (changed, restart []string) {
	fa, fb := flagSet(&a), flagSet(&b)
	fa.VisitAll(func(f *flag.Flag) {
		if f.Name == "config" || f.Value.String() == fb.Lookup(f.Name).Value.String() {
			return
		}
		if slices.Contains(reloadable, f.Name) {
			changed = append(changed, f.Name)
		} else {
			restart = append(restart, f.Name)
		}
	})
	return changed, restart
}
