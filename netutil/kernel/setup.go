package kernel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Config is what Setup needs to know of egressd's settings.
type Config struct {
	// Interface is where egress addresses are added; empty means the
	// interface of the IPv6 default route.
	Interface string
	// Prefixes are where egress addresses are drawn from, spread evenly
	// over their /64s (netutil.Spread); none means the /64 of the first
	// global address on Interface. They must not overlap.
	Prefixes []netip.Prefix
	// Routed selects routed mode: the prefixes are routed to the host, a
	// local route for each makes every address of it the host's own, and
	// the dialer binds with IPV6_FREEBIND. Otherwise (on-link) every
	// address is added to Interface, and each prefix must be on it.
	Routed bool
	// Pin lists addresses never used for egress, never removed.
	Pin []netip.Addr
	// MaxAddrs, Ready and Budget are the pool's (netutil.PoolConfig);
	// routed mode keeps no address ready and has no budget, whatever they
	// say.
	MaxAddrs int
	Ready    int
	Budget   netutil.Budget
	// DialTimeout and IPv4 are the dialer's (netutil.Dialer).
	DialTimeout time.Duration
	IPv4        netutil.IPv4Policy
	// AllowDest re-admits private destinations (netutil.NewGuard).
	AllowDest []netip.Prefix
	// Logger gets what happens; slog.Default() when nil.
	Logger *slog.Logger
	// ObserveAdd is the pool's (netutil.PoolConfig.ObserveAdd).
	ObserveAdd func(time.Duration)
	// Claim, if set, is called once the interface and the prefixes are
	// known and checked, before anything on the host changes: the daemon
	// takes its instance lock and opens its listeners there. Its error ends
	// Setup, unchanged, with nothing changed.
	Claim func(ifname string, prefixes []netip.Prefix) error
	// Shared, if set, is asked when Egress.Close comes to the local route
	// of a prefix in routed mode: a non-nil answer (another egressd holds a
	// prefix overlapping that one) leaves the route in place, and is logged.
	Shared func(prefix netip.Prefix) error
}

// Egress is the address side of a running egressd, as Setup made it: the
// pool at work, the dialer over it, the destination guard, and in routed
// mode the local route, all kept true to the host's network by a watcher.
// Close takes it down.
type Egress struct {
	Interface string         // where the addresses are added, or the uplink in routed mode
	Prefixes  []netip.Prefix // where they are drawn from
	Pool      *netutil.Pool
	Dialer    *netutil.Dialer
	Guard     *netutil.Guard

	cfg    Config
	log    *slog.Logger
	h      *netlink.Handle
	routes []*LocalRoute // routed mode's, one per prefix; none on-link
	stop   func()        // ends the pool's background work and the watch
}

// Setup checks that the process may add addresses, finds the interface and
// the prefixes (cfg's, or the default), checks that each suits the mode
// (on-link: an address or an on-link route of it is on the interface;
// routed: it captures no other route nor the default gateway), calls
// cfg.Claim, removes the egress addresses a killed earlier run left behind,
// and builds the pool, the guard and the dialer of the mode. In routed mode
// it then installs a local route per prefix. Last it starts the pool's
// background work and the watcher that keeps the pool, the guard and the
// local routes true to the host's network (Pool.Follow, Guard.Follow,
// LocalRoute.Keep).
func Setup(cfg Config) (e *Egress, err error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if err := checkNetAdmin(); err != nil {
		return nil, err
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("opening netlink: %w", err)
	}
	defer func() {
		if err != nil {
			h.Close()
		}
	}()
	mgr, prefixes, err := locate(h, cfg)
	if err != nil {
		return nil, err
	}
	if cfg.Claim != nil {
		if err := cfg.Claim(mgr.Name(), prefixes); err != nil {
			return nil, err
		}
	}
	e = &Egress{Interface: mgr.Name(), Prefixes: prefixes, cfg: cfg, log: cfg.Logger, h: h}
	defer func() {
		if err != nil {
			e.removeRoutes() // those installed before a later one failed
		}
	}()
	if err := e.build(mgr); err != nil {
		return nil, err
	}
	e.stop = e.start(mgr)
	return e, nil
}

