package driver

import "github.com/container-storage-interface/spec/lib/go/csi"

// checkCapabilities accepts filesystem access in every access mode; block
// access has no meaning for an overlay.
func checkCapabilities(caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return invalid("volume capabilities are required")
	}
	for _, c := range caps {
		if err := checkCapability(c); err != nil {
			return err
		}
	}
	return nil
}

func checkCapability(c *csi.VolumeCapability) error {
	if c == nil {
		return invalid("volume capability is required")
	}
	if c.GetBlock() != nil {
		return invalid("block access is not supported: a Strata volume is a filesystem (use volumeMode: Filesystem)")
	}
	if c.GetMount() == nil {
		return invalid("volume capability needs mount access")
	}
	if fs := c.GetMount().GetFsType(); fs != "" && fs != "overlay" {
		return invalid("fsType %q is not supported: a Strata volume is an overlay; leave fsType empty", fs)
	}
	if c.GetAccessMode() == nil || c.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_UNKNOWN {
		return invalid("volume capability needs an access mode")
	}
	return nil
}

// readOnlyMode reports whether an access mode allows no writes.
func readOnlyMode(c *csi.VolumeCapability) bool {
	switch c.GetAccessMode().GetMode() {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY, csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:
		return true
	}
	return false
}

// allReadOnly reports whether every capability only reads.
func allReadOnly(caps []*csi.VolumeCapability) bool {
	for _, c := range caps {
		if !readOnlyMode(c) {
			return false
		}
	}
	return true
}
