// Command egressd is a forward HTTP proxy that sends every upstream
// connection from a fresh IPv6 address of the host's prefix.
//
// Clients set HTTPS_PROXY=http://127.0.0.1:3128. For each upstream
// connection egressd adds a random /128 of the prefix to the interface
// (deprecated, so that the host's own default source address never changes),
// binds the connection to it, and removes it when the connection closes.
//
// SIGHUP (or `egressctl reload`) reads the configuration again and applies
// the -limit rules, the -allow list, the users of -auth-file, the log level
// and the grace period without dropping a connection. Under systemd
// (NOTIFY_SOCKET) it tells READY=1, RELOADING=1 and STOPPING=1.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/egressd/egressd/internal/version"
	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy"
	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/shape/redisstore"
	"github.com/egressd/egressd/proxy/stats"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func main() {
	cfg, err := loadConfig(os.Args[1:])
	switch {
	case errors.Is(err, flag.ErrHelp):
		usage()
		os.Exit(0)
	case errors.Is(err, errVersion):
		fmt.Println(version.Line("egressd"))
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "egressd: %v\n", err)
		os.Exit(1)
	}
	level := new(slog.LevelVar) // a reload may change it
	level.Set(cfg.LogLevel)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if err := run(context.Background(), cfg, log, level); err != nil {
		fmt.Fprintf(os.Stderr, "egressd: %v\n", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintf(os.Stdout, "egressd is a forward proxy (HTTP, CONNECT, SOCKS5) that sends every upstream connection from a fresh IPv6 address of the host's prefix.\n\n")
	fmt.Fprintf(os.Stdout, "usage: egressd [flags]\n\n")
	cfg := defaultConfig() // so that every flag shows its real default
	fs, _ := commandLine(&cfg)
	fs.SetOutput(os.Stdout)
	fs.PrintDefaults()
}

// run starts egressd and serves until SIGTERM or SIGINT, then shuts down:
// it stops accepting, gives requests and tunnels in flight cfg.Grace to
// finish, and removes every address it added. A second signal cuts the grace
// period short; the addresses are removed all the same. SIGHUP reloads the
// configuration (see reloader.Reload); level is the logger's level, which a
// reload sets.
func run(ctx context.Context, cfg Config, log *slog.Logger, level *slog.LevelVar) error {
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
	if err := checkNetAdmin(); err != nil {
		return err
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("opening netlink: %w", err)
	}
	defer h.Close()

	ifname := cfg.Interface
	if ifname == "" {
		if ifname, err = netutil.DefaultInterface(h); err != nil {
			return err
		}
	}
	mgr, err := netutil.NewNetlink(h, ifname)
	if err != nil {
		var notFound netlink.LinkNotFoundError
		if errors.As(err, &notFound) {
			return fmt.Errorf("interface %s does not exist", ifname)
		}
		return err
	}
	addrs, err := mgr.Addrs()
	if err != nil {
		return err
	}
	prefix := cfg.Prefix
	if !prefix.IsValid() {
		if prefix, err = netutil.DefaultPrefix(addrs); err != nil {
			return fmt.Errorf("interface %s: %w", ifname, err)
		}
	}
	routed := cfg.Mode == modeRouted
	if routed {
		if err := netutil.CheckRoutedPrefix(h, prefix, mgr.Link().Attrs().Index); err != nil {
			return err
		}
	} else if !netutil.OnInterface(prefix, addrs) {
		return fmt.Errorf("prefix %s is not on interface %s: no address of it is configured there (if it is routed to this host, use -mode routed)", prefix, ifname)
	}

	// From here on egressd changes the system, so first make sure that no
	// other egressd serves this prefix, or one overlapping it: that one's
	// addresses would look like leftovers, and its local route like ours.
	lock, err := acquireLock(runtimeDir(), ifname, prefix)
	if err != nil {
		return err
	}
	defer func() {
		if err := lock.Release(); err != nil {
			log.Warn("releasing the instance lock", "err", err)
		}
	}()

	// Then every listener, so that a port in use ends the start with
	// nothing changed. Closing one twice is harmless: Shutdown closes them
	// first when egressd serves.
	listeners := make([]net.Listener, 0, len(cfg.Listen)+1)
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	for _, addr := range cfg.Listen {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("listening on %s: %w", addr, unwrapOp(err))
		}
		listeners = append(listeners, ln)
	}
	if cfg.SOCKS5 != "" { // last in listeners, the only one not served as HTTP
		ln, err := net.Listen("tcp", cfg.SOCKS5)
		if err != nil {
			return fmt.Errorf("listening on %s (socks5): %w", cfg.SOCKS5, unwrapOp(err))
		}
		listeners = append(listeners, ln)
	}
	var adminLn net.Listener
	if cfg.Admin != "" {
		if adminLn, err = listenAdmin(cfg.Admin); err != nil {
			return err
		}
		defer adminLn.Close()
	}

	// Addresses that a killed earlier run left behind go first; every
	// address the host has now, on any interface, is its own and is never
	// drawn.
	left, err := mgr.RemoveLeftovers(prefix, cfg.Pin)
	if err != nil {
		return fmt.Errorf("removing leftover egress addresses: %w", err)
	}
	if left > 0 {
		log.Info("removed leftover egress addresses of an earlier run", "count", left)
	}
	hostAddrs, err := netutil.HostAddrs(h)
	if err != nil {
		return err
	}
	exclude := append(slices.Clone(cfg.Pin), hostAddrs...)

	// On-link mode adds every address to the interface, keeps a few ready,
	// and spends never-used ones within the router's neighbour budget,
	// reusing warm ones past it; routed mode adds none, so there is nothing
	// to keep ready or warm, and no budget: the router learns no neighbour
	// per address.
	var am netutil.AddrManager = mgr
	ready, linger := readyOrOff(cfg.Ready), time.Duration(0)
	if routed {
		am, ready, linger = netutil.NoAddrs{}, -1, -1
	}
	addLatency := new(stats.Histogram)
	pool, err := netutil.NewPool(netutil.PoolConfig{
		Prefix:     prefix,
		Exclude:    exclude,
		Max:        cfg.maxAddrs(),
		Ready:      ready,
		Linger:     linger,
		Budget:     cfg.budget(),
		Manager:    am,
		Logger:     log,
		ObserveAdd: addLatency.Observe,
	})
	if err != nil {
		return err
	}

	// Clients must not reach the host's own services through the proxy:
	// not its addresses, its loopback, its link, nor its egress prefix,
	// every address of which is the host's own in routed mode; nor, unless
	// -allow-dest says so, its private networks.
	guard := netutil.NewGuard([]netip.Prefix{prefix}, cfg.AllowDest)
	guard.SetHostAddrs(hostAddrs)
	dialer := &netutil.Dialer{Pool: pool, Timeout: cfg.DialTimeout, FreeBind: routed, IPv4: cfg.IPv4, Guard: guard}
	srv, err := proxy.New(proxy.Config{
		Dial:              dialer.DialContext,
		Logger:            log,
		DialTimeout:       cfg.DialTimeout,
		TunnelIdleTimeout: cfg.TunnelIdle,
		Shaper:            lv.shaper,
		Access:            lv.access,
		Rotate:            cfg.Rotate,
		Hold: func(ctx context.Context) (proxy.DialFunc, func(), error) {
			return dialer.Hold(ctx)
		},
		SessionIdle:   cfg.SessionIdle,
		MaxSessions:   cfg.maxSessions(),
		ClientTimeout: cfg.ClientTimeout,
		Limits:        cfg.limits(),
	})
	if err != nil {
		return err
	}

	rl := &reloader{srv: srv, guard: guard, level: level, log: log, notify: notify, cfg: cfg, live: lv, shared: shared}
	var admin *http.Server
	if adminLn != nil {
		src := &statsSource{started: time.Now(), srv: srv, pool: pool, addLatency: addLatency, shared: shared}
		admin = &http.Server{Handler: proxy.AdminHandler(src, rl.Reload), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := admin.Serve(adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("admin API stopped", "err", err)
			}
		}()
		log.Info("admin API listening", "addr", adminLn.Addr().String())
	}
	var route *netutil.LocalRoute
	if routed {
		if route, err = netutil.InstallLocalRoute(h, prefix); err != nil {
			if admin != nil {
				admin.Close()
			}
			return err
		}
		if !route.Ours() {
			log.Info("using the local route for the prefix that is already there", "prefix", prefix)
		}
	}

	// Netlink events keep the pool's view of the uplink true and the local
	// route of routed mode in place (watch.go).
	_, stopWatch := watchFaults(h, pool, guard, mgr.Link(), route, log)

	poolCtx, stopPool := context.WithCancel(context.Background())
	poolDone := make(chan struct{})
	go func() {
		defer close(poolDone)
		pool.Run(poolCtx)
	}()

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
	log.Info("egressd ready", "mode", cfg.Mode, "interface", ifname, "prefix", prefix, "max_addrs", maxAddrsAttr(cfg.maxAddrs()),
		"new_addrs", budgetAttr(cfg.budget()), "rotate", cfg.Rotate, "allow", allowList(cfg.allowed()), "auth", cfg.AuthFile != "",
		"limit_store", storeAttr(shared))
	if err := notify.send("READY=1", "STATUS=serving"); err != nil {
		log.Warn("telling systemd egressd is ready", "err", err)
	}

	var runErr error
serve:
	for {
		select {
		case <-hup:
			_, _ = rl.Reload() // it logs what happened
		case sig := <-sigs:
			log.Info("shutting down", "signal", sig.String(), "grace", rl.current().Grace)
			break serve
		case <-ctx.Done():
			log.Info("shutting down", "reason", context.Cause(ctx), "grace", rl.current().Grace)
			break serve
		case err := <-serveErr:
			runErr = fmt.Errorf("serving: %w", err)
			log.Error("serving failed; shutting down", "err", err)
			break serve
		}
	}
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

	stopPool()
	<-poolDone
	stopWatch() // before the route goes, which it would restore
	removed, err := pool.Close()
	if err != nil {
		log.Error("removing egress addresses", "removed", removed, "err", err)
		if runErr == nil {
			runErr = fmt.Errorf("removing egress addresses: %w", err)
		}
	}
	if route != nil {
		// Only a route egressd installed is removed, and not while another
		// egressd holds a prefix that overlaps this one: the lock keeps a
		// second one from starting, this is the second guard.
		if err := lock.Overlapping(); err != nil {
			log.Warn("leaving the local route in place", "prefix", prefix, "reason", err)
		} else if err := route.Remove(); err != nil {
			log.Error("removing the local route", "err", err)
			if runErr == nil {
				runErr = err
			}
		}
	}
	if admin != nil {
		admin.Close() // last: the stats stay readable during the grace period
	}
	s := pool.Stats()
	log.Info("stopped", "removed", removed, "added_total", s.Added, "removed_total", s.Removed)
	return runErr
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

// allowList is an allow list as the startup line shows it.
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

// checkNetAdmin fails unless the process may add addresses.
func checkNetAdmin() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("reading capabilities: %w", err)
	}
	if data[0].Effective&(1<<unix.CAP_NET_ADMIN) == 0 {
		return errors.New("needs CAP_NET_ADMIN to add addresses: run it as root or grant the capability (AmbientCapabilities=CAP_NET_ADMIN)")
	}
	return nil
}

// unwrapOp drops the "listen tcp" prefix of a *net.OpError for a shorter line.
func unwrapOp(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return op.Err
	}
	return err
}
