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
//
// The daemon itself is internal/daemon; this is its command line.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/egressd/egressd/internal/daemon"
	"github.com/egressd/egressd/internal/version"
)

func main() {
	cfg, err := daemon.LoadConfig(os.Args[1:])
	switch {
	case errors.Is(err, flag.ErrHelp):
		daemon.Usage(os.Stdout)
		os.Exit(0)
	case errors.Is(err, daemon.ErrVersion):
		fmt.Println(version.Line("egressd"))
		os.Exit(0)
	}
	if err == nil {
		err = daemon.Run(context.Background(), cfg)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "egressd: %v\n", err)
		os.Exit(1)
	}
}
