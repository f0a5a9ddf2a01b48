// Command egressctl shows what a running egressd is doing: per-upstream
// counters and latencies (egressctl stats) and its egress addresses
// (egressctl addrs), read from egressd's admin API, makes it reload its
// configuration (egressctl reload) and gives a session a new address
// (egressctl rotate). Each command prints a table or a line for people, or
// with -json the document egressd sent, for scripts.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/egressd/egressd/internal/admin"
	"github.com/egressd/egressd/internal/version"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, isTerminal(os.Stdout))
	stop()
	os.Exit(report(os.Stderr, err))
}

// run parses the global flags and runs the command they name. It prints
// usage to stdout when asked for it; errors are left to report.
func run(ctx context.Context, args []string, stdout io.Writer, terminal bool) error {
	fs := flag.NewFlagSet("egressctl", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors go through report, usage is ours
	addr := fs.String("admin", admin.DefaultAddr, "")
	showVersion := fs.Bool("version", false, "")
	err := fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return printUsage(stdout)
	case err != nil:
		return usageError{"", err.Error()}
	case *showVersion:
		_, err = fmt.Fprintln(stdout, version.Line("egressctl"))
		return err
	case fs.NArg() == 0:
		return usageError{"", "no command given"}
	case fs.Arg(0) == "help":
		return printUsage(stdout)
	}
	newCmd, ok := commands[fs.Arg(0)]
	switch {
	case !ok:
		return usageError{"", fmt.Sprintf("unknown command %q", fs.Arg(0))}
	case *addr == "":
		return usageError{"", "-admin is empty: give egressd's admin socket path or host:port"}
	}
	return newCmd(env{admin.NewClient(*addr), stdout, terminal}).Run(ctx, fs.Args()[1:])
}
