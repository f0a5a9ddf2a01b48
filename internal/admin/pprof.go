// The handlers of this file follow net/http/pprof of Go 1.26, whose
// copyright is the Go Authors' (BSD-style licence, /usr/local/go/LICENSE).
// Importing net/http/pprof registers its handlers on http.DefaultServeMux for
// the whole program; these serve the same pages on the admin API's own mux
// only. Delta profiles (?seconds= on a named profile) use
// github.com/google/pprof/profile, of which Go's internal/profile is a copy.

package admin

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"html"
	"io"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/pprof/profile"
)

// handlePprof registers the profiles under /debug/pprof/ on mux.
func handlePprof(mux *http.ServeMux) {
	mux.HandleFunc("GET /debug/pprof/", pprofIndex)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprofCmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprofCPU)
	mux.HandleFunc("GET /debug/pprof/symbol", pprofSymbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprofTrace)
}

// pprofCmdline answers the command line, arguments separated by NUL bytes.
func pprofCmdline(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprint(w, strings.Join(os.Args, "\x00"))
}

func sleep(r *http.Request, d time.Duration) {
	select {
	case <-time.After(d):
	case <-r.Context().Done():
	}
}

// configureWriteDeadline extends the server's write timeout, if any, by
// the time the profile takes.
func configureWriteDeadline(w http.ResponseWriter, r *http.Request, seconds float64) {
	srv, ok := r.Context().Value(http.ServerContextKey).(*http.Server)
	if ok && srv.WriteTimeout > 0 {
		timeout := srv.WriteTimeout + time.Duration(seconds*float64(time.Second))
		_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(timeout))
	}
}

func pprofError(w http.ResponseWriter, status int, txt string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Go-Pprof", "1")
	w.Header().Del("Content-Disposition")
	w.WriteHeader(status)
	fmt.Fprintln(w, txt)
}

// pprofCPU answers a CPU profile of ?seconds= (30 by default).
func pprofCPU(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Content-Type-Options", "nosniff")
	sec, err := strconv.ParseInt(r.FormValue("seconds"), 10, 64)
	if sec <= 0 || err != nil {
		sec = 30
	}
	configureWriteDeadline(w, r, float64(sec))
	// Set as if StartCPUProfile works, because if it does it writes.
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", `attachment; filename="profile"`)
	if err := pprof.StartCPUProfile(w); err != nil {
		pprofError(w, http.StatusInternalServerError, fmt.Sprintf("Could not enable CPU profiling: %s", err))
		return
	}
	sleep(r, time.Duration(sec)*time.Second)
	pprof.StopCPUProfile()
}

// pprofTrace answers an execution trace of ?seconds= (1 by default).
func pprofTrace(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Content-Type-Options", "nosniff")
	sec, err := strconv.ParseFloat(r.FormValue("seconds"), 64)
	if sec <= 0 || err != nil {
		sec = 1
	}
	configureWriteDeadline(w, r, sec)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", `attachment; filename="trace"`)
	if err := trace.Start(w); err != nil {
		pprofError(w, http.StatusInternalServerError, fmt.Sprintf("Could not enable tracing: %s", err))
		return
	}
	sleep(r, time.Duration(sec*float64(time.Second)))
	trace.Stop()
}

// pprofSymbol maps the program counters of the query or the POST body,
// separated by '+', to function names.
func pprofSymbol(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")

	// The whole body is read before any output.
	var buf bytes.Buffer
	// pprof only cares whether this is 0 (no symbols) or more.
	fmt.Fprintf(&buf, "num_symbols: 1\n")

	var b *bufio.Reader
	if r.Method == http.MethodPost {
		b = bufio.NewReader(r.Body)
	} else {
		b = bufio.NewReader(strings.NewReader(r.URL.RawQuery))
	}
	for {
		word, err := b.ReadSlice('+')
		if err == nil {
			word = word[0 : len(word)-1] // trim +
		}
		if pc, _ := strconv.ParseUint(string(word), 0, 64); pc != 0 {
			if f := runtime.FuncForPC(uintptr(pc)); f != nil {
				fmt.Fprintf(&buf, "%#x %s\n", pc, f.Name())
			}
		}
		// The last symbol has an error because it does not end in +.
		if err != nil {
			if err != io.EOF {
				fmt.Fprintf(&buf, "reading request: %v\n", err)
			}
			break
		}
	}
	_, _ = w.Write(buf.Bytes())
}

// serveProfile answers the runtime/pprof profile name.
func serveProfile(w http.ResponseWriter, r *http.Request, name string) {
	w.Header().Set("X-Content-Type-Options", "nosniff")
	p := pprof.Lookup(name)
	if p == nil {
		pprofError(w, http.StatusNotFound, "Unknown profile")
		return
	}
	if sec := r.FormValue("seconds"); sec != "" {
		serveDeltaProfile(w, r, p, sec)
		return
	}
	gc, _ := strconv.Atoi(r.FormValue("gc"))
	if name == "heap" && gc > 0 {
		runtime.GC()
	}
	debug, _ := strconv.Atoi(r.FormValue("debug"))
	if debug != 0 {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	} else {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Disposition", fmt.Sprintf(`attachment; filename="%s"`, name))
	}
	_ = p.WriteTo(w, debug)
}

// profileSupportsDelta are the profiles that take ?seconds=.
var profileSupportsDelta = map[string]bool{
	"allocs":        true,
	"block":         true,
	"goroutineleak": true,
	"goroutine":     true,
	"heap":          true,
	"mutex":         true,
	"threadcreate":  true,
}

