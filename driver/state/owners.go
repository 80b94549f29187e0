package state

import "strings"

// The layer cache counts references by owner, a string. Every owner the
// driver uses is made here, so that recovery can tell, of each owner the
// cache holds, what it belongs to and whether that still exists:
//
//	<key>            a publish (Key): volumes/<key>/
//	clone/<id>       a persistent clone: clones/<id>/, staged or not
//	prepull:<image>  an image the plugin keeps prepulled (--prepull)
const (
	cloneOwnerPrefix   = "clone/"
	prepullOwnerPrefix = "prepull:"
)

// OwnerKind is what an owner of cache references belongs to.
type OwnerKind int

// Owner kinds.
const (
	OwnerUnknown OwnerKind = iota // not made by the driver: left alone
	OwnerPublish
	OwnerClone
	OwnerPrepull
)

// PublishOwner is the owner of the references of publish key.
func PublishOwner(key string) string { return key }

// CloneOwner is the owner of the references of clone id.
func CloneOwner(id string) string { return cloneOwnerPrefix + id }

// PrepullOwner is the owner of the references of a prepulled image.
func PrepullOwner(image string) string { return prepullOwnerPrefix + image }

// ParseOwner returns what owner belongs to: its kind, and the publish key,
// clone id or image it names.
func ParseOwner(owner string) (OwnerKind, string) {
	if id, ok := strings.CutPrefix(owner, cloneOwnerPrefix); ok && CheckCloneID(id) == nil {
		return OwnerClone, id
	}
	if ref, ok := strings.CutPrefix(owner, prepullOwnerPrefix); ok && ref != "" {
		return OwnerPrepull, ref
	}
	if IsKey(owner) {
		return OwnerPublish, owner
	}
	return OwnerUnknown, owner
}
