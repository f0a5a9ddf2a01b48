package daemon

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/egressd/egressd/internal/admin"
	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy"
	"github.com/egressd/egressd/proxy/shape"
	"github.com/egressd/egressd/proxy/shape/redisstore"
	"go.yaml.in/yaml/v3"
)

// Config is egressd's configuration. Flags and the config file fill the same
// struct: every flag is also a key of the file, spelled the same way.
type Config struct {
	// Listen lists the addresses the proxy accepts clients on.
	Listen []string
	// SOCKS5 is where the proxy accepts SOCKS5 clients (host:port); empty
	// turns SOCKS5 off.
	SOCKS5 string
	// Mode is how egress addresses become the host's: "onlink" adds each
	// one to Interface; "routed" installs a local route for a prefix that
	// is routed to the host and binds with IPV6_FREEBIND.
	Mode string
	// Interface is where egress addresses are added; empty means the
	// interface of the IPv6 default route.
	Interface string
	// Prefixes are where egress addresses are drawn from, spread evenly
	// over their /64s (a /56 is its 256 /64s); none means the /64 of the
	// first global address on Interface. They must not overlap.
	Prefixes []netip.Prefix
	// Pin lists addresses never used for egress, never removed.
	Pin []netip.Addr
	// MaxAddrs bounds the live egress addresses; 0 means
	// netutil.DefaultMaxAddrs on-link and no bound in routed mode, where an
	// address costs nothing (see maxAddrs).
	MaxAddrs int
	// NewAddrs is on-link mode's budget of never-used addresses, a rate and
	// a burst; NeighWindow how long the router is taken to remember an
	// address after its last use (see netutil.Budget).
	NewAddrs    NewAddrs
	NeighWindow time.Duration
	// Ready is how many egress addresses are kept added and unused.
	Ready int
	// Grace is how long a shutdown waits for requests and tunnels in flight.
	Grace time.Duration
	// TunnelIdle closes a CONNECT tunnel that moved no byte for this long.
	TunnelIdle time.Duration
	// DialTimeout bounds each upstream connection attempt.
	DialTimeout time.Duration
	// Rotate is how often the egress address changes: request, connection
	// or session.
	Rotate proxy.Rotate
	// SessionIdle ends a session (-rotate session) idle for this long.
	SessionIdle time.Duration
	// RotateOn lists the upstream statuses that end a session's address
	// when one answers a plain HTTP request of it (-rotate session).
	RotateOn Statuses
	// IPv4 says what happens to a request for a host with no IPv6 address:
	// direct sends it from the host's own IPv4 address, deny answers 502.
	IPv4 netutil.IPv4Policy
	// Limits are the -limit rules that pace requests per upstream.
	Limits []shape.Rule
	// LimitStore is the URL of a Redis that keeps the rates of Limits
	// shared by every egressd naming it; empty keeps them per process. It
	// may hold a password: never print it, only redisstore.Redact of it.
	LimitStore string
	// Allow lists the networks proxy clients may connect from; empty means
	// loopback only (proxy.DefaultAllow), or every address when AuthFile is
	// set (see allowed).
	Allow []netip.Prefix
	// AuthFile is an htpasswd file of bcrypt hashes; when set, clients must
	// authenticate as one of its users.
	AuthFile string
	// AllowDest re-admits destinations in private and special-purpose
	// ranges (an internal mirror on 10.0.5.7, say), which are refused by
	// default; the host itself, loopback, link-local and the egress prefix
	// stay refused (see netutil.Guard).
	AllowDest []netip.Prefix
	// ConnectPorts are the upstream ports CONNECT and SOCKS5 tunnels may
	// reach; HTTPPorts those of plain HTTP requests (see proxy.Ports).
	ConnectPorts, HTTPPorts *proxy.Ports
	// MaxConns bounds the open client connections, HTTP and SOCKS5
	// together; MaxConnsPerClient those from one client address, 0 meaning
	// MaxConns/4 (see limits).
	MaxConns, MaxConnsPerClient int
	// MaxAddrsPerClient bounds the egress addresses one client address
	// holds at once; 0 means a quarter of the live addresses' bound, none
	// when there is none (see limits).
	MaxAddrsPerClient int
	// ClientTimeout bounds how long a client may take to send its request
	// head, and how long it may stall while sending a body or reading a
	// response.
	ClientTimeout time.Duration
	// Admin is where the admin API listens: a unix socket path or
	// host:port; empty turns it off.
	Admin string
	// LogLevel is the least level logged.
	LogLevel slog.Level
	// File is the config file read, if any (flag only).
	File string

	// args is the command line the Config was made from, for a reload to
	// read the file and apply the command line over it again.
	args []string
}

