package nstest

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/egressd/egressd/test/echo"
)

// Upstream is the pair of servers behind UpstreamAddr: plain HTTP on port 80
// and HTTPS on port 443, both answering with the peer address (echo.Handler)
// and recording it. Plain HTTP also listens on RouterAddr4, port 80, for
// V4OnlyName. They run in the test process; their sockets live in R.
type Upstream struct {
	echo.Recorder

	// HTTPURL and HTTPSURL are http://upstream.test/ and https://upstream.test/.
	HTTPURL, HTTPSURL string
	// RootCAs trusts the HTTPS server's self-signed certificate; CAFile is
	// the same certificate as a PEM file, for curl --cacert and wget
	// --ca-certificate.
	RootCAs *x509.CertPool
	CAFile  string

	mux *http.ServeMux
}

// StartUpstream starts the upstream servers and stops them in t.Cleanup
// (before the namespaces go: cleanups run last-in first-out).
func (tp *Topo) StartUpstream(t testing.TB) *Upstream {
	t.Helper()
	cert, certPEM, err := echo.SelfSigned(UpstreamName, UpstreamAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	u := &Upstream{
		HTTPURL:  "http://" + UpstreamName + "/",
		HTTPSURL: "https://" + UpstreamName + "/",
		RootCAs:  x509.NewCertPool(),
		CAFile:   filepath.Join(t.TempDir(), "upstream-ca.pem"),
		mux:      http.NewServeMux(),
	}
	u.RootCAs.AppendCertsFromPEM(certPEM)
	if err := os.WriteFile(u.CAFile, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	u.mux.Handle("/", echo.Handler)

	var listeners []net.Listener
	for _, addr := range []string{
		net.JoinHostPort(UpstreamAddr.String(), "80"),
		net.JoinHostPort(UpstreamAddr.String(), "443"),
		net.JoinHostPort(RouterAddr4.String(), "80"),
	} {
		ln, err := tp.Router.Listen("tcp", addr)
		if err != nil {
			for _, l := range listeners {
				l.Close()
			}
			t.Fatalf("listening in %s: %v", tp.Router.Name, err)
		}
		listeners = append(listeners, ln)
	}
	listeners[1] = tls.NewListener(listeners[1], &tls.Config{Certificates: []tls.Certificate{cert}})

	srv := &http.Server{
		Handler:           u.Wrap(u.mux),
		ReadHeaderTimeout: Guard,
		// Clients that drop a connection mid-handshake are expected here.
		ErrorLog: log.New(io.Discard, "", 0),
	}
	done := make(chan struct{}, len(listeners))
	for _, ln := range listeners {
		go func() {
			defer func() { done <- struct{}{} }()
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				t.Errorf("upstream server on %s: %v", ln.Addr(), err)
			}
		}()
	}
	t.Cleanup(func() {
		srv.Close()
		for range listeners {
			select {
			case <-done:
			case <-time.After(Guard):
				t.Errorf("upstream server did not stop")
				return
			}
		}
	})
	return u
}

// Handle serves pattern (http.ServeMux syntax) with h instead of the echo
// handler. Peers are recorded all the same.
func (u *Upstream) Handle(pattern string, h http.Handler) {
	u.mux.Handle(pattern, h)
}
