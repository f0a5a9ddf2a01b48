# egressd and egressctl from this checkout: `pkgs.callPackage ./package.nix { }`.
# go.mod asks for Go 1.26: with a nixpkgs whose default Go is older, pass
# `{ buildGoModule = pkgs.buildGo126Module; }`.
{ lib, buildGoModule }:

buildGoModule {
  pname = "egressd";
  version = "0-unstable";

  # The checkout without .git and without make's bin/.
  src = lib.cleanSourceWith {
    src = lib.cleanSource ../..;
    filter = path: _: path != toString ../../bin;
  };

  # The NAR hash of `go mod vendor` of the module (deploy/nix_test.go
  # recomputes it from go.mod and go.sum and says the new value when they
  # change).
  vendorHash = "sha256-5szWD0m8fd/WH5uXJrBPyRwPC9b5IKsJeVIXX4P7r6s=";

  subPackages = [
    "cmd/egressd"
    "cmd/egressctl"
  ];

  ldflags = [
    "-s"
    "-w"
  ];

  # Static binaries, as `make build` makes them: no cgo, so no libc to link
  # against. buildGoModule takes CGO_ENABLED in env (nixpkgs 25.05 and later).
  env.CGO_ENABLED = 0;

  meta = {
    description = "Forward proxy that sends every upstream connection from a fresh IPv6 address of the host's prefix";
    homepage = "https://github.com/egressd/egressd";
    mainProgram = "egressd";
    platforms = lib.platforms.linux;
  };
}