// defaultConfig returns the configuration with every default set: the one
// place defaults live.
func defaultConfig() Config {
	return Config{
		Listen:       []string{"127.0.0.1:3128"},
		Mode:         modeOnLink,
		NewAddrs:     defaultNewAddrs,
		NeighWindow:  netutil.DefaultBudget.Window,
		Ready:        netutil.DefaultReady,
		Grace:        30 * time.Second,
		TunnelIdle:   5 * time.Minute,
		DialTimeout:  10 * time.Second,
		Rotate:       proxy.RotateRequest,
		SessionIdle:  proxy.DefaultSessionIdle,
		IPv4:         netutil.IPv4Direct,
		ConnectPorts: proxy.MustParsePorts(proxy.DefaultConnectPorts),
		HTTPPorts:    proxy.MustParsePorts(proxy.DefaultHTTPPorts),
		Admin:        admin.DefaultAddr,
		LogLevel:     slog.LevelInfo,

		MaxConns:      proxy.DefaultMaxConns,
		ClientTimeout: proxy.DefaultClientTimeout,
	}
}

// flagSet binds the flags to cfg. Each call makes new flag values, so that a
// repeatable flag replaces, on its first use, what an earlier source (the
// defaults, or the config file) put in its list.
func flagSet(cfg *Config) *flag.FlagSet {
	fs := flag.NewFlagSet("egressd", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Var(&listValue[string]{p: &cfg.Listen, parse: parseHostPort}, "listen", "`ADDR` (host:port) to accept proxy clients on; repeatable")
	fs.Var(optHostPortValue(&cfg.SOCKS5), "socks5", "`ADDR` (host:port) to accept SOCKS5 clients on; empty turns SOCKS5 off")
	fs.Var(choiceValue(&cfg.Mode, modeOnLink, modeRouted), "mode", "`MODE`: onlink adds every egress address to the interface; routed needs the prefix routed to the host")
	fs.StringVar(&cfg.Interface, "interface", cfg.Interface, "`NAME` of the interface to add egress addresses to (default: the interface of the IPv6 default route)")
	fs.Var(&listValue[netip.Prefix]{p: &cfg.Prefixes, parse: parsePrefix}, "prefix", "`CIDR` to draw egress addresses from, spread evenly over its /64s; repeatable (default: the /64 of the interface's first global address)")
	fs.Var(&listValue[netip.Addr]{p: &cfg.Pin, parse: netip.ParseAddr}, "pin", "`ADDR` never to use for egress nor remove; repeatable")
	fs.Var(intValue(&cfg.MaxAddrs, 1), "max-addrs", "`N`: most egress addresses live at once (default: 1024 on-link, none in routed mode)")
	fs.Var(newAddrsValue(&cfg.NewAddrs), "new-addrs", "`RATE[,burst=N]`: never-used egress addresses handed out, on-link; RATE is Nr/s, Nr/m or Nr/h, burst defaults to 96; past it connections reuse warm addresses (the router keeps a neighbour entry per address)")
	fs.Var(durationValue(&cfg.NeighWindow), "neigh-window", "`DURATION` the router remembers an egress address after its last use, on-link: warm addresses are reused within it and removed after it")
	fs.Var(intValue(&cfg.Ready, 0), "ready", "`N` egress addresses kept added and ready")
	fs.Var(durationValue(&cfg.Grace), "grace", "`DURATION` a shutdown waits for requests and tunnels in flight")
	fs.Var(durationValue(&cfg.TunnelIdle), "tunnel-idle", "`DURATION` after which a CONNECT tunnel with no traffic is closed")
	fs.Var(durationValue(&cfg.DialTimeout), "dial-timeout", "`DURATION` an upstream connection attempt may take")
	fs.Var(choiceValue((*string)(&cfg.Rotate), string(proxy.RotateRequest), string(proxy.RotateConnection), string(proxy.RotateSession)), "rotate", "`POLICY`: request gives every upstream connection a fresh address; connection one per client connection; session one per session key (X-Egress-Session header or proxy user session-KEY)")
	fs.Var(durationValue(&cfg.SessionIdle), "session-idle", "`DURATION` after which an unused session (-rotate session) gives its address back")
	fs.Var(&statusesValue{p: &cfg.RotateOn}, "rotate-on", "`STATUSES`, comma-separated (403,429; 300-599): an upstream answer with one of them to a plain HTTP request of a session (-rotate session) gives its address up, so that its next request leaves from a new one (default: none)")
	fs.Var(choiceValue((*string)(&cfg.IPv4), string(netutil.IPv4Direct), string(netutil.IPv4Deny)), "ipv4", "`POLICY` for an upstream with no IPv6 address: direct connects from the host's own IPv4 address, deny answers 502")
	fs.Var(&listValue[shape.Rule]{p: &cfg.Limits, parse: shape.ParseRule}, "limit", "`HOST=RATE[,burst=N][,concurrency=N][,wait=DURATION]` paces requests to upstream HOST (exact, *.suffix or *); RATE is Nr/s, Nr/m or Nr/h; repeatable")
	fs.Var(storeValue(&cfg.LimitStore), "limit-store", "`URL` of a Redis that keeps the -limit budgets shared by every egressd naming it: "+redisstore.Syntax+"; concurrency stays per egressd (default: none, each egressd keeps its own)")
	fs.Var(&listValue[netip.Prefix]{p: &cfg.Allow, parse: parseAllow}, "allow", "`CIDR` of clients that may use the proxy (HTTP and SOCKS5); repeatable (default: loopback only, 127.0.0.0/8 and ::1/128; with -auth-file, any address)")
	fs.StringVar(&cfg.AuthFile, "auth-file", cfg.AuthFile, "htpasswd `FILE` of bcrypt hashes (htpasswd -B): clients must authenticate as one of its users")
	fs.Var(&listValue[netip.Prefix]{p: &cfg.AllowDest, parse: parseAllow}, "allow-dest", "`CIDR` of destinations to admit although they are private or special-purpose (10.0.0.0/8, fc00::/7, ...); the host itself, loopback and link-local stay refused; repeatable")
	fs.Var(&portsValue{p: &cfg.ConnectPorts}, "connect-ports", "`PORTS` CONNECT and SOCKS5 tunnels may reach: ports and ranges, comma-separated; repeatable")
	fs.Var(&portsValue{p: &cfg.HTTPPorts}, "http-ports", "`PORTS` plain HTTP requests may reach; a range never covers a port of other protocols (25, 22, 6379, ...), naming it alone does; repeatable")
	fs.Var(intValue(&cfg.MaxConns, 1), "max-conns", "`N`: most client connections open at once, HTTP and SOCKS5 together; past it a new one gets 503")
	fs.Var(intValue(&cfg.MaxConnsPerClient, 1), "max-conns-per-client", "`N`: most connections open from one client address (all of a host's loopback clients are one); past it 503 (default: max-conns/4)")
	fs.Var(intValue(&cfg.MaxAddrsPerClient, 1), "max-addrs-per-client", "`N`: most egress addresses one client address holds at once: its requests and tunnels in flight, its sessions, its connections' addresses; past it 503 (default: max-addrs/4, at least 1; none in routed mode without -max-addrs)")
	fs.Var(durationValue(&cfg.ClientTimeout), "client-timeout", "`DURATION` a client may take to send its request head, and may stall while sending a body (then 408) or reading a response (then it is cut off)")
	fs.StringVar(&cfg.Admin, "admin", cfg.Admin, "`ADDR` of the admin API: a unix socket path or host:port; empty turns it off")
	fs.Var(levelValue(&cfg.LogLevel), "log-level", "`LEVEL`: debug, info, warn or error")
	fs.StringVar(&cfg.File, "config", cfg.File, "YAML or JSON `FILE` with the same keys as these flags; flags win")
	return fs
}

// ErrVersion is LoadConfig's answer to -version: main prints the version
// and exits 0.
var ErrVersion = errors.New("-version given")

// commandLine is flagSet with the flags of the command line only, which are
// no config keys: -version.
func commandLine(cfg *Config) (fs *flag.FlagSet, version *bool) {
	fs = flagSet(cfg)
	return fs, fs.Bool("version", false, "print the version and exit")
}

// LoadConfig reads the command line and the config file it names. Flags given
// on the command line override the file, the file overrides the defaults. An
// argument that is not a flag is an error: the flag package stops at the
// first, and would silently drop every flag after it.
func LoadConfig(args []string) (Config, error) {
	cfg := defaultConfig()
	fs, version := commandLine(&cfg)
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	if *version {
		return Config{}, ErrVersion
	}
	if fs.NArg() > 0 {
		// A repeatable flag right before the stray word is most likely the
		// one whose second value it was meant to be.
		prev := "-allow"
		if i := len(args) - fs.NArg() - 2; i >= 0 && strings.HasPrefix(args[i], "-") {
			if f := fs.Lookup(strings.TrimLeft(args[i], "-")); f != nil {
				if _, ok := f.Value.(interface{ repeatable() }); ok {
					prev = "-" + f.Name
				}
			}
		}
		return Config{}, fmt.Errorf("unexpected argument %q: every value needs its flag (%s A %s B), and egressd takes no other arguments", fs.Arg(0), prev, prev)
	}
	if cfg.File != "" {
		fileCfg := defaultConfig()
		if err := applyFile(&fileCfg, cfg.File); err != nil {
			return Config{}, err
		}
		fs, _ := commandLine(&fileCfg)
		if err := fs.Parse(args); err != nil {
			return Config{}, err
		}
		cfg = fileCfg
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	cfg.args = slices.Clone(args)
	return cfg, nil
}

// applyFile sets cfg from a YAML (or JSON) file whose keys are flag names.
// Unknown keys and bad values are errors that name the key.
func applyFile(cfg *Config, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	var doc yaml.Node
	if err := yaml.NewDecoder(bytes.NewReader(data)).Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil // an empty file sets nothing
		}
		return fmt.Errorf("config %s: %s", path, oneLine(err.Error()))
	}
	root := &doc
	if root.Kind == yaml.DocumentNode && len(root.Content) == 1 {
		root = root.Content[0]
	}
	if root.Kind != yaml.MappingNode {
		return fmt.Errorf("config %s: line %d: expected a mapping of keys to values", path, root.Line)
	}
	fs := flagSet(cfg)
	seen := map[string]int{} // key: its line
	for i := 0; i+1 < len(root.Content); i += 2 {
		key, val := root.Content[i], root.Content[i+1]
		f := fs.Lookup(key.Value)
		if f == nil || key.Value == "config" {
			return fmt.Errorf("config %s: line %d: unknown key %q", path, key.Line, key.Value)
		}
		// YAML allows a key once; a second one (say, a commented-out
		// listen line taken in beside the first) must not add to the first.
		if first, ok := seen[key.Value]; ok {
			return fmt.Errorf("config %s: line %d: key %q given again (first on line %d)", path, key.Line, key.Value, first)
		}
		seen[key.Value] = key.Line
		_, repeatable := f.Value.(interface{ repeatable() })
		var items []*yaml.Node
		switch {
		case val.Kind == yaml.ScalarNode:
			items = []*yaml.Node{val}
		case val.Kind == yaml.SequenceNode && repeatable:
			items = val.Content
		case val.Kind == yaml.SequenceNode:
			return fmt.Errorf("config %s: line %d: key %q takes one value, not a list", path, val.Line, key.Value)
		default:
			return fmt.Errorf("config %s: line %d: key %q: expected a value", path, val.Line, key.Value)
		}
		if repeatable && len(items) == 0 {
			f.Value.(interface{ reset() }).reset()
		}
		for _, item := range items {
			if item.Kind != yaml.ScalarNode {
				return fmt.Errorf("config %s: line %d: key %q: expected a value", path, item.Line, key.Value)
			}
			if err := f.Value.Set(item.Value); err != nil {
				return fmt.Errorf("config %s: line %d: key %q: %v", path, item.Line, key.Value, err)
			}
		}
	}
	return nil
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// Validate checks what no single value can check on its own. Its errors name
// the flag (and config key) at fault.
func (c *Config) Validate() error {
	switch {
	case len(c.Listen) == 0:
		return errors.New("listen: give at least one address")
	case c.SOCKS5 != "" && slices.Contains(c.Listen, c.SOCKS5):
		return fmt.Errorf("socks5 %s: also a listen address", c.SOCKS5)
	case c.Ready > c.maxAddrs():
		return fmt.Errorf("ready %d: must not exceed max-addrs %d", c.Ready, c.maxAddrs())
	case c.NeighWindow <= 0:
		return fmt.Errorf("neigh-window %s: must be positive", c.NeighWindow)
	case c.TunnelIdle <= 0:
		return fmt.Errorf("tunnel-idle %s: must be positive", c.TunnelIdle)
	case c.DialTimeout <= 0:
		return fmt.Errorf("dial-timeout %s: must be positive", c.DialTimeout)
	case c.SessionIdle <= 0:
		return fmt.Errorf("session-idle %s: must be positive", c.SessionIdle)
	case len(c.RotateOn) > 0 && c.Rotate != proxy.RotateSession:
		return fmt.Errorf("rotate-on %s: needs -rotate session (only a session holds an address to give up), not -rotate %s", c.RotateOn, c.Rotate)
	case c.ClientTimeout <= 0:
		return fmt.Errorf("client-timeout %s: must be positive", c.ClientTimeout)
	case c.IPv4 != netutil.IPv4Direct && c.IPv4 != netutil.IPv4Deny:
		return fmt.Errorf("ipv4 %q: must be direct or deny", c.IPv4)
	case c.Admin != "" && !admin.IsUnix(c.Admin) && !isLoopback(c.Admin):
		return fmt.Errorf("admin %s is not a loopback address: the admin API has no authentication, so it listens on a unix socket (a path) or a loopback host:port only", c.Admin)
	}
	for i, p := range c.Prefixes {
		for _, q := range c.Prefixes[:i] {
			switch {
			case p == q:
				return fmt.Errorf("prefix %s is given twice: give each range of addresses once", p)
			case p.Overlaps(q):
				return fmt.Errorf("prefix %s overlaps prefix %s: give each range of addresses once", p, q)
			}
		}
	}
	if _, err := shape.New(shape.Config{Rules: c.Limits}); err != nil {
		return fmt.Errorf("limit: %w", err)
	}
	if c.LimitStore != "" {
		if _, err := redisstore.ParseURL(c.LimitStore); err != nil {
			return fmt.Errorf("limit-store: %w", err)
		}
	}
	if len(c.Allow) == 0 && c.AuthFile == "" {
		// Off loopback with the default allow list, only local clients
		// could use it; but someone who listens there means others to, and
		// must say who.
		open := func(key, addr string) error {
			return fmt.Errorf("%s %s is not a loopback address: give -allow CIDR (the clients' networks) or -auth-file FILE, or egressd would be an open proxy", key, addr)
		}
		for _, addr := range c.Listen {
			if !isLoopback(addr) {
				return open("listen", addr)
			}
		}
		if c.SOCKS5 != "" && !isLoopback(c.SOCKS5) {
			return open("socks5", c.SOCKS5)
		}
	}
	return nil
}

// noCap is a limit that never binds.
const noCap = math.MaxInt

// maxAddrs is the bound of the live egress addresses: -max-addrs, or by
// default netutil.DefaultMaxAddrs on-link, where each address costs the
// kernel work, and none in routed mode, where an address costs nothing and
// open connections are bounded by the file descriptors alone.
func (c *Config) maxAddrs() int {
	switch {
	case c.MaxAddrs > 0:
		return c.MaxAddrs
	case c.Mode == modeRouted:
		return noCap
	}
	return netutil.DefaultMaxAddrs
}

// maxSessions bounds the sessions open at once (-rotate session): each holds
// a transport of its own, so routed mode keeps the on-link bound unless
// -max-addrs says otherwise.
func (c *Config) maxSessions() int {
	if c.MaxAddrs > 0 {
		return c.MaxAddrs
	}
	return netutil.DefaultMaxAddrs
}

// budget is on-link mode's neighbour budget; routed mode has none.
func (c *Config) budget() netutil.Budget {
	if c.Mode == modeRouted {
		return netutil.Budget{}
	}
	return netutil.Budget{Rate: c.NewAddrs.Rate, Burst: c.NewAddrs.Burst, Window: c.NeighWindow}
}

// limits are the proxy's client limits. -max-conns-per-client defaults to a
// quarter of -max-conns, and -max-addrs-per-client to a quarter of the live
// addresses' bound, so that one client holding all it may still leaves
// three quarters to the others; with no bound (routed mode) it has none
// either.
func (c *Config) limits() proxy.Limits {
	perClient := c.MaxAddrsPerClient
	if perClient == 0 {
		perClient = noCap
		if n := c.maxAddrs(); n != noCap {
			perClient = max(n/4, 1)
		}
	}
	perConns := c.MaxConnsPerClient
	if perConns == 0 {
		perConns = max(c.MaxConns/4, 1)
	}
	return proxy.Limits{MaxConns: c.MaxConns, MaxConnsPerClient: perConns, MaxAddrsPerClient: perClient}
}

// anywhere is every address, IPv4 and IPv6.
var anywhere = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}

