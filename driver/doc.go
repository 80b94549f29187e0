// Package driver is Strata's CSI front: the Identity, Node and Controller
// services, the interceptor that logs each call (secrets stripped) and
// records its metrics, and the one translation of domain errors into gRPC
// status codes (toStatus, by their fault kind).
//
// A handler reads: validate the request, take the in-flight lock of its
// volume (a second call on the same volume fails fast with Aborted), call
// the flow that owns the work, return. The flows live in packages of their
// own, each importing only downwards (docs/architecture.md):
//
//	engine    publish, unpublish, stack planning, subPath, capped uppers, stats, recovery
//	clones    persistent clones: stage, unstage, delete, the sweep of deleted volumes
//	commits   the VolumeCommit watcher
//	tasks     the runner of the background work (sweep, prepulls, commits)
//	state     volumes/ and clones/ under the state root, and the owners of cache references
//
// The state on disk is the truth: a restarted plugin rebuilds everything
// from it and the mount table (Recover).
package driver
