package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"
)

const (
	// requestTimeout bounds one request to the admin API.
	requestTimeout = 10 * time.Second
	// maxBody bounds what egressctl reads of an answer.
	maxBody = 64 << 20
)

// adminClient talks HTTP to egressd's admin API over a unix socket or TCP.
type adminClient struct {
	admin string // as the user gave it, for messages
	base  string // URL prefix of the requests
	hc    *http.Client
}

// newAdminClient returns a client for admin, which is a unix socket path, or
// host:port when it contains ':' and does not start with '/' or '.'.
func newAdminClient(admin string) (*adminClient, error) {
	if admin == "" {
		return nil, usageError{"", "-admin is empty: give egressd's admin socket path or host:port"}
	}
	// Never through a proxy: the environment of a client of egressd
	// typically points HTTP(S)_PROXY at egressd itself.
	tr := &http.Transport{
		Proxy:               nil,
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     time.Minute,
	}
	c := &adminClient{admin: admin, hc: &http.Client{Transport: tr, Timeout: requestTimeout}}
	if isTCP(admin) {
		c.base = "http://" + strings.TrimSuffix(strings.TrimPrefix(admin, "http://"), "/")
		return c, nil
	}
	c.base = "http://egressd" // the host is not used, only the socket
	tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", admin)
	}
	return c, nil
}

func isTCP(admin string) bool {
	return strings.Contains(admin, ":") && !strings.HasPrefix(admin, "/") && !strings.HasPrefix(admin, ".")
}

// get fetches path and returns the body of a 200 answer.
func (c *adminClient) get(ctx context.Context, path string) ([]byte, error) {
	_, body, err := c.do(ctx, http.MethodGet, path)
	return body, err
}

// do sends a request with method to path and returns the status and body of
// an answer whose status is 200 or one of also; any other is an error.
func (c *adminClient) do(ctx context.Context, method, path string, also ...int) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, nil)
	if err != nil {
		return 0, nil, fmt.Errorf("-admin %s: %w", c.admin, err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return 0, nil, ctx.Err()
		}
		if ue := (*url.Error)(nil); errors.As(err, &ue) {
			err = ue.Err // its text repeats the made-up URL
		}
		if oe := (*net.OpError)(nil); errors.As(err, &oe) && oe.Op == "dial" {
			return 0, nil, &unreachableError{admin: c.admin, err: oe}
		}
		return 0, nil, fmt.Errorf("%s %s to egressd at %s: %w", method, path, c.admin, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK && !slices.Contains(also, resp.StatusCode) {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		msg := strings.Join(strings.Fields(string(b)), " ")
		if msg != "" {
			msg = ": " + msg
		}
		return 0, nil, fmt.Errorf("egressd at %s answered %s %s with %s%s", c.admin, method, path, resp.Status, msg)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody+1))
	if err != nil {
		return 0, nil, fmt.Errorf("reading %s %s from egressd at %s: %w", method, path, c.admin, err)
	}
	if len(body) > maxBody {
		return 0, nil, fmt.Errorf("%s %s from egressd at %s: answer larger than %d MiB", method, path, c.admin, maxBody>>20)
	}
	return resp.StatusCode, body, nil
}

// unreachableError is a failure to connect to the admin API.
type unreachableError struct {
	admin string
	err   error
}

func (e *unreachableError) Error() string {
	return fmt.Sprintf("cannot reach egressd at %s (is it running? point -admin at its admin socket or address): %v", e.admin, e.err)
}

func (e *unreachableError) Unwrap() error { return e.err }

// writeIndented writes the JSON document b indented, as received otherwise.
func writeIndented(w io.Writer, b []byte) error {
	var buf bytes.Buffer
	// TrimSpace: Indent keeps the newline a json.Encoder ends with.
	if err := json.Indent(&buf, bytes.TrimSpace(b), "", "  "); err != nil {
		return fmt.Errorf("egressd sent invalid JSON: %w", err)
	}
	buf.WriteByte('\n')
	_, err := w.Write(buf.Bytes())
	return err
}
