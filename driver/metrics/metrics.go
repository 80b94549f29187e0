// Package metrics exposes the node plugin's Prometheus metrics (strata_*):
// CSI call latency by method and status code, layers and bytes pulled, cache
// hits and misses, pull durations, registry errors by kind, and, computed at
// scrape time from the state on disk and the cache, the cache's size, the
// number of published volumes and the registries' 429s by host.
package metrics

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/layercache"
)

// Sources are read at scrape time, so the metrics never disagree with the
// state on disk. Either may be nil (a controller has no cache).
type Sources struct {
	// Usage reports the layer cache's disk use.
	Usage func() (layercache.Usage, error)
	// Volumes counts the publishes on this node.
	Volumes func() (int, error)
	// Stats reports the cache's in-flight pulls, evictions and the 429s
	// of registries.
	Stats func() layercache.Stats
}

// Metrics holds the plugin's collectors. A nil *Metrics records nothing, so
// callers need no checks when metrics are off.
type Metrics struct {
	reg         *prometheus.Registry
	calls       *prometheus.HistogramVec
	layers      prometheus.Counter
	pulledBytes prometheus.Counter
	hits        prometheus.Counter
	misses      prometheus.Counter
	pulls       *prometheus.HistogramVec
	registryErr *prometheus.CounterVec
}

// Kinds of registry errors (the kind label of strata_registry_errors_total),
// and Success, the result label of a pull that succeeded.
const (
	KindNotFound     = "not_found"    // no such repository, tag, manifest or blob
	KindUnauthorized = "unauthorized" // the registry refused the credentials
	KindUnavailable  = "unavailable"  // unreachable, timed out or 5xx
	KindRateLimited  = "rate_limited" // the registry answered 429 Too Many Requests
	KindDeadline     = "deadline"     // the call's deadline ended while resolving
	KindBadBlob      = "bad_blob"     // digest mismatch or corrupt layer
	KindUnsafeLayer  = "unsafe_layer" // a layer tries to write outside itself
	KindOther        = "other"
	Success          = "success"
)

// Kinds lists every registry error kind. Their series are created at zero,
// so that rate() and alerts see the first error.
var Kinds = []string{KindNotFound, KindUnauthorized, KindUnavailable, KindRateLimited, KindDeadline, KindBadBlob, KindUnsafeLayer, KindOther}

// New registers the plugin's metrics, and Go runtime and process metrics, in
// a registry of their own.
func New(src Sources) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		calls: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "strata_csi_call_duration_seconds",
			Help: "Duration of CSI calls by method and gRPC status code.",
			// From a cached publish (about a millisecond) to a cold pull
			// that runs into kubelet's two-minute deadline.
			Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 14),
		}, []string{"method", "code"}),
		layers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "strata_layers_pulled_total",
			Help: "Layers downloaded and unpacked into the cache.",
		}),
		pulledBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "strata_pulled_bytes_total",
			Help: "Compressed bytes of the layers downloaded into the cache.",
		}),
		hits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "strata_layer_cache_hits_total",
			Help: "Layers a publish found in the cache.",
		}),
		misses: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "strata_layer_cache_misses_total",
			Help: "Layers a publish did not find in the cache, and downloaded or waited for (a layer that several publishes wait for is one miss each, and one strata_layers_pulled_total).",
		}),
		pulls: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "strata_pull_duration_seconds",
			Help: "Duration of the image pulls that had layers to download, by result (success or the registry error kind).",
			// From a small layer on a local registry to the ten minutes a
			// large dataset can take; a pull that outlasts kubelet's call
			// goes on, and its retry observes the rest.
			Buckets: []float64{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600},
		}, []string{"result"}),
		registryErr: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_registry_errors_total",
			Help: "Failed resolves and pulls of publishes, by kind: not_found, unauthorized, unavailable, rate_limited, deadline, bad_blob, unsafe_layer, other.",
		}, []string{"kind"}),
	}
	for _, k := range Kinds {
		m.registryErr.WithLabelValues(k)
	}
	m.reg.MustRegister(m.calls, m.layers, m.pulledBytes, m.hits, m.misses, m.pulls, m.registryErr,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		&stateCollector{src: src})
	return m
}

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// ObserveCall records one CSI call.
func (m *Metrics) ObserveCall(method string, code codes.Code, d time.Duration) {
	if m == nil {
		return
	}
	m.calls.WithLabelValues(method, code.String()).Observe(d.Seconds())
}

