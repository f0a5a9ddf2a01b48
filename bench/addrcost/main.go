// Command addrcost measures what the kernel charges egressd for an egress
// address: the latency of one netlink add and one delete of a /128 (the
// flags and lifetimes egressd uses) with N addresses already on the
// interface. It works in a network namespace of its own, with no name, on a
// veth pair made there, and leaves nothing behind. Needs root.
//
//	go run ./bench/addrcost -sizes 0,128,512,1024,2048 -samples 100
//
// Adds are spaced out (-gap) and measured after the interface has settled
// (-settle), because a burst of adds leaves the kernel with seconds of
// multicast-listener work that would otherwise be charged to the next ones;
// egressd adds one address per connection, not thousands at once.
package main

import (
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/netutil/kernel"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

func main() {
	sizes := flag.String("sizes", "0,128,256,512,1024,2048,4096", "comma-separated counts of addresses already on the interface")
	samples := flag.Int("samples", 100, "adds and deletes timed at each size")
	gap := flag.Duration("gap", 10*time.Millisecond, "pause between timed adds")
	settle := flag.Duration("settle", 3*time.Second, "pause after filling the interface, before timing")
	flag.Parse()
	if err := run(*sizes, *samples, *gap, *settle); err != nil {
		fmt.Fprintf(os.Stderr, "addrcost: %v\n", err)
		os.Exit(1)
	}
}

func run(sizeList string, samples int, gap, settle time.Duration) error {
	var sizes []int
	for _, s := range strings.Split(sizeList, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 0 {
			return fmt.Errorf("-sizes: %q is not a count", s)
		}
		sizes = append(sizes, n)
	}
	slices.Sort(sizes)
	if samples < 1 {
		return fmt.Errorf("-samples %d: must be at least 1", samples)
	}
	mgr, cleanup, err := newLink()
	if err != nil {
		return err
	}
	defer cleanup()

	prefix := netip.MustParsePrefix("2001:db8:1:2::/64")
	fmt.Printf("| addresses on the interface | add p50 | add p90 | delete p50 | delete p90 |\n|---|---|---|---|---|\n")
	existing := 0
	for _, size := range sizes {
		for existing < size {
			if mgr.Add(netutil.RandomAddr(prefix), time.Hour) == nil {
				existing++
			}
		}
		time.Sleep(settle)
		adds := make([]time.Duration, 0, samples)
		dels := make([]time.Duration, 0, samples)
		for range samples {
			a := netutil.RandomAddr(prefix)
			time.Sleep(gap)
			start := time.Now()
			if err := mgr.Add(a, time.Minute); err != nil {
				return err
			}
			adds = append(adds, time.Since(start))
			time.Sleep(gap)
			start = time.Now()
			if err := mgr.Remove(a); err != nil {
				return err
			}
			dels = append(dels, time.Since(start))
		}
		fmt.Printf("| %d | %s | %s | %s | %s |\n", size,
			quantile(adds, 0.5), quantile(adds, 0.9), quantile(dels, 0.5), quantile(dels, 0.9))
	}
	return nil
}

func quantile(d []time.Duration, q float64) string {
	slices.Sort(d)
	v := d[int(float64(len(d)-1)*q)]
	return fmt.Sprintf("%.2f ms", float64(v)/float64(time.Millisecond))
}

// newLink makes an unnamed network namespace with a veth pair, the host end
// up with 2001:db8:1:2::2/64, and returns the manager for it.
func newLink() (*kernel.Netlink, func(), error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return nil, nil, err
	}
	ns, err := netns.New()
	if err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		return nil, nil, fmt.Errorf("making a network namespace (needs root): %w", err)
	}
	err = netns.Set(orig)
	orig.Close()
	runtime.UnlockOSThread()
	if err != nil {
		return nil, nil, err
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return nil, nil, err
	}
	cleanup := func() { h.Close(); ns.Close() }
	la := netlink.NewLinkAttrs()
	la.Name = "ac0"
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "ac1"}); err != nil {
		cleanup()
		return nil, nil, err
	}
	for _, name := range []string{"ac0", "ac1"} {
		link, err := h.LinkByName(name)
		if err == nil {
			err = h.LinkSetUp(link)
		}
		if err != nil {
			cleanup()
			return nil, nil, err
		}
	}
	link, _ := h.LinkByName("ac0")
	host := &net.IPNet{IP: net.ParseIP("2001:db8:1:2::2"), Mask: net.CIDRMask(64, 128)}
	if err := h.AddrAdd(link, &netlink.Addr{IPNet: host, Flags: unix.IFA_F_NODAD}); err != nil {
		cleanup()
		return nil, nil, err
	}
	mgr, err := kernel.NewNetlink(h, "ac0")
	if err != nil {
		cleanup()
		return nil, nil, err
	}
	return mgr, cleanup, nil
}