// allowed returns the networks clients may connect from: Allow; without it,
// every address if users must authenticate (the password is the guard),
// else loopback only.
func (c *Config) allowed() []netip.Prefix {
	switch {
	case len(c.Allow) > 0:
		return c.Allow
	case c.AuthFile != "":
		return anywhere
	default:
		return proxy.DefaultAllow
	}
}

// isLoopback reports whether a host:port listens on loopback only. An empty
// host is every address.
func isLoopback(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.Unmap().IsLoopback()
}

// parseAllow reads a -allow value: a CIDR prefix, or one address.
func parseAllow(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), nil
	}
	if a, err := netip.ParseAddr(s); err == nil && a.Zone() == "" {
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	return netip.Prefix{}, fmt.Errorf("%q is not a CIDR prefix like 10.0.5.0/24 or an address", s)
}

// listValue is a repeatable flag: each use adds one element.
type listValue[T any] struct {
	p     *[]T
	parse func(string) (T, error)
	used  bool // the first Set replaces the list it was given
}

func (v *listValue[T]) repeatable() {}
func (v *listValue[T]) reset()      { *v.p = nil; v.used = true }

func (v *listValue[T]) String() string {
	if v == nil || v.p == nil || len(*v.p) == 0 {
		return ""
	}
	parts := make([]string, len(*v.p))
	for i, x := range *v.p {
		parts[i] = fmt.Sprint(x)
	}
	return strings.Join(parts, ", ")
}

