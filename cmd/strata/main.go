// Command strata is the operator CLI of a node's Strata layer cache: it pulls
// images into the cache, lists what the cache holds, reports its disk use and
// prunes layers that nothing uses.
//
// It is wiring only: flags, output and exit codes. The cache itself is
// package layercache, which the CSI node plugin uses on the same root.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/term"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/layercache"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// defaultRoot is the node state root that the CSI plugin uses too.
const defaultRoot = "/var/lib/strata"

// Exit codes. They are part of the CLI's contract with scripts, and are
// listed in the --help text; exitCode is the one place that picks them.
const (
	exitOK          = 0
	exitFailure     = 1 // any other failure
	exitUsage       = 2 // unknown command or flag, missing or invalid argument
	exitNotFound    = 3 // image, tag or blob not found in the registry
	exitUnauthorize = 4 // the registry refused the credentials (or their absence)
	exitUnavailable = 5 // the registry could not be reached; retry later
	exitCorrupt     = 6 // digest mismatch, corrupt or unsafe layer: nothing was stored
	exitNotCached   = 7 // the image is not in the cache (pull policy Never, inspect)
	exitInterrupted = 130
)

const exitCodesHelp = `Exit codes:
  0    success
  1    failure not listed below
  2    usage error: unknown command or flag, missing or invalid argument
  3    image, tag or blob not found in the registry
  4    the registry refused the credentials (or their absence)
  5    the registry is unreachable or temporarily failing; retry later
  6    digest mismatch, corrupt layer or unsafe layer; nothing was stored
  7    the image is not in the cache (pull --policy Never, inspect)
  130  interrupted (SIGINT or SIGTERM)
`

// exitCode maps an error to the process exit code, by its fault.Kind.
func exitCode(err error) int {
	if err == nil {
		return exitOK
	}
	if errors.As(err, new(usageError)) {
		return exitUsage
	}
	switch fault.Of(err) {
	case fault.Invalid:
		// A reference that does not parse is a mistake in the command
		// line; an image strata cannot use (ErrUnsupported) is not.
		if errors.Is(err, layercache.ErrInvalidReference) {
			return exitUsage
		}
	case fault.Canceled:
		return exitInterrupted
	case fault.NotFound:
		return exitNotFound
	case fault.Denied:
		return exitUnauthorize
	case fault.Unavailable:
		return exitUnavailable
	case fault.Corrupt, fault.Unsafe:
		return exitCorrupt
	case fault.NotCached:
		return exitNotCached
	}
	return exitFailure
}

// usageError is a mistake in the command line. The usage text of the
// command (or of strata) is printed after it.
type usageError struct {
	msg string
	cmd *command // nil: the top-level usage
}

func (e usageError) Error() string { return e.msg }

func usagef(cmd *command, format string, args ...any) error {
	return usageError{msg: fmt.Sprintf(format, args...), cmd: cmd}
}

// env is what a command runs with.
type env struct {
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	// tty is true when stdout is a terminal: progress is then redrawn in
	// place instead of printed line by line.
	tty bool
	// root is --root: the layer cache, and the plugin's volumes/.
	root string
	// open opens the cache at --root, once, with the options the command
	// needs (pull passes its concurrency and insecure registries). run
	// closes it when the command returns.
	open func(opts ...layercache.Option) (*layercache.Store, error)
}

// command is one strata subcommand.
type command struct {
	name    string
	args    string // synopsis of the arguments, for usage
	summary string
	help    string // more about the command, printed by --help after the synopsis
	// flags registers the command's flags and returns the function that
	// runs it with the positional arguments left after parsing.
	flags func(fs *flag.FlagSet) func(ctx context.Context, e *env, args []string) error
}

var commands = map[string]*command{}