// serveDeltaProfile answers what p counted during the next secStr seconds.
func serveDeltaProfile(w http.ResponseWriter, r *http.Request, p *pprof.Profile, secStr string) {
	sec, err := strconv.ParseInt(secStr, 10, 64)
	if err != nil || sec <= 0 {
		pprofError(w, http.StatusBadRequest, `invalid value for "seconds" - must be a positive integer`)
		return
	}
	if !profileSupportsDelta[p.Name()] {
		pprofError(w, http.StatusBadRequest, `"seconds" parameter is not supported for this profile type`)
		return
	}
	configureWriteDeadline(w, r, float64(sec))
	if debug, _ := strconv.Atoi(r.FormValue("debug")); debug != 0 {
		pprofError(w, http.StatusBadRequest, "seconds and debug params are incompatible")
		return
	}
	p0, err := collectProfile(p)
	if err != nil {
		pprofError(w, http.StatusInternalServerError, "failed to collect profile")
		return
	}

	t := time.NewTimer(time.Duration(sec) * time.Second)
	defer t.Stop()
	select {
	case <-r.Context().Done():
		err := r.Context().Err()
		if errors.Is(err, context.DeadlineExceeded) {
			pprofError(w, http.StatusRequestTimeout, err.Error())
		} else {
			pprofError(w, http.StatusInternalServerError, err.Error())
		}
		return
	case <-t.C:
	}

	p1, err := collectProfile(p)
	if err != nil {
		pprofError(w, http.StatusInternalServerError, "failed to collect profile")
		return
	}
	ts := p1.TimeNanos
	dur := p1.TimeNanos - p0.TimeNanos
	p0.Scale(-1)
	p1, err = profile.Merge([]*profile.Profile{p0, p1})
	if err != nil {
		pprofError(w, http.StatusInternalServerError, "failed to compute delta")
		return
	}
	p1.TimeNanos = ts // Merge's choice of TimeNanos is not ours
	p1.DurationNanos = dur

	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", fmt.Sprintf(`attachment; filename="%s-delta"`, p.Name()))
	_ = p1.Write(w)
}

func collectProfile(p *pprof.Profile) (*profile.Profile, error) {
	var buf bytes.Buffer
	if err := p.WriteTo(&buf, 0); err != nil {
		return nil, err
	}
	ts := time.Now().UnixNano()
	p0, err := profile.Parse(&buf)
	if err != nil {
		return nil, err
	}
	p0.TimeNanos = ts
	return p0, nil
}

var profileDescriptions = map[string]string{
	"allocs":        "A sampling of all past memory allocations",
	"block":         "Stack traces that led to blocking on synchronization primitives",
	"cmdline":       "The command line invocation of the current program",
	"goroutine":     "Stack traces of all current goroutines. Use debug=2 as a query parameter to export in the same format as an unrecovered panic.",
	"goroutineleak": "Stack traces of all leaked goroutines. Use debug=2 as a query parameter to export in the same format as an unrecovered panic.",
	"heap":          "A sampling of memory allocations of live objects. You can specify the gc GET parameter to run GC before taking the heap sample.",
	"mutex":         "Stack traces of holders of contended mutexes",
	"profile":       "CPU profile. You can specify the duration in the seconds GET parameter. After you get the profile file, use the go tool pprof command to investigate the profile.",
	"symbol":        "Maps given program counters to function names. Counters can be specified in a GET raw query or POST body, multiple counters are separated by '+'.",
	"threadcreate":  "Stack traces that led to the creation of new OS threads",
	"trace":         "A trace of execution of the current program. You can specify the duration in the seconds GET parameter. After you get the trace file, use the go tool trace command to investigate the trace.",
}

type profileEntry struct {
	Name  string
	Desc  string
	Count int
}

// pprofIndex answers the profile named by the path below /debug/pprof/,
// or for /debug/pprof/ itself an HTML page listing the profiles.
func pprofIndex(w http.ResponseWriter, r *http.Request) {
	if name := strings.TrimPrefix(r.URL.Path, "/debug/pprof/"); name != "" {
		serveProfile(w, r, name)
		return
	}
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Content-Type", "text/html; charset=utf-8")

	var profiles []profileEntry
	for _, p := range pprof.Profiles() {
		profiles = append(profiles, profileEntry{Name: p.Name(), Desc: profileDescriptions[p.Name()], Count: p.Count()})
	}
	for _, p := range []string{"cmdline", "profile", "symbol", "trace"} {
		profiles = append(profiles, profileEntry{Name: p, Desc: profileDescriptions[p]})
	}
	slices.SortFunc(profiles, func(a, b profileEntry) int { return strings.Compare(a.Name, b.Name) })
	_, _ = w.Write(indexPage(profiles))
}

func indexPage(profiles []profileEntry) []byte {
	var b bytes.Buffer
	b.WriteString(`<html>
<head>
<title>/debug/pprof/</title>
<style>
.profile-name{
	display:inline-block;
	width:6rem;
}
</style>
</head>
<body>
/debug/pprof/
<br>
<p>Set debug=1 as a query parameter to export in legacy text format</p>
<br>
Types of profiles available:
<table>
<thead><td>Count</td><td>Profile</td></thead>
`)
	for _, p := range profiles {
		link := &url.URL{Path: p.Name, RawQuery: "debug=1"}
		fmt.Fprintf(&b, "<tr><td>%d</td><td><a href='%s'>%s</a></td></tr>\n", p.Count, link, html.EscapeString(p.Name))
	}
	b.WriteString(`</table>
<a href="goroutine?debug=2">full goroutine stack dump</a>
<br>
<p>
Profile Descriptions:
<ul>
`)
	for _, p := range profiles {
		fmt.Fprintf(&b, "<li><div class=profile-name>%s: </div> %s</li>\n", html.EscapeString(p.Name), html.EscapeString(p.Desc))
	}
	b.WriteString(`</ul>
</p>
</body>
</html>`)
	return b.Bytes()
}