func (v *listValue[T]) Set(s string) error {
	x, err := v.parse(s)
	if err != nil {
		return err
	}
	if !v.used {
		v.reset()
	}
	*v.p = append(*v.p, x)
	return nil
}

func parseHostPort(s string) (string, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", fmt.Errorf("%q is not host:port", s)
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil && host != "localhost" {
			return "", fmt.Errorf("%q: host must be an IP address", s)
		}
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		return "", fmt.Errorf("%q: port must be a number from 1 to 65535", s)
	}
	return s, nil
}

// The values of -mode.
const (
	modeOnLink = "onlink"
	modeRouted = "routed"
)

// portsValue is a port list flag (proxy.ParsePorts); a repeated flag, or a
// list in the config file, adds to the list its first use started.
type portsValue struct {
	p    **proxy.Ports
	used bool
}

func (v *portsValue) repeatable() {}
func (v *portsValue) reset()      { *v.p = &proxy.Ports{}; v.used = true }

func (v *portsValue) String() string {
	if v == nil || v.p == nil {
		return ""
	}
	return (*v.p).String()
}

func (v *portsValue) Set(s string) error {
	if _, err := proxy.ParsePorts(s); err != nil {
		return err
	}
	spec := s
	if v.used && (*v.p).String() != "" {
		spec = (*v.p).String() + "," + s
	}
	p, err := proxy.ParsePorts(spec)
	if err != nil {
		return err
	}
	*v.p, v.used = p, true
	return nil
}

