package main

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"text/tabwriter"

	"github.com/egressd/egressd/proxy/stats"
)

const addrsUsage = `Usage: egressctl [-admin ADDR] addrs [-json]

Lists the egress addresses egressd holds on its interface, oldest first,
with their state: adding, ready, in-use, warm or removing.

Flags:
  -json   print the JSON document egressd sends
`

// addrsCommand is egressctl addrs.
type addrsCommand struct{ env }

func (c *addrsCommand) Run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("addrs", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "")
	if ok, err := parseFlags(fs, args, addrsUsage, c.stdout); !ok {
		return err
	}
	body, err := c.admin.Get(ctx, "/addrs")
	if err != nil {
		return err
	}
	if *asJSON {
		return writeIndented(c.stdout, body)
	}
	var addrs []stats.Addr
	if err := json.Unmarshal(body, &addrs); err != nil {
		return fmt.Errorf("decoding /addrs from egressd at %s: %w", c.admin.Addr(), err)
	}
	return writeAddrs(c.stdout, addrs)
}

// writeAddrs writes the table for people, oldest address first.
func writeAddrs(w io.Writer, addrs []stats.Addr) error {
	slices.SortStableFunc(addrs, func(a, b stats.Addr) int {
		return cmp.Or(cmp.Compare(b.AgeSeconds, a.AgeSeconds), compareAddrs(a.Addr, b.Addr))
	})
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if len(addrs) == 0 {
		fmt.Fprintln(tw, "egressd holds no egress address.")
		return tw.Flush()
	}
	fmt.Fprintln(tw, "ADDRESS\tSTATE\tAGE")
	for _, a := range addrs {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", cell(a.Addr), cell(a.State), humanDuration(a.AgeSeconds))
	}
	return tw.Flush()
}

// compareAddrs orders IP addresses numerically (2001:db8::2 before
// 2001:db8::10), and anything else as text after them.
func compareAddrs(a, b string) int {
	x, errX := netip.ParseAddr(a)
	y, errY := netip.ParseAddr(b)
	switch {
	case errX == nil && errY == nil:
		return x.Compare(y)
	case errX == nil:
		return -1
	case errY == nil:
		return 1
	}
	return cmp.Compare(a, b)
}
