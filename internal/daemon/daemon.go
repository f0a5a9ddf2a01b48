// Package daemon is egressd assembled: its configuration (flags and config
// file into one Config, LoadConfig), and Run, which starts the address side
// (netutil/kernel.Setup), the proxy and the admin API, serves until it is
// told to stop, and shuts down in order. SIGHUP (or POST /reload of the
// admin API) reloads the configuration; under systemd (NOTIFY_SOCKET) it
// tells READY=1, RELOADING=1 and STOPPING=1.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/egressd/egressd/internal/admin"
	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/netutil/kernel"
	"github.com/egressd/egressd/proxy"
	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/shape/redisstore"
	"github.com/egressd/egressd/proxy/stats"
)

// Usage writes egressd's help: what it is, and every flag with its real
// default.
func Usage(w io.Writer) {
	fmt.Fprintf(w, "egressd is a forward proxy (HTTP, CONNECT, SOCKS5) that sends every upstream connection from a fresh IPv6 address of the host's prefix.\n\n")
	fmt.Fprintf(w, "usage: egressd [flags]\n\n")
	cfg := defaultConfig() // so that every flag shows its real default
	fs, _ := commandLine(&cfg)
	fs.SetOutput(w)
	fs.PrintDefaults()
}

// Run starts egressd, logging to stderr at cfg.LogLevel, and serves until
// SIGTERM or SIGINT, or until ctx is done, then shuts down: it stops
// accepting, gives requests and tunnels in flight cfg.Grace to finish, and
// removes every address it added. A second signal cuts the grace period
// short; the addresses are removed all the same. SIGHUP reloads the
// configuration (see reloader.Reload). A start that fails changes nothing
// and returns why, in one line.
func Run(ctx context.Context, cfg Config) error {
	level := new(slog.LevelVar) // a reload may change it
	level.Set(cfg.LogLevel)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	shared, closeStore, err := openLimitStore(cfg, log)
	if err != nil {
		return err
	}
	defer closeStore()
	lv, err := newLive(cfg, shared)
	if err != nil {
		return err
	}
	notify, err := newNotifier()
	if err != nil {
		return err
	}
	defer notify.Close()

	var (
		lock      instanceLocks
		listeners []net.Listener // the -listen ones, then -socks5's
		adminLn   net.Listener
	)
	defer func() {
		// Closing one twice is harmless: Shutdown closes them first when
		// egressd serves.
		for _, l := range listeners {
			l.Close()
		}
		if adminLn != nil {
			adminLn.Close()
		}
		if lock != nil {
			if err := lock.Release(); err != nil {
				log.Warn("releasing the instance lock", "err", err)
			}
		}
	}()
	addLatency := new(stats.Histogram)
	eg, err := kernel.Setup(kernel.Config{
		Interface:   cfg.Interface,
		Prefixes:    cfg.Prefixes,
		Routed:      cfg.Mode == modeRouted,
		Pin:         cfg.Pin,
		MaxAddrs:    cfg.maxAddrs(),
		Ready:       readyOrOff(cfg.Ready),
		Budget:      cfg.budget(),
		DialTimeout: cfg.DialTimeout,
		IPv4:        cfg.IPv4,
		AllowDest:   cfg.AllowDest,
		Logger:      log,
		ObserveAdd:  addLatency.Observe,
		// Before egressd changes the system, make sure that no other
		// egressd serves one of these prefixes, or one overlapping it: that
		// one's addresses would look like leftovers, and its local route
		// like ours. Then every listener, so that a port in use ends the
		// start with nothing changed.
		Claim: func(ifname string, prefixes []netip.Prefix) (err error) {
			if lock, err = acquireLocks(runtimeDir(), ifname, prefixes); err != nil {
				return err
			}
			if listeners, err = listen(cfg); err != nil {
				return err
			}
			if cfg.Admin != "" {
				adminLn, err = admin.Listen(cfg.Admin)
			}
			return err
		},
		Shared: func(prefix netip.Prefix) error { return lock.Overlapping(prefix) },
	})
	if err != nil {
		return err
	}

	srv, err := proxy.New(proxy.Config{
		Dial:              eg.Dialer.DialContext,
		Logger:            log,
		DialTimeout:       cfg.DialTimeout,
		TunnelIdleTimeout: cfg.TunnelIdle,
		Shaper:            lv.shaper,
		Access:            lv.access,
		Rotate:            cfg.Rotate,
		Hold: func(ctx context.Context) (proxy.DialFunc, func(), error) {
			return eg.Dialer.Hold(ctx)
		},
		SessionIdle:   cfg.SessionIdle,
		MaxSessions:   cfg.maxSessions(),
		RotateOn:      cfg.RotateOn,
		ClientTimeout: cfg.ClientTimeout,
		Limits:        cfg.limits(),
	})
	if err != nil {
		_, _ = eg.Close()
		return err
	}

	rl := &reloader{srv: srv, guard: eg.Guard, level: level, log: log, notify: notify, cfg: cfg, live: lv, shared: shared}
	var adminSrv *http.Server
	if adminLn != nil {
		src := &statsSource{started: time.Now(), srv: srv, pool: eg.Pool, addLatency: addLatency, shared: shared}
		adminSrv = &http.Server{Handler: src.adminHandler(rl.Reload), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := adminSrv.Serve(adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("admin API stopped", "err", err)
			}
		}()
		log.Info("admin API listening", "addr", adminLn.Addr().String())
	}

	serveErr := make(chan error, len(listeners))
	for _, ln := range listeners[:len(cfg.Listen)] {
		go func() { serveErr <- srv.Serve(ln) }()
		log.Info("listening", "addr", ln.Addr().String())
	}
	for _, ln := range listeners[len(cfg.Listen):] { // Shutdown stops it too
		go func() { serveErr <- srv.ServeSOCKS5(ln) }()
		log.Info("listening", "addr", ln.Addr().String(), "protocol", "socks5")
	}
	// Warnings once it runs: a start that fails says only why.
	warnWeakHashes(log, cfg.AuthFile, lv.access.Users)
	checkFileLimit(log, cfg.MaxConns)
	log.Info("egressd ready", "mode", cfg.Mode, "interface", eg.Interface, "prefix", allowList(eg.Prefixes), "max_addrs", maxAddrsAttr(cfg.maxAddrs()),
		"new_addrs", budgetAttr(cfg.budget()), "rotate", cfg.Rotate, "allow", allowList(cfg.allowed()), "auth", cfg.AuthFile != "",
		"limit_store", storeAttr(shared))
	if err := notify.send("READY=1", "STATUS=serving"); err != nil {
		log.Warn("telling systemd egressd is ready", "err", err)
	}

	runErr := serve(ctx, log, rl, sigs, hup, serveErr)
	rl.stop()

	graceCtx, cancelGrace := context.WithTimeout(context.Background(), rl.current().Grace)
	defer cancelGrace()
	go func() {
		select {
		case <-sigs:
			log.Info("second signal: closing what is still open")
			cancelGrace()
		case <-graceCtx.Done():
		}
	}()
	if err := srv.Shutdown(graceCtx); err != nil {
		log.Warn("grace period over: closed requests and tunnels still open", "active", srv.Active())
	}

	removed, err := eg.Close()
	if runErr == nil {
		runErr = err
	}
	if adminSrv != nil {
		adminSrv.Close() // last: the stats stay readable during the grace period
	}
	s := eg.Pool.Stats()
	log.Info("stopped", "removed", removed, "added_total", s.Added, "removed_total", s.Removed)
	return runErr
}