// locate resolves cfg's interface and prefixes, and checks each prefix
// against the mode. It changes nothing.
func locate(h *netlink.Handle, cfg Config) (*Netlink, []netip.Prefix, error) {
	var err error
	ifname := cfg.Interface
	if ifname == "" {
		if ifname, err = DefaultInterface(h); err != nil {
			return nil, nil, err
		}
	}
	mgr, err := NewNetlink(h, ifname)
	if err != nil {
		if _, ok := errors.AsType[netlink.LinkNotFoundError](err); ok {
			return nil, nil, fmt.Errorf("interface %s does not exist", ifname)
		}
		return nil, nil, err
	}
	addrs, err := mgr.Addrs()
	if err != nil {
		return nil, nil, err
	}
	prefixes := slices.Clone(cfg.Prefixes)
	if len(prefixes) == 0 {
		prefix, err := DefaultPrefix(addrs)
		if err != nil {
			return nil, nil, fmt.Errorf("interface %s: %w", ifname, err)
		}
		prefixes = []netip.Prefix{prefix}
	}
	var onLink []netip.Prefix // the interface's on-link routes, listed once
	if !cfg.Routed && slices.ContainsFunc(prefixes, func(p netip.Prefix) bool { return !OnInterface(p, addrs) }) {
		if onLink, err = OnLinkRoutes(h, mgr.Index()); err != nil {
			return nil, nil, err
		}
	}
	for _, prefix := range prefixes {
		if cfg.Routed {
			if err := CheckRoutedPrefix(h, prefix, mgr.Index()); err != nil {
				return nil, nil, err
			}
		} else if !OnInterface(prefix, addrs) && !slices.ContainsFunc(onLink, func(r netip.Prefix) bool { return Covers(r, prefix) }) {
			return nil, nil, notOnLink(prefix, ifname, addrs, onLink)
		}
	}
	return mgr, prefixes, nil
}

// notOnLink is the startup error for an on-link prefix the interface does
// not have, naming the parts of it that are there, if any: a /48 typed
// where only one /64 of it is on the link.
func notOnLink(prefix netip.Prefix, ifname string, addrs []IfAddr, onLink []netip.Prefix) error {
	var parts []string
	add := func(p netip.Prefix) {
		if Covers(prefix, p) && !slices.Contains(parts, p.String()) {
			parts = append(parts, p.String())
		}
	}
	for _, a := range addrs {
		if !IsLeftover(a, prefix) {
			add(LinkPrefix(a))
		}
	}
	for _, r := range onLink {
		add(r)
	}
	if len(parts) > 0 {
		slices.Sort(parts)
		is, that := "is", "that"
		if len(parts) > 1 {
			is, that = "are", "those"
		}
		return fmt.Errorf("prefix %s is not on interface %s: only %s of it %s (give %s as -prefix; if all of %s is routed to this host, use -mode routed)",
			prefix, ifname, strings.Join(parts, ", "), is, that, prefix)
	}
	return fmt.Errorf("prefix %s is not on interface %s: no address or on-link route of it is there (if it is routed to this host, use -mode routed)", prefix, ifname)
}

