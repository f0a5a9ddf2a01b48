package main

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/egressd/egressd/internal/admin"
)

const usage = `egressctl shows what a running egressd is doing, makes it reload its configuration and rotates sessions.

Usage: egressctl [-admin ADDR] COMMAND [flags]

Commands:
  stats   per-upstream requests, waits, errors, bytes and latency, and the address pool
  addrs   the egress addresses egressd holds, oldest first
  reload  read the configuration again (as SIGHUP does) and say what changed
  rotate  give a session (-rotate session) a new egress address

Flags:
  -admin ADDR   egressd's admin API: a unix socket path or host:port
                (default ` + admin.DefaultAddr + `)
  -version      print the version and exit

Run 'egressctl COMMAND -h' for the flags of a command.
`

func printUsage(stdout io.Writer) error {
	_, err := io.WriteString(stdout, usage)
	return err
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
