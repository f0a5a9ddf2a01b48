// Command load is the one load generator of the comparison harness
// (bench/compare). It drives every system, a proxy or none, the same way and
// prints its result as JSON on standard output.
//
// Modes:
//
//	small     -c workers, each with one keep-alive connection, GET /small in a loop
//	tunnel    per request a new connection, CONNECT to port 443, TLS, GET /small, close
//	download  one CONNECT tunnel to port 80, GET /big?bytes=N
//	idle      -n CONNECT tunnels to the hold port, held until SIGTERM or SIGINT
//	rate      open loop: -rate new connections a second, each with one plain GET
//
// With -proxy "" every mode connects to the upstream directly. Targets are
// literal IPv6 addresses so that every system leaves over IPv6.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Result is what a run prints. Latencies are in milliseconds.
type Result struct {
	Mode     string  `json:"mode"`
	Requests int64   `json:"requests"`
	Errors   int64   `json:"errors"`
	Seconds  float64 `json:"seconds"`
	PerSec   float64 `json:"per_sec"`
	P50ms    float64 `json:"p50_ms,omitempty"`
	P99ms    float64 `json:"p99_ms,omitempty"`
	Bytes    int64   `json:"bytes,omitempty"`
	MBps     float64 `json:"mb_per_s,omitempty"`
	Opened   int64   `json:"opened,omitempty"`
	// CPUms is this process's own user plus system CPU time.
	CPUms float64 `json:"cpu_ms"`
	// ErrorSamples are the first few distinct error texts.
	ErrorSamples []string `json:"error_samples,omitempty"`
}

type config struct {
	mode     string
	proxy    string // host:port, or "" for direct
	target   string // the upstream's IP literal
	workers  int
	duration time.Duration
	count    int64
	session  bool
	caFile   string
	bytes    int64
	rate     float64
	holdPort int
	timeout  time.Duration
	// maxErrors ends idle's opening early: a proxy at its file limit
	// would make every remaining tunnel wait for its timeout.
	maxErrors int64
}

func main() {
	var cfg config
	var proxyURL string
	flag.StringVar(&cfg.mode, "mode", "small", "`MODE`: small, tunnel, download, idle or rate")
	flag.StringVar(&proxyURL, "proxy", "", "proxy `URL` (http://host:port); empty connects directly")
	flag.StringVar(&cfg.target, "target", "2001:db8:ffff::1", "upstream `IP`")
	flag.IntVar(&cfg.workers, "c", 16, "`N` concurrent workers (idle: tunnels opened at once)")
	flag.DurationVar(&cfg.duration, "d", 10*time.Second, "`DURATION` of the run (small, tunnel, rate) when -n is 0")
	flag.Int64Var(&cfg.count, "n", 0, "`N` requests (small, tunnel) or tunnels (idle); 0 runs for -d")
	flag.BoolVar(&cfg.session, "session", false, "send a session key per worker as X-Egress-Session")
	flag.StringVar(&cfg.caFile, "ca", "", "PEM `FILE` of the upstream's certificate (tunnel)")
	flag.Int64Var(&cfg.bytes, "bytes", 1<<30, "`N` bytes to download")
	flag.Float64Var(&cfg.rate, "rate", 100, "new requests per second (rate)")
	flag.IntVar(&cfg.holdPort, "hold-port", 9000, "upstream `PORT` that holds idle tunnels")
	flag.DurationVar(&cfg.timeout, "timeout", 10*time.Second, "`DURATION` one request or tunnel may take")
	flag.Int64Var(&cfg.maxErrors, "max-errors", 0, "idle: stop opening tunnels after `N` errors (a proxy out of file descriptors); 0 never stops")
	flag.Parse()
	if proxyURL != "" {
		u, err := url.Parse(proxyURL)
		if err != nil || u.Scheme != "http" || u.Port() == "" {
			fmt.Fprintf(os.Stderr, "load: -proxy %q: want http://host:port\n", proxyURL)
			os.Exit(2)
		}
		cfg.proxy = u.Host
	}
	res, err := run(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "load:", err)
		os.Exit(1)
	}
	if res != nil {
		printJSON(res)
	}
}

func printJSON(v any) {
	b, _ := json.Marshal(v)
	os.Stdout.Write(append(b, '\n'))
}

