package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"

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
	// Rotate gives the session of key a new address for POST
	// /sessions/KEY/rotate. It returns whether the session held an
	// address to give up, and which one it was (the zero Addr if unknown),
	// or an error: ErrNoSession and ErrNoSessions (wrapped or not) are
	// answered 404 and 409 with the handler's own line, any other 500 with
	// its text.
	Rotate func(ctx context.Context, key string) (rotated bool, old netip.Addr, err error)
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
			"POST /sessions/KEY/rotate  give session KEY a new egress address (-rotate session)\n"+
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
	if cfg.Rotate != nil {
		mux.HandleFunc("POST /sessions/{key}/rotate", func(w http.ResponseWriter, r *http.Request) {
			writeRotate(w, r, cfg.Rotate)
		})
	}
	handlePprof(mux)
	return mux
}

// writeRotate answers POST /sessions/KEY/rotate.
func writeRotate(w http.ResponseWriter, r *http.Request, rotate func(context.Context, string) (bool, netip.Addr, error)) {
	key := r.PathValue("key")
	res := RotateResult{Session: key}
	if key == "" {
		res.Error = "empty session key: POST /sessions/KEY/rotate"
		writeJSON(w, http.StatusBadRequest, res)
		return
	}
	rotated, old, err := rotate(r.Context(), key)
	switch {
	case errors.Is(err, ErrNoSession):
		res.Error = fmt.Sprintf("no session %q is open: no request had that key, or it idled out (-session-idle)", key)
		writeJSON(w, http.StatusNotFound, res)
		return
	case errors.Is(err, ErrNoSessions):
		res.Error = "egressd does not run -rotate session: it has no sessions to rotate"
		writeJSON(w, http.StatusConflict, res)
		return
	case err != nil:
		res.Error = err.Error()
		writeJSON(w, http.StatusInternalServerError, res)
		return
	}
	res.OK, res.Rotated = true, rotated
	switch {
	case !rotated:
		res.Message = fmt.Sprintf("session %q holds no address yet: its first connection leaves from a fresh one", key)
	case old.IsValid():
		res.Old = old.String()
		res.Message = fmt.Sprintf("session %q gave up %s: its next connection leaves from a new address; connections open from the old one keep going", key, old)
	default:
		res.Message = fmt.Sprintf("session %q gave up its address: its next connection leaves from a new one; connections open from the old one keep going", key)
	}
	writeJSON(w, http.StatusOK, res)
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
