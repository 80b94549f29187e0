// Package driver implements Strata's CSI services: Identity, Node and
// Controller.
//
// A published volume is an image's layer stack, taken from the node's layer
// cache (package layercache), overlay-mounted at the pod's target path with a
// private writable upper directory under the state root:
//
//	volumes/<key>/volume.json   what was published: volume id, target, image, layers
//	volumes/<key>/upper, work   the writable layer of an uncapped publish (absent for read-only publishes)
//	volumes/<key>/disk.img      a capped publish's sparse ext4 image (volume attribute size), mounted at
//	volumes/<key>/fs/           with the writable layer in fs/upper and fs/work
//	volumes/<key>/mnt           the overlay itself, when only a subPath is bound to the target
//
// <key> derives from the volume id and the target path, since one
// PersistentVolume can be published to several pods on a node.
//
// The state on disk is the truth: a restarted plugin rebuilds everything from
// volumes/*/volume.json and the mount table. Errors from the layer cache are
// turned into gRPC status codes in one place, toStatus.
package driver
