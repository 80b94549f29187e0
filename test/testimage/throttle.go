package testimage

import (
	"net/http"
	"time"
)

// CapEachAnswer is a registry wrapper (for Server) that sends each answer at
// no more than bytesPerSecond, as object stores behind registries cap each
// connection: several connections at once get several times the cap.
func CapEachAnswer(bytesPerSecond int64) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			next.ServeHTTP(&cappedWriter{ResponseWriter: w, rate: bytesPerSecond, start: time.Now()}, r)
		})
	}
}

// cappedWriter writes in pieces of 64 KiB, sleeping so that the answer's
// average rate stays under the cap.
type cappedWriter struct {
	http.ResponseWriter
	rate    int64
	start   time.Time
	written int64
}

func (w *cappedWriter) Write(p []byte) (int, error) {
	var n int
	for len(p) > 0 {
		m, err := w.ResponseWriter.Write(p[:min(len(p), 64<<10)])
		n += m
		w.written += int64(m)
		if err != nil {
			return n, err
		}
		p = p[m:]
		due := w.start.Add(time.Duration(float64(w.written) / float64(w.rate) * float64(time.Second)))
		time.Sleep(time.Until(due))
	}
	return n, nil
}
