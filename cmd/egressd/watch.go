package main

import (
	"context"
	"log/slog"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/netutil/kernel"
	"github.com/vishvananda/netlink"
)

// watchFaults follows netlink events so that egressd survives faults of the
// host's network by itself: the pool follows the uplink (addresses deleted
// by somebody else, the link going down and up: netutil.Pool.Follow) and,
// in routed mode (route not nil), the local route is restored if somebody
// removes it (kernel.LocalRoute.Keep); and the destination guard knows
// every address the host has now (netutil.Guard.Follow). Other subscribers
// may use the returned watcher. stop ends it all; call it before the route is removed.
func watchFaults(h *netlink.Handle, pool *netutil.Pool, guard *netutil.Guard, uplink *kernel.Netlink, route *kernel.LocalRoute, log *slog.Logger) (w *kernel.Watcher, stop func()) {
	w = kernel.NewWatcher(kernel.WatchConfig{Handle: h, Routes: route != nil, Logger: log})
	cancels := []func(){pool.Follow(w, uplink), guard.Follow(w)}
	if route != nil {
		cancels = append(cancels, route.Keep(w, pool, log))
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		w.Run(ctx)
	}()
	return w, func() {
		cancel()
		<-done
		for _, c := range cancels {
			c()
		}
	}
}