// NewAddrs is -new-addrs: the rate and burst of never-used addresses.
type NewAddrs struct {
	Rate  float64 // a second
	Burst int
	text  string // the rate as written: "5r/s"
}

func (n NewAddrs) String() string {
	return fmt.Sprintf("%s,burst=%d", n.text, n.Burst)
}

// defaultNewAddrs is netutil.DefaultBudget's rate and burst.
var defaultNewAddrs = NewAddrs{Rate: netutil.DefaultBudget.Rate, Burst: netutil.DefaultBudget.Burst,
	text: strconv.FormatFloat(netutil.DefaultBudget.Rate, 'f', -1, 64) + "r/s"}

// parseNewAddrs reads RATE[,burst=N], RATE as a -limit rule writes it; the
// burst defaults to the default budget's.
func parseNewAddrs(s string) (NewAddrs, error) {
	parts := strings.Split(s, ",")
	text := strings.TrimSpace(parts[0])
	r, err := shape.ParseRate(text)
	if err != nil {
		return NewAddrs{}, fmt.Errorf("%q: rate %q: %v", s, text, err)
	}
	n := NewAddrs{Rate: r, Burst: netutil.DefaultBudget.Burst, text: text}
	switch len(parts) {
	case 1:
	case 2:
		v, ok := strings.CutPrefix(strings.TrimSpace(parts[1]), "burst=")
		b, err := strconv.Atoi(strings.TrimSpace(v))
		if !ok || err != nil || b < 1 {
			return NewAddrs{}, fmt.Errorf("%q: want RATE[,burst=N] with N a whole number of at least 1", s)
		}
		n.Burst = b
	default:
		return NewAddrs{}, fmt.Errorf("%q: want RATE[,burst=N]", s)
	}
	return n, nil
}

