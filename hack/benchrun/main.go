// Command benchrun runs a command and reports its wall time and peak memory.
//
// Usage:
//
//	benchrun [-o FILE] -- COMMAND [ARG...]
//
// It runs COMMAND with the same stdin, stdout and stderr, waits for it, and
// writes one line
//
//	SECONDS MAXRSS_KIB EXIT_CODE
//
// to FILE (or to stderr without -o). MAXRSS_KIB is the peak resident set size
// of the child, or of the largest of its waited-for descendants, from
// wait4(2)'s rusage; it needs no GNU time. benchrun exits with the command's
// exit code (128+N if it was killed by signal N).
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	code, err := run()
	if err != nil {
		fmt.Fprintf(os.Stderr, "benchrun: %v\n", err)
		os.Exit(125)
	}
	os.Exit(code)
}

func run() (int, error) {
	fs := flag.NewFlagSet("benchrun", flag.ContinueOnError)
	out := fs.String("o", "", "write the result line to this file (default: stderr)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: benchrun [-o FILE] -- COMMAND [ARG...]\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, nil
		}
		return 2, nil
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return 2, nil
	}
	cmd := exec.Command(fs.Arg(0), fs.Args()[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr

	// Forward SIGINT/SIGTERM to the child instead of dying first.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)

	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	go func() {
		for s := range sigs {
			cmd.Process.Signal(s)
		}
	}()
	err := cmd.Wait()
	elapsed := time.Since(start)
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		return 0, err
	}
	ps := cmd.ProcessState
	code := ps.ExitCode()
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		code = 128 + int(ws.Signal())
	}
	var maxrss int64
	if ru, ok := ps.SysUsage().(*syscall.Rusage); ok {
		maxrss = ru.Maxrss // KiB on Linux
	}
	line := fmt.Sprintf("%.3f %d %d\n", elapsed.Seconds(), maxrss, code)
	if *out == "" {
		fmt.Fprint(os.Stderr, line)
	} else if err := os.WriteFile(*out, []byte(line), 0o644); err != nil {
		return 0, err
	}
	return code, nil
}
