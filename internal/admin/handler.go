package admin

import (
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/egressd/egressd/proxy/stats"
)

// Config is what the admin handler serves. An endpoint whose field is nil
// is not served (404, or 405 for a path served with another method).
type Config struct {
	// Stats returns the document of GET /stats.
	Stats func() *stats.Stats
	// Addrs returns the document of GET /addrs: the live egress addresses.
	Addrs func() []stats.Addr
	// Metrics serves GET /metrics, the Prometheus exposition
	// (promstats.Handler).
	Metrics http.Handler
	// Reload reloads egressd's configuration for POST /reload. It returns
	// one line saying what changed, or the error that made it refuse the
	// new configuration (the old one stays in force).
	Reload func() (string, error)
}

// NewHandler serves the admin API: GET /stats (JSON), GET /metrics
// (Prometheus), GET /addrs (JSON), POST /reload and the pprof profiles under
// /debug/pprof/, all on a mux of its own. It belongs on a listener of its
// own (see Listen): it shows egress addresses, which the proxy never shows
// its clients, and it can reload the configuration.
func NewHandler(cfg Config) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprint(w, "egressd admin API\n\n"+
			"GET /stats          statistics, JSON\n"+
			"GET /metrics        statistics, Prometheus text format\n"+
			"GET /addrs          live egress addresses, JSON\n"+
			"POST /reload        read the configuration again, as SIGHUP does\n"+
			"GET /debug/pprof/   profiles\n")
	})
	if cfg.Stats != nil {
		mux.HandleFunc("GET /stats", func(w http.ResponseWriter, _ *http.Request) {
			writeJSON(w, http.StatusOK, cfg.Stats())
		})
	}
	if cfg.Addrs != nil {
		mux.HandleFunc("GET /addrs", func(w http.ResponseWriter, _ *http.Request) {
			writeJSON(w, http.StatusOK, cfg.Addrs())
		})
	}
	if cfg.Metrics != nil {
		mux.Handle("GET /metrics", cfg.Metrics)
	}
	if cfg.Reload != nil {
		mux.HandleFunc("POST /reload", func(w http.ResponseWriter, _ *http.Request) {
			msg, err := cfg.Reload()
			if err != nil {
				writeJSON(w, http.StatusUnprocessableEntity, ReloadResult{Error: err.Error()})
				return
			}
			writeJSON(w, http.StatusOK, ReloadResult{OK: true, Message: msg})
		})
	}
	handlePprof(mux)
	return mux
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		http.Error(w, "encoding: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}
