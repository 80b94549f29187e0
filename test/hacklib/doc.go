// Package hacklib tests hack/lib.sh, the helpers of Strata's bash scripts:
// run_long, which runs a long step (a build, a package install, a wait) in
// the background with its output in a log file and prints a heartbeat while
// it runs, so that make demo never goes silent. The tests run the real bash
// on scripts that source the real file, with a heartbeat every second.
package hacklib