// LayerHit records a layer a publish found in the cache.
func (m *Metrics) LayerHit() {
	if m == nil {
		return
	}
	m.hits.Inc()
}

// LayerMissed records a layer a publish did not find in the cache.
func (m *Metrics) LayerMissed() {
	if m == nil {
		return
	}
	m.misses.Inc()
}

// ObservePull records one image pull that had layers to download; result is
// Success or one of Kinds.
func (m *Metrics) ObservePull(result string, d time.Duration) {
	if m == nil {
		return
	}
	m.pulls.WithLabelValues(result).Observe(d.Seconds())
}

// RegistryError counts a failed resolve or pull; kind is one of Kinds.
func (m *Metrics) RegistryError(kind string) {
	if m == nil {
		return
	}
	m.registryErr.WithLabelValues(kind).Inc()
}

// LayerPulled records a layer this process downloaded and committed.
func (m *Metrics) LayerPulled(compressedBytes int64) {
	if m == nil {
		return
	}
	m.layers.Inc()
	m.pulledBytes.Add(float64(compressedBytes))
}

var (
	cacheBytesDesc  = prometheus.NewDesc("strata_cache_bytes", "Content bytes of the cached layers.", nil, nil)
	cacheInUseDesc  = prometheus.NewDesc("strata_cache_in_use_bytes", "Content bytes of cached layers that published volumes hold.", nil, nil)
	cacheLayersDesc = prometheus.NewDesc("strata_cache_layers", "Cached layers.", nil, nil)
	volumesDesc     = prometheus.NewDesc("strata_volumes_published", "Volumes published on this node.", nil, nil)
	inFlightDesc    = prometheus.NewDesc("strata_pulls_in_flight", "Layers being downloaded and unpacked now.", nil, nil)
	evictedDesc     = prometheus.NewDesc("strata_evicted_layers_total", "Unused layers the cache budget evicted.", nil, nil)
	evictedBytes    = prometheus.NewDesc("strata_evicted_bytes_total", "Content bytes of the layers the cache budget evicted.", nil, nil)
	rateLimitedDesc = prometheus.NewDesc("strata_registry_rate_limited_total",
		"429 Too Many Requests answers of registries, mirrors and token servers, by host (the hosts past the first 100 as \""+layercache.OtherHosts+"\").",
		[]string{"host"}, nil)
)

// stateCollector reads the cache and the volume records at scrape time.
type stateCollector struct{ src Sources }

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- cacheBytesDesc
	ch <- cacheInUseDesc
	ch <- cacheLayersDesc
	ch <- volumesDesc
	ch <- inFlightDesc
	ch <- evictedDesc
	ch <- evictedBytes
	ch <- rateLimitedDesc
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	if c.src.Usage != nil {
		if u, err := c.src.Usage(); err != nil {
			ch <- prometheus.NewInvalidMetric(cacheBytesDesc, err)
		} else {
			ch <- prometheus.MustNewConstMetric(cacheBytesDesc, prometheus.GaugeValue, float64(u.Bytes))
			ch <- prometheus.MustNewConstMetric(cacheInUseDesc, prometheus.GaugeValue, float64(u.InUseBytes))
			ch <- prometheus.MustNewConstMetric(cacheLayersDesc, prometheus.GaugeValue, float64(u.Layers))
		}
	}
	if c.src.Stats != nil {
		st := c.src.Stats()
		ch <- prometheus.MustNewConstMetric(inFlightDesc, prometheus.GaugeValue, float64(st.InFlight))
		ch <- prometheus.MustNewConstMetric(evictedDesc, prometheus.CounterValue, float64(st.EvictedLayers))
		ch <- prometheus.MustNewConstMetric(evictedBytes, prometheus.CounterValue, float64(st.EvictedBytes))
		for host, n := range st.RateLimited {
			ch <- prometheus.MustNewConstMetric(rateLimitedDesc, prometheus.CounterValue, float64(n), host)
		}
	}
	if c.src.Volumes != nil {
		if n, err := c.src.Volumes(); err != nil {
			ch <- prometheus.NewInvalidMetric(volumesDesc, err)
		} else {
			ch <- prometheus.MustNewConstMetric(volumesDesc, prometheus.GaugeValue, float64(n))
		}
	}
}