// scalarValue is a flag of one value: parse checks a value and makes it what
// the field holds, format prints the field as the flag shows it (-h gives
// no default where format gives ""). The flag package makes a zero
// scalarValue to tell a default from none: it prints "".
type scalarValue[T any] struct {
	p      *T
	parse  func(string) (T, error)
	format func(T) string
}

func (v scalarValue[T]) String() string {
	if v.p == nil {
		return ""
	}
	return v.format(*v.p)
}

func (v scalarValue[T]) Set(s string) error {
	x, err := v.parse(s)
	if err != nil {
		return err
	}
	*v.p = x
	return nil
}

// optHostPortValue is a host:port flag, checked like -listen, that may be
// empty.
func optHostPortValue(p *string) scalarValue[string] {
	return scalarValue[string]{p: p, format: same, parse: func(s string) (string, error) {
		if s == "" {
			return s, nil
		}
		return parseHostPort(s)
	}}
}

// storeValue is -limit-store. It takes any text, for Validate to check, so
// that no error quotes the URL (the flag package's would), which may hold a
// password; it prints the URL without the password.
func storeValue(p *string) scalarValue[string] {
	return scalarValue[string]{p: p, parse: func(s string) (string, error) { return s, nil }, format: func(s string) string {
		if s == "" {
			return ""
		}
		return redisstore.Redact(s)
	}}
}

