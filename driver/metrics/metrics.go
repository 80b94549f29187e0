// Package metrics exposes the node plugin's Prometheus metrics (strata_*):
// CSI call latency by method and status code, layers and bytes pulled, and,
// computed at scrape time from the state on disk, the cache's size and the
// number of published volumes.
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
	// Stats reports the cache's in-flight pulls and evictions.
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
}

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
			Help: "Layers a publish found in the cache (strata_layers_pulled_total counts the misses it downloaded).",
		}),
	}
	m.reg.MustRegister(m.calls, m.layers, m.pulledBytes, m.hits,
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
	}
	if c.src.Volumes != nil {
		if n, err := c.src.Volumes(); err != nil {
			ch <- prometheus.NewInvalidMetric(volumesDesc, err)
		} else {
			ch <- prometheus.MustNewConstMetric(volumesDesc, prometheus.GaugeValue, float64(n))
		}
	}
}
