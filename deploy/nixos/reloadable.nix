# The keys of egressd's config file that a reload (SIGHUP, `systemctl reload
# egressd`) applies to the running egressd; a change of any other key needs a
# restart. module.nix reloads for these and restarts for the rest; a test
# (deploy/ns_test.go) checks the list against what egressd reports when it
# reloads. Builtins only, so that a test can evaluate it without nixpkgs.
[
  "limit"
  "allow"
  "auth-file"
  "allow-dest"
  "connect-ports"
  "http-ports"
  "log-level"
  "grace"
  "max-conns"
  "max-conns-per-client"
  "max-addrs-per-client"
]