func run(cfg config) (*Result, error) {
	switch cfg.mode {
	case "small":
		return runSmall(cfg), nil
	case "tunnel":
		pool, err := loadCA(cfg.caFile)
		if err != nil {
			return nil, err
		}
		return runTunnel(cfg, pool), nil
	case "download":
		return runDownload(cfg)
	case "idle":
		return runIdle(cfg), nil
	case "rate":
		return runRate(cfg), nil
	}
	return nil, fmt.Errorf("-mode %q: want small, tunnel, download, idle or rate", cfg.mode)
}

func loadCA(file string) (*x509.CertPool, error) {
	if file == "" {
		return nil, errors.New("-ca: needed for -mode tunnel")
	}
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("-ca %s: no certificate in it", file)
	}
	return pool, nil
}

// recorder gathers one run's outcomes from many workers.
type recorder struct {
	mu        sync.Mutex
	latencies []time.Duration
	errors    int64
	samples   []string
}

func (r *recorder) ok(d []time.Duration) {
	r.mu.Lock()
	r.latencies = append(r.latencies, d...)
	r.mu.Unlock()
}

// connPair is the "tcp 127.0.0.1:42360->127.0.0.1:3102" of a net.OpError,
// left out of error samples so that one kind of error is one sample.
var connPair = regexp.MustCompile(`tcp[46]? \S+->\S+?: `)

func (r *recorder) fail(err error) {
	msg := connPair.ReplaceAllString(err.Error(), "tcp: ")
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errors++
	if len(r.samples) < 5 && !slices.Contains(r.samples, msg) {
		r.samples = append(r.samples, msg)
	}
}

func (r *recorder) errorCount() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.errors
}

func (r *recorder) result(mode string, elapsed time.Duration) *Result {
	r.mu.Lock()
	defer r.mu.Unlock()
	slices.Sort(r.latencies)
	res := &Result{
		Mode:         mode,
		Requests:     int64(len(r.latencies)),
		Errors:       r.errors,
		Seconds:      elapsed.Seconds(),
		PerSec:       float64(len(r.latencies)) / elapsed.Seconds(),
		P50ms:        quantile(r.latencies, 0.50),
		P99ms:        quantile(r.latencies, 0.99),
		ErrorSamples: r.samples,
	}
	res.CPUms = selfCPU()
	return res
}

// quantile of sorted durations, in milliseconds.
func quantile(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := min(int(q*float64(len(sorted))), len(sorted)-1)
	return float64(sorted[i]) / float64(time.Millisecond)
}

func selfCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e6
}

// budget hands out the run's requests: a count, or until a deadline.
type budget struct {
	count    int64 // 0: by deadline
	taken    atomic.Int64
	deadline time.Time
}

func newBudget(cfg config) *budget {
	return &budget{count: cfg.count, deadline: time.Now().Add(cfg.duration)}
}

func (b *budget) take() bool {
	if b.count > 0 {
		return b.taken.Add(1) <= b.count
	}
	return time.Now().Before(b.deadline)
}

// upstream is host:port of the upstream's port.
func (cfg config) upstream(port int) string {
	return net.JoinHostPort(cfg.target, strconv.Itoa(port))
}

