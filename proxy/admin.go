package proxy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/pprof"

	"github.com/egressd/egressd/proxy/stats"
)

// StatsSource is what the admin API reports on: egressd assembles it from
// the proxy's upstream statistics and the address pool.
type StatsSource interface {
	Stats() *stats.Stats
	Addrs() []stats.Addr
}

// ReloadFunc reloads egressd's configuration. It returns one line saying
// what changed, or the error that made it refuse the new configuration (the
// old one stays in force).
type ReloadFunc func() (string, error)

// ReloadResult is the JSON answer of POST /reload: 200 with OK set and
// Message saying what changed, or 422 with Error saying why the new
// configuration was refused.
type ReloadResult struct {
	OK      bool   `json:"ok"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

// AdminHandler serves the admin API: GET /stats (JSON), GET /metrics
// (Prometheus text format), GET /addrs (the live egress addresses, JSON),
// POST /reload (when reload is not nil) and the pprof profiles under
// /debug/pprof/. It belongs on a listener of its own, a unix socket by
// default: it shows egress addresses, which the proxy never shows its
// clients, and it can reload the configuration.
func AdminHandler(src StatsSource, reload ReloadFunc) http.Handler {
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
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, src.Stats())
	})
	mux.HandleFunc("GET /addrs", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, src.Addrs())
	})
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, _ *http.Request) {
		var buf bytes.Buffer
		if err := stats.WritePrometheus(&buf, src.Stats()); err != nil {
			http.Error(w, "writing metrics: "+err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		_, _ = w.Write(buf.Bytes())
	})
	if reload != nil {
		mux.HandleFunc("POST /reload", func(w http.ResponseWriter, _ *http.Request) {
			msg, err := reload()
			if err != nil {
				writeJSONStatus(w, http.StatusUnprocessableEntity, ReloadResult{Error: err.Error()})
				return
			}
			writeJSON(w, ReloadResult{OK: true, Message: msg})
		})
	}
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	return mux
}

func writeJSON(w http.ResponseWriter, v any) { writeJSONStatus(w, http.StatusOK, v) }

func writeJSONStatus(w http.ResponseWriter, status int, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		http.Error(w, "encoding: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}