// choiceValue is a flag that takes one of a fixed set of words.
func choiceValue(p *string, choices ...string) scalarValue[string] {
	return scalarValue[string]{p: p, format: same, parse: func(s string) (string, error) {
		if !slices.Contains(choices, s) {
			return "", fmt.Errorf("%q is not one of %s", s, strings.Join(choices, ", "))
		}
		return s, nil
	}}
}

func same(s string) string { return s }

// minPrefixBits is the shortest -prefix: a /48, what a provider assigns to
// a site at most.
const minPrefixBits = 48

func parsePrefix(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		if strings.ContainsAny(strings.TrimSpace(s), ", ") {
			return netip.Prefix{}, fmt.Errorf("%q is not a CIDR prefix: give one per -prefix (-prefix A -prefix B; in the config file prefix: [A, B])", s)
		}
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR prefix like 2001:db8:1:2::/64", s)
	}
	if !p.Addr().Is6() || p.Addr().Is4In6() {
		return netip.Prefix{}, fmt.Errorf("%q is not an IPv6 prefix", s)
	}
	if p.Bits() < minPrefixBits {
		// A /6 for a /64 would take a sixty-fourth of the Internet for
		// the host's own (routed mode's local route, the destination
		// guard).
		return netip.Prefix{}, fmt.Errorf("%q is wider than a /%d, the widest prefix egressd takes (a /%d is 65,536 /64s)", s, minPrefixBits, minPrefixBits)
	}
	if !netutil.HasDrawable(p) {
		return netip.Prefix{}, fmt.Errorf("%q has no address to draw", s)
	}
	return p.Masked(), nil
}

