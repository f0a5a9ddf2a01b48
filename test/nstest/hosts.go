package nstest

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// Host is one more host namespace behind R, made by Topo.AddHost: a second
// (or third) H with a link of its own to R.
type Host struct {
	*NS
	// Link is the veth end in the host, RouterLink its peer in R.
	Link, RouterLink string
	// Prefix is the link's /64; Addr the host's own address in it (::2),
	// RouterAddr R's (::1), the host's default gateway.
	Prefix           netip.Prefix
	Addr, RouterAddr netip.Addr
}

// AddHost adds a host namespace joined to R by a veth pair of its own, on
// the link prefix (a /64 that no other link of the topology uses): the
// host has ::2 and a default route via R's ::1, and the names H resolves
// (its /etc/hosts and resolv.conf, copied). Processes it starts share H's
// RUNTIME_DIRECTORY. It is removed in t.Cleanup, before the topology.
func (tp *Topo) AddHost(t testing.TB, prefix netip.Prefix) *Host {
	t.Helper()
	base := fmt.Sprintf("egt%dx%d", os.Getpid(), counter.Add(1))
	if len(base)+1 > 15 {
		t.Fatalf("namespace base name %q too long for an interface name", base)
	}
	routerAddr := prefix.Masked().Addr().Next()
	h := &Host{
		NS:         &NS{Name: base + "h", handle: -1, env: tp.Host.env},
		Link:       base + "h",
		RouterLink: base + "r",
		Prefix:     prefix.Masked(),
		Addr:       routerAddr.Next(),
		RouterAddr: routerAddr,
	}
	t.Cleanup(func() {
		if h.handle >= 0 {
			h.handle.Close()
		}
		if err := RemoveNS(h.Name); err != nil {
			t.Errorf("removing host %s: %v", h.Name, err)
		}
	})
	mustIP(t, "netns", "add", h.Name)
	handle, err := netns.GetFromName(h.Name)
	if err != nil {
		t.Fatalf("opening namespace %s: %v", h.Name, err)
	}
	h.handle = handle

	bits := "/" + fmt.Sprint(prefix.Bits())
	mustIP(t, "-n", h.Name, "link", "add", h.Link, "type", "veth", "peer", "name", h.RouterLink, "netns", tp.Router.Name)
	for _, args := range [][]string{
		{"-n", h.Name, "link", "set", "lo", "up"},
		{"-n", h.Name, "link", "set", h.Link, "up"},
		{"-n", tp.Router.Name, "link", "set", h.RouterLink, "up"},
		{"-n", h.Name, "addr", "add", h.Addr.String() + bits, "dev", h.Link, "nodad"},
		{"-n", tp.Router.Name, "addr", "add", h.RouterAddr.String() + bits, "dev", h.RouterLink, "nodad"},
		{"-n", h.Name, "-6", "route", "add", "default", "via", h.RouterAddr.String(), "dev", h.Link},
	} {
		mustIP(t, args...)
	}

	files := map[string]string{}
	for _, name := range []string{"hosts", "resolv.conf"} {
		b, err := os.ReadFile(filepath.Join("/etc/netns", tp.Host.Name, name))
		if err != nil {
			t.Fatal(err)
		}
		files[name] = string(b)
	}
	writeEtc(t, h.Name, files)

	// As in New: wait until the link-local address is past DAD.
	deadline := time.Now().Add(Guard)
	for {
		out := h.Run(t, "ip", "-6", "addr", "show", "dev", h.Link, "tentative")
		if strings.TrimSpace(out) == "" {
			return h
		}
		if time.Now().After(deadline) {
			t.Fatalf("addresses of %s still tentative after %v: %s", h.Link, Guard, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