// dialFirstHop connects to the proxy, or to the upstream's port when direct.
func (cfg config) dialFirstHop(ctx context.Context, port int) (net.Conn, error) {
	addr := cfg.proxy
	if addr == "" {
		addr = cfg.upstream(port)
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", addr)
}

// request is the raw GET of path: absolute-form through a proxy,
// origin-form when direct.
func (cfg config) request(path, session string, keepAlive bool) []byte {
	host := "[" + cfg.target + "]"
	target := path
	if cfg.proxy != "" {
		target = "http://" + host + path
	}
	s := "GET " + target + " HTTP/1.1\r\nHost: " + host + "\r\nUser-Agent: egressd-bench\r\n"
	if session != "" {
		s += "X-Egress-Session: " + session + "\r\n"
	}
	if !keepAlive {
		s += "Connection: close\r\n"
	}
	return []byte(s + "\r\n")
}

func (cfg config) sessionKey(worker int) string {
	if !cfg.session {
		return ""
	}
	return "w" + strconv.Itoa(worker)
}

// tunnelConn opens a tunnel to the upstream's port through the proxy with
// CONNECT, or connects to the port directly. Bytes the proxy sent after its
// response are kept in the returned reader.
func (cfg config) tunnelConn(ctx context.Context, port int, session string) (net.Conn, *bufio.Reader, error) {
	c, err := cfg.dialFirstHop(ctx, port)
	if err != nil {
		return nil, nil, err
	}
	br := bufio.NewReader(c)
	if cfg.proxy == "" {
		return c, br, nil
	}
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
	target := cfg.upstream(port)
	s := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n"
	if session != "" {
		s += "X-Egress-Session: " + session + "\r\n"
	}
	if _, err := io.WriteString(c, s+"\r\n"); err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("writing CONNECT: %w", err)
	}
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("reading CONNECT response: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		c.Close()
		return nil, nil, fmt.Errorf("CONNECT: %s", resp.Status)
	}
	c.SetDeadline(time.Time{})
	return c, br, nil
}

// get sends req on c and reads the response, draining the body into buf.
// It returns the body's length, and whether the server closes the
// connection after the response (a proxy without keep-alive does).
func get(c io.Writer, br *bufio.Reader, req []byte, buf []byte) (n int64, closing bool, err error) {
	if _, err := c.Write(req); err != nil {
		return 0, true, fmt.Errorf("writing request: %w", err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return 0, true, fmt.Errorf("reading response: %w", err)
	}
	defer resp.Body.Close()
	// Not io.Copy: io.Discard's ReadFrom would read in 8 KiB pieces.
	n, err = io.CopyBuffer(struct{ io.Writer }{io.Discard}, resp.Body, buf)
	if err != nil {
		return n, true, fmt.Errorf("reading body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return n, resp.Close, fmt.Errorf("status %s", resp.Status)
	}
	return n, resp.Close, nil
}

func runSmall(cfg config) *Result {
	var rec recorder
	b := newBudget(cfg)
	start := time.Now()
	var wg sync.WaitGroup
	for w := range cfg.workers {
		wg.Go(func() {
			req := cfg.request("/small", cfg.sessionKey(w), true)
			buf := make([]byte, 4096)
			var lat []time.Duration
			var c net.Conn
			var br *bufio.Reader
			reused := false
			for b.take() {
				t0 := time.Now()
				// A connection the server closed while it was idle is
				// retried once on a new one, as net/http's client does.
				for attempt := 0; attempt < 2; attempt++ {
					if c == nil {
						ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout)
						conn, err := cfg.dialFirstHop(ctx, 80)
						cancel()
						if err != nil {
							rec.fail(err)
							break
						}
						c, br, reused = conn, bufio.NewReader(conn), false
					}
					c.SetDeadline(t0.Add(cfg.timeout))
					_, closing, err := get(c, br, req, buf)
					retry := err != nil && reused && errors.Is(err, io.ErrUnexpectedEOF) && attempt == 0
					if err == nil {
						lat = append(lat, time.Since(t0))
					} else if !retry {
						rec.fail(err)
					}
					reused = true
					if closing {
						c.Close()
						c = nil
					}
					if !retry {
						break
					}
				}
			}
			if c != nil {
				c.Close()
			}
			rec.ok(lat)
		})
	}
	wg.Wait()
	return rec.result(cfg.mode, time.Since(start))
}

func runTunnel(cfg config, pool *x509.CertPool) *Result {
	var rec recorder
	b := newBudget(cfg)
	tlsCfg := &tls.Config{RootCAs: pool, ServerName: cfg.target}
	start := time.Now()
	var wg sync.WaitGroup
	for w := range cfg.workers {
		wg.Go(func() {
			session := cfg.sessionKey(w)
			req := []byte("GET /small HTTP/1.1\r\nHost: [" + cfg.target + "]\r\nConnection: close\r\n\r\n")
			buf := make([]byte, 4096)
			var lat []time.Duration
			for b.take() {
				t0 := time.Now()
				if err := tunnelOnce(cfg, tlsCfg, session, req, buf); err != nil {
					rec.fail(err)
					continue
				}
				lat = append(lat, time.Since(t0))
			}
			rec.ok(lat)
		})
	}
	wg.Wait()
	return rec.result(cfg.mode, time.Since(start))
}

func tunnelOnce(cfg config, tlsCfg *tls.Config, session string, req, buf []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout)
	defer cancel()
	c, br, err := cfg.tunnelConn(ctx, 443, session)
	if err != nil {
		return err
	}
	defer c.Close()
	if br.Buffered() > 0 {
		return errors.New("proxy sent bytes before the TLS handshake")
	}
	d, _ := ctx.Deadline()
	c.SetDeadline(d)
	tc := tls.Client(c, tlsCfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	_, _, err = get(tc, bufio.NewReader(tc), req, buf)
	return err
}

func runDownload(cfg config) (*Result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout)
	defer cancel()
	c, br, err := cfg.tunnelConn(ctx, 80, "")
	if err != nil {
		return nil, err
	}
	defer c.Close()
	req := []byte("GET /big?bytes=" + strconv.FormatInt(cfg.bytes, 10) + " HTTP/1.1\r\nHost: [" + cfg.target + "]\r\n\r\n")
	start := time.Now()
	n, _, err := get(c, br, req, make([]byte, 256<<10))
	elapsed := time.Since(start)
	if err != nil {
		return nil, err
	}
	if n != cfg.bytes {
		return nil, fmt.Errorf("downloaded %d bytes, want %d", n, cfg.bytes)
	}
	return &Result{
		Mode:     cfg.mode,
		Requests: 1,
		Seconds:  elapsed.Seconds(),
		PerSec:   1 / elapsed.Seconds(),
		Bytes:    n,
		MBps:     float64(n) / 1e6 / elapsed.Seconds(),
		CPUms:    selfCPU(),
	}, nil
}