// build removes the leftovers of an earlier run and makes the pool, the
// guard and the dialer of the mode, and in routed mode the local route.
func (e *Egress) build(mgr *Netlink) error {
	cfg, log := e.cfg, e.log
	// Addresses that a killed earlier run left behind go first; every
	// address the host has now, on any interface, is its own and is never
	// drawn.
	left := 0
	for _, prefix := range e.Prefixes {
		n, err := mgr.RemoveLeftovers(prefix, cfg.Pin)
		left += n
		if err != nil {
			return fmt.Errorf("removing leftover egress addresses: %w", err)
		}
	}
	if left > 0 {
		log.Info("removed leftover egress addresses of an earlier run", "count", left)
	}
	hostAddrs, err := HostAddrs(e.h)
	if err != nil {
		return err
	}

	// On-link mode adds every address to the interface, keeps a few ready,
	// and spends never-used ones within the router's neighbour budget,
	// reusing warm ones past it; routed mode adds none, so there is nothing
	// to keep ready or warm, and no budget: the router learns no neighbour
	// per address.
	var am netutil.AddrManager = mgr
	ready, linger, budget := cfg.Ready, time.Duration(0), cfg.Budget
	if cfg.Routed {
		am, ready, linger, budget = netutil.NoAddrs{}, -1, -1, netutil.Budget{}
	}
	e.Pool, err = netutil.NewPool(netutil.PoolConfig{
		Prefixes:   e.Prefixes,
		Exclude:    append(slices.Clone(cfg.Pin), hostAddrs...),
		Max:        cfg.MaxAddrs,
		Ready:      ready,
		Linger:     linger,
		Budget:     budget,
		Manager:    am,
		Logger:     log,
		ObserveAdd: cfg.ObserveAdd,
	})
	if err != nil {
		return err
	}

	// Clients must not reach the host's own services through the proxy:
	// not its addresses, its loopback, its link, nor its egress prefixes,
	// every address of which is the host's own in routed mode; nor, unless
	// -allow-dest says so, its private networks.
	e.Guard = netutil.NewGuard(e.Prefixes, cfg.AllowDest)
	e.Guard.SetHostAddrs(hostAddrs)
	e.Dialer = &netutil.Dialer{Pool: e.Pool, Timeout: cfg.DialTimeout, FreeBind: cfg.Routed, IPv4: cfg.IPv4, Guard: e.Guard}

	if cfg.Routed {
		for _, prefix := range e.Prefixes {
			route, err := InstallLocalRoute(e.h, prefix)
			if err != nil {
				return err
			}
			e.routes = append(e.routes, route)
			if !route.Ours() {
				log.Info("using the local route for the prefix that is already there", "prefix", prefix)
			}
		}
	}
	return nil
}

// start follows netlink events, so that egressd survives faults of the
// host's network by itself: the pool follows the uplink (addresses deleted
// by somebody else, the link going down and up: netutil.Pool.Follow), the
// destination guard knows every address the host has now
// (netutil.Guard.Follow), and in routed mode the local route is restored if
// somebody removes it (LocalRoute.Keep). It also starts the pool's
// background work. The function it returns ends the pool's work, then the
// watch.
func (e *Egress) start(uplink *Netlink) (stop func()) {
	w := NewWatcher(WatchConfig{Handle: e.h, Routes: len(e.routes) > 0, Logger: e.log})
	cancels := []func(){e.Pool.Follow(w, uplink), e.Guard.Follow(w)}
	for _, route := range e.routes {
		cancels = append(cancels, route.Keep(w, e.Pool, e.log))
	}
	stopWatch := background(w.Run)
	stopPool := background(e.Pool.Run)
	return func() {
		stopPool()
		stopWatch()
		for _, c := range cancels {
			c()
		}
	}
}

// background runs fn in a goroutine until the returned function is called,
// which waits for fn to return.
func background(fn func(context.Context)) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(ctx)
	}()
	return func() {
		cancel()
		<-done
	}
}

// Close takes the address side down, in order: the pool's background work
// and the watch end (the watch before the route goes, which it would
// restore), every address the pool still has is removed, in use or not,
// and then routed mode's local routes, each if egressd installed it and
// Config.Shared does not object. Failures are logged. It returns how many
// addresses it removed, and the first failure.
func (e *Egress) Close() (removed int, err error) {
	defer e.h.Close()
	e.stop()
	removed, perr := e.Pool.Close()
	if perr != nil {
		e.log.Error("removing egress addresses", "removed", removed, "err", perr)
		err = fmt.Errorf("removing egress addresses: %w", perr)
	}
	if rerr := e.removeRoutes(); err == nil {
		err = rerr
	}
	return removed, err
}

// removeRoutes removes routed mode's local routes that egressd installed.
// Not while another egressd holds a prefix that overlaps one: the lock
// keeps a second one from starting, this is the second guard. Failures are
// logged; it returns the first.
func (e *Egress) removeRoutes() error {
	var first error
	for _, route := range e.routes {
		var shared error
		if e.cfg.Shared != nil {
			shared = e.cfg.Shared(route.prefix)
		}
		if shared != nil {
			e.log.Warn("leaving the local route in place", "prefix", route.prefix, "reason", shared)
		} else if err := route.Remove(); err != nil {
			e.log.Error("removing the local route", "err", err)
			if first == nil {
				first = err
			}
		}
	}
	return first
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
