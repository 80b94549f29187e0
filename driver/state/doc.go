// Package state owns the node's volume state under the state root: the
// publishes in volumes/ and the persistent clones in clones/, their record
// files, the names of every file and directory in them (paths.go), and the
// owners of layer-cache references (owners.go).
//
//	volumes/<key>/volume.json   a publish's Record (Key: volume id and target path)
//	volumes/<key>/upper, work   its writable layer, when uncapped
//	volumes/<key>/disk.img, fs/ its capped upper's filesystem, with upper/ and work/ in fs/
//	volumes/<key>/mnt           the overlay of a publish with a subPath
//	clones/<volumeID>/clone.json, stage.json, disk.img, fs/{upper,work}
//	upper-templates/            template images of capped uppers' filesystems
//
// It is the lowest of the driver's packages: the volume engine, clones, the
// VolumeCommit watcher and the strata CLI all read the state through it,
// and the CLI does so without linking the CSI server and the Kubernetes
// client. The plugin is the only writer.
package state
