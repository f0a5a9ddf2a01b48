// Command fetch is a minimal Go client for egressd's integration tests: it
// GETs each URL with the standard library's default proxy handling
// (http.ProxyFromEnvironment: HTTP_PROXY, HTTPS_PROXY, NO_PROXY), as every Go
// program does, and prints each response body to stdout.
//
//	HTTPS_PROXY=http://127.0.0.1:3128 fetch -cacert ca.pem https://upstream.test/
//
// Each request uses its own connection, so each gets its own tunnel; with
// -keepalive, the requests share one kept-alive connection, as a Go
// program's do by default. A response other than 200 is an error: the
// status line goes to stderr and fetch exits 1.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

func main() {
	cacert := flag.String("cacert", "", "PEM file of certificates to trust for HTTPS")
	keepAlive := flag.Bool("keepalive", false, "send the requests over one kept-alive connection")
	flag.Parse()
	if err := run(*cacert, *keepAlive, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "fetch:", err)
		os.Exit(1)
	}
}

func run(cacert string, keepAlive bool, urls []string) error {
	if len(urls) == 0 {
		return errors.New("no URL given")
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.DisableKeepAlives = !keepAlive
	if cacert != "" {
		pem, err := os.ReadFile(cacert)
		if err != nil {
			return err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("no certificate in %s", cacert)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	for _, u := range urls {
		resp, err := client.Get(u)
		if err != nil {
			return err
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return fmt.Errorf("reading %s: %w", u, err)
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s: %s", u, resp.Status, body)
		}
		os.Stdout.Write(body)
	}
	return nil
}
