# shellcheck shell=bash
# Helpers shared by Strata's scripts (sourced by hack/install-deps,
# hack/cluster/common.sh and hack/demo); test/hacklib tests them.
#
# run_long WHAT ABOUT LOG CMD [ARG...]
#   A long step (a build, a package install, a wait) that never goes silent:
#   it says what runs and roughly how long it takes ("WHAT (ABOUT; output in
#   LOG)", LOG named only at its first step in this shell), runs CMD (a command or a shell function) in the background with
#   its stdout and stderr appended to LOG (the `go: downloading` noise and
#   build output stay there), prints "  ... WHAT: 1m30s" every
#   STRATA_HEARTBEAT seconds (default 30) while it runs, and "  WHAT: done in
#   2m05s" when it ends. It returns CMD's exit status; on failure it prints
#   LOG's last 40 lines and LOG's path. CMD runs in a process group of its
#   own: Ctrl-C (SIGINT), SIGTERM or SIGHUP to the script kill that whole
#   group (a go build's compilers too), and then the script dies of the same
#   signal; a failed CMD's leftover processes are killed as well. Messages go
#   to stderr, each prefixed with RUN_LONG_PREFIX (e.g. "cluster: ").
#   Safe under set -euo pipefail; use it as `run_long ... || die ...`.

# Where long steps keep their output (one log per step, named when it
# starts), kept across runs and checkouts like the build cache.
STRATA_LOGS=${STRATA_LOGS:-${XDG_CACHE_HOME:-$HOME/.cache}/strata/logs}

# fmt_duration SECONDS: 45s, 2m05s, 1h02m03s.
fmt_duration() {
	local s=$1
	if [ "$s" -ge 3600 ]; then
		printf '%dh%02dm%02ds' $((s / 3600)) $((s % 3600 / 60)) $((s % 60))
	elif [ "$s" -ge 60 ]; then
		printf '%dm%02ds' $((s / 60)) $((s % 60))
	else
		printf '%ds' "$s"
	fi
}

# _now_us: microseconds since the epoch (bash 5's EPOCHREALTIME: no fork).
_now_us() {
	local t=${EPOCHREALTIME/[.,]/}
	echo $((10#$t))
}

run_long() {
	local what=$1 about=$2 log=$3
	shift 3
	local pfx=${RUN_LONG_PREFIX:-} every=${STRATA_HEARTBEAT:-30}
	case "$every" in
	'' | *[!0-9]* | 0) every=30 ;;
	esac
	mkdir -p "$(dirname "$log")"
	# The log is named once: at the first step that writes to it.
	case " ${_RUN_LONG_LOGS:-} " in
	*" $log "*) printf '%s%s (%s)\n' "$pfx" "$what" "$about" >&2 ;;
	*)
		printf '%s%s (%s; output in %s)\n' "$pfx" "$what" "$about" "$log" >&2
		_RUN_LONG_LOGS="${_RUN_LONG_LOGS:-} $log"
		;;
	esac
	printf '=== %s %s\n' "$(date -Is)" "$what" >>"$log"

	# A process group of its own (job control on for this one job): a
	# signal to the group reaches every process the command started.
	# stdin is /dev/null: a background group must not read the terminal.
	local pid jobctl=$-
	set -m
	"$@" >>"$log" 2>&1 </dev/null &
	pid=$!
	case "$jobctl" in *m*) ;; *) set +m ;; esac

	local saved sig
	saved=$(trap -p INT TERM HUP)
	# shellcheck disable=SC2064 # pid, what and saved are meant to expand now
	for sig in INT TERM HUP; do
		trap "_run_long_signal $sig $pid $(printf '%q' "$what") $(printf '%q' "$saved")" "$sig"
	done

	local start now next elapsed rc=0
	start=$(_now_us)
	next=$((start + every * 1000000))
	while kill -0 "$pid" 2>/dev/null; do
		now=$(_now_us)
		if [ "$now" -ge "$next" ]; then
			printf '%s  ... %s: %s\n' "$pfx" "$what" "$(fmt_duration $(((now - start) / 1000000)))" >&2
			next=$((next + every * 1000000))
		fi
		sleep 0.2
	done
	wait "$pid" || rc=$?
	elapsed=$((($(_now_us) - start) / 1000000))
	trap - INT TERM HUP
	eval "$saved"

	if [ "$rc" = 0 ]; then
		printf '%s  %s: done in %s\n' "$pfx" "$what" "$(fmt_duration "$elapsed")" >&2
		return 0
	fi
	# What it left running (a parallel build's other half) goes too.
	kill -TERM -- "-$pid" 2>/dev/null || true
	{
		printf '%s  %s: FAILED (exit status %d) after %s; the last 40 lines of %s:\n' \
			"$pfx" "$what" "$rc" "$(fmt_duration "$elapsed")" "$log"
		tail -n 40 "$log" | sed 's/^/    | /'
		printf '%s  %s: the whole output is in %s\n' "$pfx" "$what" "$log"
	} >&2
	return "$rc"
}

# _pgrp_running PGID: a process of the group still runs (zombies, which
# wait for their reparented parent to reap them, do not count).
_pgrp_running() {
	ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

# _run_long_signal SIG PID WHAT SAVED: the trap of run_long. It kills the
# command's process group, waits for it, restores the caller's traps, and
# sends SIG to this shell again, so that the caller's own trap runs or the
# script dies of SIG (exit status 128+n) as it would have without run_long.
_run_long_signal() {
	local sig=$1 pid=$2 what=$3 saved=$4
	printf '\n%s  %s: interrupted (SIG%s); stopping it\n' "${RUN_LONG_PREFIX:-}" "$what" "$sig" >&2
	kill -TERM -- "-$pid" 2>/dev/null || true
	local _
	for _ in $(seq 50); do
		_pgrp_running "$pid" || break
		sleep 0.1
	done
	kill -KILL -- "-$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	trap - INT TERM HUP
	eval "$saved"
	kill -s "$sig" "$BASHPID"
}
