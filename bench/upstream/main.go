// Command upstream is the fast upstream of the comparison harness
// (bench/compare): plain HTTP, HTTPS with a self-signed certificate, and a
// raw TCP port that holds idle tunnels. It runs as its own process in the
// router namespace so that its CPU time is apart from the proxies'.
//
//	GET /small        a fixed 100-byte body
//	GET /big?bytes=N  N bytes, written from one preallocated buffer
//
// The hold port reads and discards until the peer closes.
package main

import (
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/egressd/egressd/test/echo"
)

// smallBody is the body of /small: 100 bytes.
var smallBody = []byte("egressd bench upstream: a small response of exactly one hundred bytes, for requests per second.....\n")

// bigChunk is what /big writes, over and over.
var bigChunk = make([]byte, 256<<10)

// maxBig bounds /big?bytes=N.
const maxBig = 64 << 30

func main() {
	httpAddr := flag.String("http", "[::]:80", "`ADDR` for plain HTTP")
	httpsAddr := flag.String("https", "[::]:443", "`ADDR` for HTTPS")
	holdAddr := flag.String("hold", "[::]:9000", "`ADDR` of the raw TCP port that reads until EOF")
	caOut := flag.String("ca-out", "", "`FILE` to write the certificate (PEM) to, for clients to trust")
	flag.Parse()
	if err := run(*httpAddr, *httpsAddr, *holdAddr, *caOut); err != nil {
		fmt.Fprintln(os.Stderr, "upstream:", err)
		os.Exit(1)
	}
}

func run(httpAddr, httpsAddr, holdAddr, caOut string) error {
	cert, certPEM, err := echo.SelfSigned("2001:db8:ffff::1", "upstream.test")
	if err != nil {
		return err
	}
	if caOut != "" {
		if err := os.WriteFile(caOut, certPEM, 0o644); err != nil {
			return fmt.Errorf("writing certificate: %w", err)
		}
	}
	plain, err := net.Listen("tcp", httpAddr)
	if err != nil {
		return err
	}
	secure, err := net.Listen("tcp", httpsAddr)
	if err != nil {
		return err
	}
	hold, err := net.Listen("tcp", holdAddr)
	if err != nil {
		return err
	}

	mux := http.NewServeMux()
	mux.HandleFunc("GET /small", serveSmall)
	mux.HandleFunc("GET /big", serveBig)
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: time.Minute,
		IdleTimeout:       5 * time.Minute,
		// Clients that hang up mid-handshake are expected.
		ErrorLog: log.New(io.Discard, "", 0),
	}
	errc := make(chan error, 3)
	go func() { errc <- srv.Serve(plain) }()
	go func() {
		errc <- srv.Serve(tls.NewListener(secure, &tls.Config{Certificates: []tls.Certificate{cert}}))
	}()
	go func() { errc <- serveHold(hold) }()
	for _, ln := range []net.Listener{plain, secure, hold} {
		fmt.Fprintf(os.Stderr, "msg=listening addr=%s\n", ln.Addr())
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-sig:
		srv.Close()
		hold.Close()
		return nil
	case err := <-errc:
		return err
	}
}

func serveSmall(w http.ResponseWriter, _ *http.Request) {
	h := w.Header()
	h["Content-Type"] = []string{"text/plain"}
	h["Content-Length"] = []string{strconv.Itoa(len(smallBody))}
	w.Write(smallBody)
}

func serveBig(w http.ResponseWriter, r *http.Request) {
	n, err := strconv.ParseInt(r.URL.Query().Get("bytes"), 10, 64)
	if err != nil || n < 0 || n > maxBig {
		http.Error(w, "bytes: want an integer from 0 to 64 GiB", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	for n > 0 {
		chunk := bigChunk[:min(n, int64(len(bigChunk)))]
		if _, err := w.Write(chunk); err != nil {
			return
		}
		n -= int64(len(chunk))
	}
}

// serveHold accepts connections and reads each until EOF, for idle tunnels.
func serveHold(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		go func() {
			defer c.Close()
			io.Copy(io.Discard, c)
		}()
	}
}