// runIdle opens cfg.count tunnels to the hold port, cfg.workers at a time,
// prints one JSON line when all are open, holds them until SIGTERM or
// SIGINT, then closes them and returns nil (nothing more to print).
func runIdle(cfg config) *Result {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	var rec recorder
	var mu sync.Mutex
	var conns []net.Conn
	sem := make(chan struct{}, max(cfg.workers, 1))
	start := time.Now()
	var wg sync.WaitGroup
	for i := range cfg.count {
		sem <- struct{}{}
		if cfg.maxErrors > 0 && rec.errorCount() >= cfg.maxErrors {
			<-sem
			break
		}
		wg.Go(func() {
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout)
			defer cancel()
			c, _, err := cfg.tunnelConn(ctx, cfg.holdPort, cfg.sessionKey(int(i)%cfg.workers))
			if err != nil {
				rec.fail(err)
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		})
	}
	wg.Wait()
	res := rec.result(cfg.mode, time.Since(start))
	res.Opened = int64(len(conns))
	printJSON(res)
	<-stop
	for _, c := range conns {
		c.Close()
	}
	return nil
}

// maxInFlight bounds the open loop of runRate: a request that would exceed
// it is counted as an error instead of started.
const maxInFlight = 2000

func runRate(cfg config) *Result {
	var rec recorder
	req := cfg.request("/small", "", false)
	interval := time.Duration(float64(time.Second) / cfg.rate)
	total := int64(cfg.duration / interval)
	if cfg.count > 0 {
		total = cfg.count
	}
	var inFlight atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for i := range total {
		time.Sleep(time.Until(start.Add(time.Duration(i) * interval)))
		if inFlight.Add(1) > maxInFlight {
			inFlight.Add(-1)
			rec.fail(errors.New("too many requests in flight"))
			continue
		}
		wg.Go(func() {
			defer inFlight.Add(-1)
			t0 := time.Now()
			if err := rateOnce(cfg, req); err != nil {
				rec.fail(err)
				return
			}
			rec.ok([]time.Duration{time.Since(t0)})
		})
	}
	wg.Wait()
	return rec.result(cfg.mode, time.Since(start))
}

func rateOnce(cfg config, req []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout)
	defer cancel()
	c, err := cfg.dialFirstHop(ctx, 80)
	if err != nil {
		return err
	}
	defer c.Close()
	d, _ := ctx.Deadline()
	c.SetDeadline(d)
	_, _, err = get(c, bufio.NewReader(c), req, make([]byte, 4096))
	return err
}
