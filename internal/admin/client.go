package admin

import (
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
	// maxBody bounds what the client reads of an answer.
	maxBody = 64 << 20
)

// Client talks HTTP to egressd's admin API over a unix socket or TCP. Its
// errors are one line that names the admin address.
type Client struct {
	addr string // as the user gave it, for messages
	base string // URL prefix of the requests
	hc   *http.Client
}

// NewClient returns a client for addr, a unix socket path or host:port (see
// IsUnix), which must not be empty. A TCP address may carry http:// and a
// trailing slash.
func NewClient(addr string) *Client {
	// Never through a proxy: the environment of a client of egressd
	// typically points HTTP(S)_PROXY at egressd itself.
	tr := &http.Transport{
		Proxy:               nil,
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     time.Minute,
	}
	c := &Client{addr: addr, hc: &http.Client{Transport: tr, Timeout: requestTimeout}}
	if !IsUnix(addr) {
		c.base = "http://" + strings.TrimSuffix(strings.TrimPrefix(addr, "http://"), "/")
		return c
	}
	c.base = "http://egressd" // the host is not used, only the socket
	tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", addr)
	}
	return c
}

// Addr is the admin address the client was made for.
func (c *Client) Addr() string { return c.addr }

// Get fetches path and returns the body of a 200 answer.
func (c *Client) Get(ctx context.Context, path string) ([]byte, error) {
	_, body, err := c.do(ctx, http.MethodGet, path)
	return body, err
}

// Reload asks egressd to read its configuration again (POST /reload) and
// returns the line saying what changed. When egressd refuses the new
// configuration, the error is its reason.
func (c *Client) Reload(ctx context.Context) (string, error) {
	_, body, err := c.do(ctx, http.MethodPost, "/reload", http.StatusUnprocessableEntity)
	if err != nil {
		return "", err
	}
	var res ReloadResult
	if err := json.Unmarshal(body, &res); err != nil {
		return "", fmt.Errorf("decoding /reload from egressd at %s: %w", c.addr, err)
	}
	if !res.OK {
		if res.Error == "" {
			res.Error = "reload refused"
		}
		return "", errors.New(res.Error)
	}
	return res.Message, nil
}

// Rotate asks egressd to give the session of key a new address (POST
// /sessions/KEY/rotate). When egressd refuses (no such session, no
// sessions), the error is its reason.
func (c *Client) Rotate(ctx context.Context, key string) (RotateResult, error) {
	if key == "" {
		return RotateResult{}, errors.New("empty session key")
	}
	seg := url.PathEscape(key)
	if key == "." || key == ".." {
		// PathEscape leaves dots alone, and the server's mux would clean
		// /sessions/../rotate away; %2E is a segment it keeps.
		seg = strings.ReplaceAll(key, ".", "%2E")
	}
	path := "/sessions/" + seg + "/rotate"
	status, body, err := c.do(ctx, http.MethodPost, path, http.StatusBadRequest, http.StatusNotFound, http.StatusConflict)
	if err != nil {
		return RotateResult{}, err
	}
	var res RotateResult
	if err := json.Unmarshal(body, &res); err != nil {
		if status != http.StatusOK {
			// Not our JSON: an egressd that does not serve this path.
			return RotateResult{}, fmt.Errorf("egressd at %s answered POST %s with %d %s: %s",
				c.addr, path, status, http.StatusText(status), strings.Join(strings.Fields(string(body)), " "))
		}
		return RotateResult{}, fmt.Errorf("decoding %s from egressd at %s: %w", path, c.addr, err)
	}
	if !res.OK {
		if res.Error == "" {
			res.Error = "rotation refused"
		}
		return res, errors.New(res.Error)
	}
	return res, nil
}

// do sends a request with method to path and returns the status and body of
// an answer whose status is 200 or one of also; any other is an error.
func (c *Client) do(ctx context.Context, method, path string, also ...int) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, nil)
	if err != nil {
		return 0, nil, fmt.Errorf("-admin %s: %w", c.addr, err)
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
			return 0, nil, &unreachableError{addr: c.addr, err: oe}
		}
		return 0, nil, fmt.Errorf("%s %s to egressd at %s: %w", method, path, c.addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK && !slices.Contains(also, resp.StatusCode) {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		msg := strings.Join(strings.Fields(string(b)), " ")
		if msg != "" {
			msg = ": " + msg
		}
		return 0, nil, fmt.Errorf("egressd at %s answered %s %s with %s%s", c.addr, method, path, resp.Status, msg)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody+1))
	if err != nil {
		return 0, nil, fmt.Errorf("reading %s %s from egressd at %s: %w", method, path, c.addr, err)
	}
	if len(body) > maxBody {
		return 0, nil, fmt.Errorf("%s %s from egressd at %s: answer larger than %d MiB", method, path, c.addr, maxBody>>20)
	}
	return resp.StatusCode, body, nil
}

// unreachableError is a failure to connect to the admin API.
type unreachableError struct {
	addr string
	err  error
}

func (e *unreachableError) Error() string {
	return fmt.Sprintf("cannot reach egressd at %s (is it running? point -admin at its admin socket or address): %v", e.addr, e.err)
}

func (e *unreachableError) Unwrap() error { return e.err }