// serve reloads on each SIGHUP until a signal, ctx or a failing listener
// says to stop; it returns the listener's failure.
func serve(ctx context.Context, log *slog.Logger, rl *reloader, sigs, hup <-chan os.Signal, serveErr <-chan error) error {
	for {
		select {
		case <-hup:
			_, _ = rl.Reload() // it logs what happened
		case sig := <-sigs:
			log.Info("shutting down", "signal", sig.String(), "grace", rl.current().Grace)
			return nil
		case <-ctx.Done():
			log.Info("shutting down", "reason", context.Cause(ctx), "grace", rl.current().Grace)
			return nil
		case err := <-serveErr:
			log.Error("serving failed; shutting down", "err", err)
			return fmt.Errorf("serving: %w", err)
		}
	}
}

// listen opens the proxy's listeners: every -listen address, then -socks5's,
// the only one not served as HTTP. On a failure it closes those it opened.
func listen(cfg Config) ([]net.Listener, error) {
	listeners := make([]net.Listener, 0, len(cfg.Listen)+1)
	open := func(addr, what string) error {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			for _, l := range listeners {
				l.Close()
			}
			return fmt.Errorf("listening on %s%s: %w", addr, what, unwrapOp(err))
		}
		listeners = append(listeners, ln)
		return nil
	}
	for _, addr := range cfg.Listen {
		if err := open(addr, ""); err != nil {
			return nil, err
		}
	}
	if cfg.SOCKS5 != "" {
		if err := open(cfg.SOCKS5, " (socks5)"); err != nil {
			return nil, err
		}
	}
	return listeners, nil
}

// openLimitStore opens the Redis of -limit-store, if there is one, and the
// Shared that every shaper of this run shares its budgets through. It does
// not connect: a Redis that is down is taken up when it answers. The
// returned func closes it.
func openLimitStore(cfg Config, log *slog.Logger) (*shape.Shared, func(), error) {
	if cfg.LimitStore == "" {
		return nil, func() {}, nil
	}
	store, err := redisstore.Open(cfg.LimitStore, shape.DefaultStoreTimeout, log)
	if err != nil {
		return nil, nil, fmt.Errorf("limit-store: %w", err)
	}
	shared := shape.NewShared(shape.SharedConfig{Store: store, Name: store.Name(), Logger: log})
	return shared, func() { store.Close() }, nil
}

// storeAttr is -limit-store as the startup line shows it, without password.
func storeAttr(shared *shape.Shared) string {
	if shared == nil {
		return "none"
	}
	return shared.Stats().Store
}

// maxAddrsAttr is the bound of live addresses as the startup line shows it.
func maxAddrsAttr(n int) string {
	if n == noCap {
		return "none"
	}
	return strconv.Itoa(n)
}

// budgetAttr is the neighbour budget as the startup line shows it.
func budgetAttr(b netutil.Budget) string {
	if b.IsZero() {
		return "no budget (routed)"
	}
	return fmt.Sprintf("%gr/s,burst=%d within %s (at most %d distinct)", b.Rate, b.Burst, b.Window, b.Cap())
}

// allowList is an allow list, or the prefixes, as the startup line shows it.
func allowList(allow []netip.Prefix) string {
	parts := make([]string, len(allow))
	for i, p := range allow {
		parts[i] = p.String()
	}
	return strings.Join(parts, ",")
}

// readyOrOff maps the -ready flag, where 0 means none, to the pool's
// setting, where 0 means the default.
func readyOrOff(n int) int {
	if n == 0 {
		return -1
	}
	return n
}

// unwrapOp drops the "listen tcp" prefix of a *net.OpError for a shorter line.
func unwrapOp(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return op.Err
	}
	return err
}
