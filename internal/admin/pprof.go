package admin

import (
	"net/http"
	"net/http/pprof"
)

// handlePprof serves Go's profiles under /debug/pprof/ on mux, the admin
// API's own. net/http/pprof's init also registers them on
// http.DefaultServeMux, which no listener of egressd serves; only the
// daemon and egressctl import this package, and neither serves that mux.
func handlePprof(mux *http.ServeMux) {
	mux.HandleFunc("GET /debug/pprof/", pprof.Index) // and every named profile under it
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
}
