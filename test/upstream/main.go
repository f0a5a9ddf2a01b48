// Command echo-upstream is the upstream of egressd's demo: an HTTP (and
// optionally HTTPS) server that answers every request with the address the
// request came from, so a person can watch egressd rotate its source
// addresses.
//
//	echo-upstream -listen '[2001:db8:ffff::1]:80' -tls-listen '[2001:db8:ffff::1]:443' -cert-out /tmp/ca.pem
//
// The TLS certificate is self-signed and made at start for -tls-name; -cert-out
// writes it for clients to trust (curl --cacert). It serves until SIGTERM or
// SIGINT.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/egressd/egressd/test/echo"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

func main() {
	var plain, withTLS, names listFlag
	flag.Var(&plain, "listen", "address to serve plain HTTP on (repeatable)")
	flag.Var(&withTLS, "tls-listen", "address to serve HTTPS on (repeatable)")
	flag.Var(&names, "tls-name", "DNS name or IP the certificate is valid for (repeatable, default upstream.test)")
	certOut := flag.String("cert-out", "", "write the self-signed certificate (PEM) to this file")
	verbose := flag.Bool("v", false, "log every request on stderr")
	flag.Parse()
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, nil)))

	if err := run(plain, withTLS, names, *certOut, *verbose); err != nil {
		fmt.Fprintln(os.Stderr, "echo-upstream:", err)
		os.Exit(1)
	}
}

func run(plain, withTLS, names []string, certOut string, verbose bool) error {
	if len(plain)+len(withTLS) == 0 {
		return errors.New("nothing to serve: give -listen or -tls-listen")
	}
	handler := echo.Handler
	if verbose {
		handler = logRequests(handler)
	}
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}

	var tlsConf *tls.Config
	if len(withTLS) > 0 {
		if len(names) == 0 {
			names = []string{"upstream.test"}
		}
		cert, certPEM, err := echo.SelfSigned(names...)
		if err != nil {
			return err
		}
		if certOut != "" {
			if err := os.WriteFile(certOut, certPEM, 0o644); err != nil {
				return fmt.Errorf("writing certificate: %w", err)
			}
		}
		tlsConf = &tls.Config{Certificates: []tls.Certificate{cert}}
	}

	var lns []net.Listener
	for _, addr := range plain {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return err
		}
		lns = append(lns, ln)
	}
	for _, addr := range withTLS {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return err
		}
		lns = append(lns, tls.NewListener(ln, tlsConf))
	}

	errc := make(chan error, len(lns))
	for _, ln := range lns {
		slog.Info("listening", "addr", ln.Addr().String())
		go func() { errc <- srv.Serve(ln) }()
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	select {
	case <-ctx.Done():
	case err := <-errc:
		return err
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(shutdownCtx)
}

func logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		peer, _ := echo.PeerAddr(r)
		slog.Info("request", "peer", peer, "method", r.Method, "host", r.Host, "path", r.URL.Path)
		next.ServeHTTP(w, r)
	})
}