func register(c *command) { commands[c.name] = c }

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run executes the command line and returns the exit code.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		// After the first signal, restore the default action: a second
		// Ctrl-C kills strata even if it is slow to wind down.
		<-ctx.Done()
		stop()
	}()
	defer klog.Flush()

	global := flag.NewFlagSet("strata", flag.ContinueOnError)
	global.SetOutput(io.Discard)
	klog.InitFlags(global)
	root := global.String("root", defaultRoot, "node state root")
	regConfig := global.String("registry-config", "", "registry config file (mirrors, plain-HTTP hosts, per-host TLS), as strata-csi's")
	global.Usage = func() {} // run prints the usage itself
	if err := global.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printUsage(stdout)
			return exitOK
		}
		return fail(stderr, usagef(nil, "%v", err))
	}
	if global.NArg() == 0 {
		return fail(stderr, usagef(nil, "no command given"))
	}
	name, rest := global.Arg(0), global.Args()[1:]
	if name == "help" {
		printUsage(stdout)
		return exitOK
	}
	cmd, ok := commands[name]
	if !ok {
		return fail(stderr, usagef(nil, "unknown command %q", name))
	}

	var store *layercache.Store
	e := &env{
		stdin:  stdin,
		stdout: stdout,
		stderr: stderr,
		tty:    isTerminal(stdout),
		root:   *root,
		open: func(opts ...layercache.Option) (*layercache.Store, error) {
			if store != nil {
				return nil, errors.New("the cache is already open")
			}
			if *regConfig != "" {
				opts = append(opts[:len(opts):len(opts)], layercache.WithRegistryConfig(*regConfig))
			}
			s, err := layercache.Open(*root, opts...)
			if err != nil {
				return nil, fmt.Errorf("open the cache at %s: %w", *root, err)
			}
			store = s
			return s, nil
		},
	}

	fs := flag.NewFlagSet("strata "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	exec := cmd.flags(fs)
	pos, err := parseInterspersed(fs, rest)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printCommandUsage(stdout, cmd, fs)
			return exitOK
		}
		return fail(stderr, usagef(cmd, "%v", err))
	}
	err = exec(ctx, e, pos)
	if store != nil {
		// Close stops the fetches an interrupted pull left running, and
		// removes this process's work directory.
		if cerr := store.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close the cache: %w", cerr)
		}
	}
	if err != nil {
		return fail(stderr, err)
	}
	return exitOK
}

// fail reports err on stderr and returns its exit code.
func fail(stderr io.Writer, err error) int {
	if errors.Is(err, context.Canceled) {
		fmt.Fprintln(stderr, "strata: interrupted")
		return exitCode(err)
	}
	fmt.Fprintf(stderr, "strata: %v\n", err)
	var uerr usageError
	if errors.As(err, &uerr) {
		if uerr.cmd != nil {
			fmt.Fprintf(stderr, "usage: strata %s [flags] %s\nRun 'strata %s --help' for its flags.\n", uerr.cmd.name, uerr.cmd.args, uerr.cmd.name)
		} else {
			fmt.Fprintf(stderr, "usage: strata [--root DIR] [--v N] COMMAND [ARGS]\ncommands: %s\nRun 'strata --help' for details and exit codes.\n",
				strings.Join(commandNames(), ", "))
		}
	}
	return exitCode(err)
}

// parseInterspersed parses flags that may come after positional arguments
// ("strata pull REF --policy Never"), as operators type them. A "--" ends
// the flags.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		// flag stops at the first non-flag, or after consuming a "--".
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

func printUsage(w io.Writer) {
	fmt.Fprintf(w, `strata inspects and manages a node's Strata image layer cache.

Usage:
  strata [--root DIR] [--v N] COMMAND [ARGS]

Commands:
`)
	for _, n := range commandNames() {
		fmt.Fprintf(w, "  %-8s %s\n", n, commands[n].summary)
	}
	fmt.Fprintf(w, `
Global flags:
  --root DIR  node state root (default %s)
  --registry-config FILE
              registry config: mirrors, plain-HTTP hosts, per-host TLS
              (the file strata-csi's --registry-config reads; docs/registries.md)
  --v N       log verbosity (logs go to stderr)

Run 'strata COMMAND --help' for the flags of a command.

%s`, defaultRoot, exitCodesHelp)
}

func commandNames() []string {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func printCommandUsage(w io.Writer, cmd *command, fs *flag.FlagSet) {
	fmt.Fprintf(w, "%s\n\nUsage:\n  strata [--root DIR] %s [flags] %s\n", cmd.summary, cmd.name, cmd.args)
	if cmd.help != "" {
		fmt.Fprintf(w, "\n%s", cmd.help)
	}
	var b strings.Builder
	fs.SetOutput(&b)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
	if b.Len() > 0 {
		// PrintDefaults writes "-name"; both forms work, and the rest of
		// the help text writes "--name".
		fmt.Fprintf(w, "\nFlags:\n%s", strings.ReplaceAll("\n"+b.String(), "\n  -", "\n  --")[1:])
	}
	fmt.Fprintf(w, "\n%s", exitCodesHelp)
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}
