// Package test holds egressd's integration tests. They run the real egressd
// binary in network namespaces built by package nstest, send real clients
// (Go, curl, wget) through it and check, on the upstream's side and with
// netlink, where each connection came from. They need root; `make demo` runs
// demo.sh, the same setup for people to watch.
package test
