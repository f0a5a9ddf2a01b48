package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"

	"github.com/egressd/egressd/internal/admin"
)

// command is one of egressctl's commands, each in a file of its own.
type command interface {
	Run(ctx context.Context, args []string) error
}

var commands = map[string]func(env) command{
	"stats":  func(e env) command { return &statsCommand{env: e} },
	"addrs":  func(e env) command { return &addrsCommand{e} },
	"reload": func(e env) command { return &reloadCommand{e} },
	"rotate": func(e env) command { return &rotateCommand{e} },
}

// env is what a command works with.
type env struct {
	admin    *admin.Client
	stdout   io.Writer
	terminal bool // stdout is a terminal
}

// parseFlags parses the flags of command cmd, printing help to stdout for
// -h. It reports whether the command should go on.
func parseFlags(fs *flag.FlagSet, args []string, help string, stdout io.Writer) (bool, error) {
	if ok, err := parseWithArgs(fs, args, help, stdout); !ok {
		return false, err
	}
	if fs.NArg() > 0 {
		return false, usageError{fs.Name(), fmt.Sprintf("unexpected argument %q", fs.Arg(0))}
	}
	return true, nil
}

// parseWithArgs is parseFlags for a command that takes arguments after its
// flags, and checks them itself.
func parseWithArgs(fs *flag.FlagSet, args []string, help string, stdout io.Writer) (bool, error) {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			_, err = io.WriteString(stdout, help)
			return false, err
		}
		return false, usageError{fs.Name(), err.Error()}
	}
	return true, nil
}
