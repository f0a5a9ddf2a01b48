package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"

	"github.com/egressd/egressd/proxy"
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
type reloadCommand struct {
	admin  *adminClient
	stdout io.Writer
}

func (c *reloadCommand) Run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("reload", flag.ContinueOnError)
	if ok, err := parseFlags(fs, args, reloadUsage, c.stdout); !ok {
		return err
	}
	_, body, err := c.admin.do(ctx, http.MethodPost, "/reload", http.StatusUnprocessableEntity)
	if err != nil {
		return err
	}
	var res proxy.ReloadResult
	if err := json.Unmarshal(body, &res); err != nil {
		return fmt.Errorf("decoding /reload from egressd at %s: %w", c.admin.admin, err)
	}
	if !res.OK {
		if res.Error == "" {
			res.Error = "reload refused"
		}
		return errors.New(res.Error)
	}
	_, err = fmt.Fprintln(c.stdout, res.Message)
	return err
}
