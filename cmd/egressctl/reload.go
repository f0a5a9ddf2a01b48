package main

import (
	"context"
	"flag"
	"fmt"
)

const reloadUsage = `Usage: egressctl [-admin ADDR] reload

Makes egressd read its configuration again, as SIGHUP does: the config file
and the command line it was started with. The -limit rules, allow list,
users (the auth file), log level and grace period change at once, without
dropping open connections; settings that need a restart keep their running
values.

Prints one line: what changed, or why egressd refused the new configuration
(it then keeps the old one, and egressctl exits 1).
`

// reloadCommand is egressctl reload.
type reloadCommand struct{ env }

func (c *reloadCommand) Run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("reload", flag.ContinueOnError)
	if ok, err := parseFlags(fs, args, reloadUsage, c.stdout); !ok {
		return err
	}
	msg, err := c.admin.Reload(ctx)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(c.stdout, msg)
	return err
}
