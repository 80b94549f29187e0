// Command e2eimages prints the images of Kubernetes' e2e suite, at the
// bundle's Kubernetes version, that the external-storage specs run besides
// busybox, one per line: agnhost, nginx, and the DNS-testing image of the
// multi-volume specs (glibc-dns-testing since v1.36, jessie-dnsutils
// before). No registry serves them here: hack/cluster/build makes images
// under these names (the real agnhost, built from the same module; busybox
// stand-ins for the two others, whose commands the specs override).
package main

import (
	"fmt"
	"os"
	"path"
	"strings"

	imageutils "k8s.io/kubernetes/test/utils/image"
)

func main() {
	// --busybox: the suite's busybox alone, which the cluster's busybox is
	// tagged as (its tag differs between versions).
	if len(os.Args) == 2 && os.Args[1] == "--busybox" {
		fmt.Println(imageutils.GetE2EImage(imageutils.BusyBox))
		return
	}
	fmt.Println(imageutils.GetE2EImage(imageutils.Agnhost))
	fmt.Println(imageutils.GetE2EImage(imageutils.Nginx))
	// The DNS-testing image's identifier is GlibcDnsTesting since v1.36,
	// JessieDnsutils before: it is found by its name.
	byName := map[string]string{}
	for _, c := range imageutils.GetImageConfigs() {
		image := c.GetE2EImage()
		name, _, _ := strings.Cut(path.Base(image), ":")
		byName[name] = image
	}
	for _, n := range []string{"glibc-dns-testing", "jessie-dnsutils"} {
		if image, ok := byName[n]; ok {
			fmt.Println(image)
			return
		}
	}
	fmt.Fprintln(os.Stderr, "e2eimages: the suite's manifest has no glibc-dns-testing or jessie-dnsutils image")
	os.Exit(1)
}
