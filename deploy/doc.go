// Package deploy holds the tests of what runs egressd on a server: the
// systemd unit, its example configuration and sysusers file in
// deploy/systemd, and the NixOS module and package in deploy/nixos. They
// check the files with the tools that read them (systemd-analyze,
// systemd-sysusers, nix-instantiate, nix-hash) and run egressd in network
// namespaces with exactly the command line and config files those produce.
package deploy
