package nstest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Client is an in-process HTTP client inside H that goes through a proxy.
// Its connections to the proxy are made in H and counted.
type Client struct {
	*http.Client
	Transport *http.Transport
	dials     atomic.Int64
}

// NewClient returns a client in ns that sends every request through the proxy
// at proxyAddr (an IP literal and port, e.g. "127.0.0.1:3128") and trusts
// rootCAs for HTTPS. It keeps connections alive unless keepAlive is false.
// Idle connections are closed in t.Cleanup.
func (ns *NS) NewClient(t testing.TB, proxyAddr string, rootCAs *x509.CertPool, keepAlive bool) *Client {
	c := &Client{}
	c.Transport = &http.Transport{
		Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: proxyAddr}),
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c.dials.Add(1)
			return ns.DialContext(ctx, network, addr)
		},
		TLSClientConfig:   &tls.Config{RootCAs: rootCAs},
		DisableKeepAlives: !keepAlive,
		ForceAttemptHTTP2: false,
	}
	c.Client = &http.Client{Transport: c.Transport, Timeout: Guard}
	t.Cleanup(c.Transport.CloseIdleConnections)
	return c
}

// Dials is the number of connections the client has opened to the proxy.
func (c *Client) Dials() int64 { return c.dials.Load() }

// Fetch GETs url and returns the status code and the body.
func (c *Client) Fetch(ctx context.Context, url string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, string(body), fmt.Errorf("reading body of %s: %w", url, err)
	}
	return resp.StatusCode, string(body), nil
}

// Connect opens a connection to the proxy at proxyAddr from inside ns and
// asks it for a tunnel to target ("host:port") with CONNECT. It returns the
// proxy's response; when that is 200 the returned connection is the tunnel.
// The caller closes the connection in every case.
func (ns *NS) Connect(ctx context.Context, proxyAddr, target string) (net.Conn, *http.Response, error) {
	return ns.ConnectWith(ctx, proxyAddr, target, nil)
}

// ConnectWith is Connect with the request header fields header (a session
// key, say) on the CONNECT request.
func (ns *NS) ConnectWith(ctx context.Context, proxyAddr, target string, header http.Header) (net.Conn, *http.Response, error) {
	conn, err := ns.DialContext(ctx, "tcp", proxyAddr)
	if err != nil {
		return nil, nil, err
	}
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
	}
	req := &http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Opaque: target},
		Host:   target,
		Header: header.Clone(),
	}
	if req.Header == nil {
		req.Header = http.Header{}
	}
	if err := req.Write(conn); err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("writing CONNECT: %w", err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("reading CONNECT response: %w", err)
	}
	if resp.StatusCode == http.StatusOK {
		resp.Body.Close()
	} else {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		resp.Body = io.NopCloser(bytes.NewReader(body))
	}
	conn.SetDeadline(time.Time{})
	return &bufferedConn{Conn: conn, r: br}, resp, nil
}

// bufferedConn reads what the response reader already buffered first.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// CurlStatus runs curl in ns with args and returns what its -w printed: the
// HTTP status (%{http_code}) and, for a tunnel, the proxy's answer to
// CONNECT (%{http_connect}), with curl's error. curl fails when a proxy
// refuses a tunnel; the status says why.
func (ns *NS) CurlStatus(args ...string) (code, connect string, err error) {
	out, err := ns.Output("curl", append([]string{"-q", "-sS", "-o", "/dev/null", "--max-time", "30",
		"-w", "%{http_code} %{http_connect}"}, args...)...)
	code, connect, _ = strings.Cut(strings.TrimSpace(out), " ")
	return code, connect, err
}
