package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
)

const rotateUsage = `Usage: egressctl [-admin ADDR] rotate [-json] KEY

Gives session KEY (-rotate session) a new egress address, as a request with
X-Egress-Rotate: 1 does: its next connection leaves from a fresh address
(from another /64 where the prefix has several), and connections open
from the old one keep going until they close.

Prints one line saying which address the session gave up. A key with no
session open (never used, or idled out) is an error, exit 1.

Flags:
  -json   print the JSON document egressd sends
`

// rotateCommand is egressctl rotate.
type rotateCommand struct{ env }

func (c *rotateCommand) Run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("rotate", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "")
	if ok, err := parseWithArgs(fs, args, rotateUsage, c.stdout); !ok {
		return err
	}
	switch {
	case fs.NArg() == 0:
		return usageError{"rotate", "give the session KEY"}
	case fs.NArg() > 1:
		return usageError{"rotate", fmt.Sprintf("unexpected argument %q after the key (flags go before it)", fs.Arg(1))}
	case fs.Arg(0) == "":
		return usageError{"rotate", "the session KEY is empty"}
	}
	res, err := c.admin.Rotate(ctx, fs.Arg(0))
	if err != nil {
		return err
	}
	if *asJSON {
		b, err := json.Marshal(res)
		if err != nil {
			return err
		}
		return writeIndented(c.stdout, b)
	}
	_, err = fmt.Fprintln(c.stdout, res.Message)
	return err
}
