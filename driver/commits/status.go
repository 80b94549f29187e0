package commits

import (
	"errors"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/strata-csi/strata/layercache"
	"github.com/strata-csi/strata/layercache/commit"
)

// action is what a node does with a VolumeCommit it sees.
type action int

const (
	// actSkip: nothing to do here (over, or another node's).
	actSkip action = iota
	// actClaim: not yet taken; take it if the volume is on this node.
	actClaim
	// actResume: this node took it and stopped before it finished (the
	// plugin restarted): do it again.
	actResume
)

func (a action) String() string {
	return [...]string{"skip", "claim", "resume"}[a]
}

// next decides what node does with a VolumeCommit of status st. running
// tells whether this process is committing it now: a Running object of
// this node that no one here works on was left by a plugin that stopped.
func next(st Status, node string, running bool) action {
	switch {
	case st.Terminal():
		return actSkip
	case st.Phase == PhaseRunning && st.Node == node && !running:
		return actResume
	case st.Phase == PhaseRunning:
		return actSkip
	}
	return actClaim // no phase yet, or Pending
}

// claimed is st taken by node at now: Running, with what it commits.
func claimed(st Status, node, what string, now time.Time) Status {
	t := metav1.NewTime(now)
	return Status{Phase: PhaseRunning, Node: node, StartTime: &t,
		Message: fmt.Sprintf("committing %s on node %s", what, node)}
}

// succeeded is st once res was pushed at now.
func succeeded(st Status, res commit.Result, now time.Time) Status {
	t := metav1.NewTime(now)
	out := Status{Phase: PhaseSucceeded, Node: st.Node, StartTime: st.StartTime, CompletionTime: &t,
		Digest: res.Digest.String(), ImageRef: res.Ref(), UploadedBytes: res.Uploaded, LayerBytes: res.LayerBytes,
		Files: res.Stats.Files, Deletions: res.Stats.Whiteouts}
	out.Message = fmt.Sprintf("pushed %s: a layer of %d bytes (%d files, %d deletions), %d bytes uploaded",
		out.ImageRef, res.LayerBytes, res.Stats.Files, res.Stats.Whiteouts, res.Uploaded)
	return out
}

// failed is st ended at now by err, on node (which may not have claimed
// it: a node that holds the volume refuses a commit it cannot do).
func failed(st Status, node string, err error, now time.Time) Status {
	t := metav1.NewTime(now)
	start := st.StartTime
	if start == nil {
		start = &t
	}
	return Status{Phase: PhaseFailed, Node: node, StartTime: start, CompletionTime: &t, Message: failureMessage(err)}
}

// failureMessage is err with what to do about it. The spec cannot change,
// so every remedy ends in a new VolumeCommit.
func failureMessage(err error) string {
	msg := err.Error()
	var hint string
	switch {
	case errors.Is(err, layercache.ErrUnauthorized):
		hint = "give credentials with push access to the target in spec.pushSecretName (the node's own credentials are never used to push)"
	case errors.Is(err, layercache.ErrUnavailable):
		hint = "check that the registry is reachable from the node"
	}
	if hint != "" {
		msg += ": " + hint
	}
	return msg + "; fix it and create a new VolumeCommit (the spec is immutable)"
}
