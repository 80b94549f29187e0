# Strata: thin wrappers around the Go tool and the scripts in hack/.
# Every target works on a fresh Debian machine as root; hack/install-deps
# installs what is missing.

SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(HOME)/go/bin:$(PATH)
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)
# The unpacker's fuzz target, and how long `make fuzz` runs it, and
# `make unit` (fuzz-ci) after the tests. FUZZTIME_CI is a count of
# executions (about 25 s here), not a duration: Go 1.26's fuzz coordinator
# can fail a duration-bounded run at its deadline with "context deadline
# exceeded" and no crasher (golang/go#75804, fixed in Go 1.27).
FUZZTIME ?= 60s
FUZZTIME_CI ?= 10000x
# Where hack/install-deps puts staticcheck (go install's default).
STATICCHECK = $(shell $(GO) env GOPATH)/bin/staticcheck

.PHONY: all build test unit e2e e2e-nodes conformance matrix lint bench demo deps fuzz fuzz-ci clean

all: build

## build: static binaries in bin/
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/strata ./cmd/strata
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/strata-csi ./cmd/strata-csi

## deps: install what the build and the tests need (idempotent)
deps:
	hack/install-deps

# Builds and the unit tests run with GOGC=400: the compiler then collects
# garbage less often, 13% less wall time on a cold build here, for ~40% more
# memory per compile (see hack/cluster/build). Not for make bench, which
# measures the plugin's memory.
build lint unit: export GOGC := $(or $(GOGC),400)

## lint: formatting, vet (with -race, so that vet and the tests share one
## compilation of every dependency) and staticcheck (its default checks,
## unused code included; hack/install-deps installs the version pinned in
## hack/versions.sh); fails on any finding
lint: deps
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "not gofmt-formatted:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet -race ./...
	$(GO) vet -race -tags e2e,cluster ./test/...
	$(STATICCHECK) ./...
	$(STATICCHECK) -tags e2e,cluster ./test/...

## test: the whole suite: unit and integration tests, then the end-to-end
## suite on a real cluster (root); the cluster's binaries build in the
## background meanwhile the first time (hack/test)
test:
	hack/test

## unit: formatting, vet, and every package's tests (root: real mounts, a
## real registry on loopback), then the unpacker's fuzz test for
## FUZZTIME_CI (fuzz-ci); the fast loop, no cluster
unit: lint
	$(GO) test -race -count=1 -timeout 20m ./...
	$(GO) test -run '^$$' -fuzz FuzzApply -fuzztime $(FUZZTIME_CI) ./layercache/unpack

## e2e: a real single-node Kubernetes (hack/cluster-up), the chart installed
## with helm, Strata's scenarios and Kubernetes' external-storage e2e suite,
## then hack/cluster-down (see hack/e2e and test/e2e); then the steps
## E2E_NODES_CI of the many-node scenarios on a cluster of three nodes (the
## others, a rolling upgrade and a lost node, are make e2e-nodes's)
E2E_NODES_CI ?= ^TestNodes$$/^(Install|Placement|ControllerFailover|CommitOnItsNode|DeletionOnItsNode)$$
e2e: deps image
	hack/e2e
	NODES=3 hack/e2e -run '$(E2E_NODES_CI)'

## e2e-nodes: all the many-node scenarios (test/e2e TestNodes) on a cluster
## of one control plane and three nodes (NODES=3 hack/e2e): placement, the
## controller's failover, each node's sweep and commits, a rolling upgrade
## and a lost node; make conformance runs it
e2e-nodes: deps image
	NODES=3 hack/e2e

## conformance: make e2e with every spec of Kubernetes' external-storage
## suite that applies to a kind of Strata volume, [Slow], [Serial] and
## [Disruptive] included (STRATA_CONFORMANCE=1), then make e2e-nodes (every
## many-node scenario) and make matrix; too long for CI, whose make test runs
## the others (test/README.md gives the last result)
conformance: deps image
	STRATA_CONFORMANCE=1 hack/e2e
	$(MAKE) e2e-nodes
	$(MAKE) matrix

## matrix: make e2e's selection on the version matrix's other pair,
## Kubernetes MATRIX_K8S_VERSION with Debian's containerd 1.6
## (STRATA_MATRIX=1: the counts are test/README.md's matrix column); make
## conformance runs it after its own run, CI does not
MATRIX_K8S_VERSION ?= v1.35.4
matrix: deps image
	K8S_VERSION=$(MATRIX_K8S_VERSION) CONTAINERD=debian STRATA_MATRIX=1 hack/e2e

## fuzz: run the unpacker's fuzz test for FUZZTIME; what it finds is
## written to layercache/unpack/testdata/fuzz/FuzzApply (keep it in git)
fuzz: deps
	$(GO) test -run '^$$' -fuzz FuzzApply -fuzztime $(FUZZTIME) ./layercache/unpack

## fuzz-ci: the unpacker's fuzz test for FUZZTIME_CI, as make unit runs it
fuzz-ci:
	$(GO) test -run '^$$' -fuzz FuzzApply -fuzztime $(FUZZTIME_CI) ./layercache/unpack

## bench: cold-pull benchmarks against a local registry (see hack/bench), then
## publish/unpublish latency beside the bare mount floor
bench: deps build
	hack/bench
	$(GO) test -run '^$$' -bench . -benchtime 200x ./driver/ ./driver/mount/

## demo: the local cluster, the chart installed with helm, the examples of
## deploy/examples on a sample dataset image, and the proof of the README's
## claims: copy-on-write isolation, a clone's persistence, one copy on the
## node (hack/demo; it runs hack/install-deps and make image itself, their
## output in ~/.cache/strata/logs); demo-down removes it all
.PHONY: demo-down demo-socket
demo:
	hack/demo
demo-down:
	hack/demo --down

## demo-socket: the faster demo without Kubernetes: a registry on 127.0.0.1,
## the cache pulled twice, two volumes published over the plugin's socket
demo-socket: deps build
	hack/demo-socket

clean:
	rm -rf bin

## image: the node plugin's container image as an OCI archive (bin/strata-image.tar);
## load it with `ctr -n k8s.io images import bin/strata-image.tar`, or push it
## with `make image IMAGE_PUSH=127.0.0.1:5000/strata/strata-csi:$(VERSION)`
IMAGE ?= localhost/strata/strata-csi:$(VERSION)
IMAGE_PUSH ?=
.PHONY: image
image: build
	$(GO) run ./hack/buildimage --bin bin --version $(VERSION) \
		--revision "$$(git rev-parse HEAD 2>/dev/null)" \
		--tag $(IMAGE) --out bin/strata-image.tar $(if $(IMAGE_PUSH),--push $(IMAGE_PUSH))

## cluster-up / cluster-down: a real single-node Kubernetes (v1.37.2 + containerd
## v2.2.9 by default, built from the module proxy and cached in ~/.cache/strata/cluster) in
## its own network namespace (NODES=3 make cluster-up: three nodes); see
## hack/cluster/README.md
.PHONY: cluster-up cluster-down cluster-test
cluster-up:
	hack/cluster-up
cluster-down:
	hack/cluster-down

## cluster-test: bring a cluster up, run a pod, tear it down, check the host
## network is byte-identical; then the same with NODES=3 and a pod per node
## (a cold build takes about 20 minutes)
cluster-test: deps
	$(GO) test -tags cluster -count=1 -timeout 40m ./test/cluster