// intValue is a whole number of at least min. It prints nothing for 0,
// which for these flags means a default derived from others (the usage
// says which), so that -h does not call it "default 0".
func intValue(p *int, min int) scalarValue[int] {
	return scalarValue[int]{p: p, parse: func(s string) (int, error) {
		n, err := strconv.Atoi(s)
		if err != nil {
			return 0, fmt.Errorf("%q is not a whole number", s)
		}
		if n < min {
			return 0, fmt.Errorf("%d: must be at least %d", n, min)
		}
		return n, nil
	}, format: func(n int) string {
		if n == 0 {
			return ""
		}
		return strconv.Itoa(n)
	}}
}

// Statuses is -rotate-on: HTTP statuses, in the order given.
type Statuses []int

func (s Statuses) String() string {
	parts := make([]string, len(s))
	for i, st := range s {
		parts[i] = strconv.Itoa(st)
	}
	return strings.Join(parts, ",")
}

// parseStatuses reads a comma-separated list of HTTP statuses, 300 to 599;
// empty is none. A success (2xx) would give a session's address up after
// every answer, which -rotate request does without the cost.
func parseStatuses(s string) (Statuses, error) {
	var out Statuses
	for f := range strings.SplitSeq(s, ",") {
		if f = strings.TrimSpace(f); f == "" && strings.TrimSpace(s) == "" {
			continue
		}
		name := func(why string) error {
			if f == strings.TrimSpace(s) { // one value: name it once
				return fmt.Errorf("%q %s; want a list like 403,429", f, why)
			}
			return fmt.Errorf("%q: %q %s; want a list like 403,429", s, f, why)
		}
		n, err := strconv.Atoi(f)
		switch {
		case err != nil || n < 100 || n > 599:
			return nil, name("is not an HTTP status (100-599)")
		case n < 300:
			return nil, name("is not a refusal (300-599): the session would move after every answer")
		}
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out, nil
}

// statusesValue is -rotate-on: a comma-separated list; a repeated flag, or
// a list in the config file (rotate-on: [403, 429]), adds to the list its
// first use started.
type statusesValue struct {
	p    *Statuses
	used bool
}

func (v *statusesValue) repeatable() {}
func (v *statusesValue) reset()      { *v.p = nil; v.used = true }

func (v *statusesValue) String() string {
	if v == nil || v.p == nil {
		return ""
	}
	return v.p.String()
}

func (v *statusesValue) Set(s string) error {
	add, err := parseStatuses(s)
	if err != nil {
		return err
	}
	if !v.used {
		v.reset()
	}
	for _, n := range add {
		if !slices.Contains(*v.p, n) {
			*v.p = append(*v.p, n)
		}
	}
	return nil
}

func newAddrsValue(p *NewAddrs) scalarValue[NewAddrs] {
	return scalarValue[NewAddrs]{p: p, parse: parseNewAddrs, format: func(n NewAddrs) string {
		if n.text == "" {
			return ""
		}
		return n.String()
	}}
}

func durationValue(p *time.Duration) scalarValue[time.Duration] {
	return scalarValue[time.Duration]{p: p, format: time.Duration.String, parse: func(s string) (time.Duration, error) {
		d, err := time.ParseDuration(s)
		if err != nil {
			return 0, fmt.Errorf("%q is not a duration like 30s or 5m", s)
		}
		if d < 0 {
			return 0, fmt.Errorf("%s: must not be negative", s)
		}
		return d, nil
	}}
}

func levelValue(p *slog.Level) scalarValue[slog.Level] {
	return scalarValue[slog.Level]{p: p, parse: func(s string) (slog.Level, error) {
		var l slog.Level
		if err := l.UnmarshalText([]byte(s)); err != nil {
			return 0, fmt.Errorf("%q is not one of debug, info, warn, error", s)
		}
		return l, nil
	}, format: func(l slog.Level) string { return strings.ToLower(l.String()) }}
}
