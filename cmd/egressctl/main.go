// Command egressctl shows what a running egressd is doing: per-upstream
// counters and latencies (egressctl stats) and its egress addresses
// (egressctl addrs), read from egressd's admin API, and makes it reload its
// configuration (egressctl reload). Each command prints a
// table for people, or with -json the document egressd sent, for scripts.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/internal/version"
)

// defaultAdmin is where egressd listens for admin requests by default.
const defaultAdmin = "/run/egressd/admin.sock"

const usage = `egressctl shows what a running egressd is doing and makes it reload its configuration.

Usage: egressctl [-admin ADDR] COMMAND [flags]

Commands:
  stats   per-upstream requests, waits, errors, bytes and latency, and the address pool
  addrs   the egress addresses egressd holds, oldest first
  reload  read the configuration again (as SIGHUP does) and say what changed

Flags:
  -admin ADDR   egressd's admin API: a unix socket path or host:port
                (default ` + defaultAdmin + `)
  -version      print the version and exit

Run 'egressctl COMMAND -h' for the flags of a command.
`

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
	admin := fs.String("admin", defaultAdmin, "")
	showVersion := fs.Bool("version", false, "")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			_, err = io.WriteString(stdout, usage)
			return err
		}
		return usageError{"", err.Error()}
	}
	if *showVersion {
		_, err := fmt.Fprintln(stdout, version.Line("egressctl"))
		return err
	}
	if fs.NArg() == 0 {
		return usageError{"", "no command given"}
	}
	name, rest := fs.Arg(0), fs.Args()[1:]

	var cmd interface {
		Run(ctx context.Context, args []string) error
	}
	switch name {
	case "help":
		_, err := io.WriteString(stdout, usage)
		return err
	case "stats", "addrs", "reload":
		c, err := newAdminClient(*admin)
		if err != nil {
			return err
		}
		switch name {
		case "stats":
			cmd = &statsCommand{admin: c, stdout: stdout, terminal: terminal}
		case "addrs":
			cmd = &addrsCommand{admin: c, stdout: stdout}
		default:
			cmd = &reloadCommand{admin: c, stdout: stdout}
		}
	default:
		return usageError{"", fmt.Sprintf("unknown command %q", name)}
	}
	return cmd.Run(ctx, rest)
}

// report prints err, if any, as one line on stderr and returns the exit
// code: 0 for success, 2 for a usage error, 1 otherwise.
func report(stderr io.Writer, err error) int {
	if err == nil {
		return 0
	}
	// Error texts may quote an answer of egressd; keep it to one line.
	msg := strings.Join(strings.Fields(err.Error()), " ")
	fmt.Fprintf(stderr, "egressctl: %s\n", msg)
	if errors.As(err, new(usageError)) {
		return 2
	}
	return 1
}

// usageError is a bad command line; it exits 2 and points at -h.
type usageError struct {
	cmd string // the command whose flags were wrong, "" for the global ones
	msg string
}

func (e usageError) Error() string {
	if e.cmd == "" {
		return e.msg + " (run 'egressctl -h' for usage)"
	}
	return e.cmd + ": " + e.msg + " (run 'egressctl " + e.cmd + " -h' for usage)"
}

// parseFlags parses the flags of command cmd, printing help to stdout for
// -h. It reports whether the command should go on.
func parseFlags(fs *flag.FlagSet, args []string, help string, stdout io.Writer) (bool, error) {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			_, err = io.WriteString(stdout, help)
			return false, err
		}
		return false, usageError{fs.Name(), err.Error()}
	}
	if fs.NArg() > 0 {
		return false, usageError{fs.Name(), fmt.Sprintf("unexpected argument %q", fs.Arg(0))}
	}
	return true, nil
}

// isTerminal reports whether f is a terminal.
func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
