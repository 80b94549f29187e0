// Package chart holds the tests of the Helm chart charts/strata. They render
// the chart with the real helm binary (v3.22.0, installed by hack/install-deps)
// and assert on the objects that come out; they check that the values schema
// refuses bad values, that `helm lint --strict` passes, that deploy/strata.yaml
// is a fresh rendering (hack/render-deploy), and that the workloads in
// deploy/examples are well-formed Strata volumes.
package chart
