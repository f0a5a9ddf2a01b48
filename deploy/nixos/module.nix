# NixOS module for egressd: `imports = [ ./deploy/nixos/module.nix ];`, then
# services.egressd.enable = true.
#
# The config file is builtins.toJSON of settings.nix, installed as
# /etc/egressd/egressd.json. A change of the keys in reloadable.nix (limits,
# allow, authFile, and in settings allow-dest, connect-ports, http-ports,
# log-level, grace and the client caps max-conns, max-conns-per-client and
# max-addrs-per-client) reloads egressd (SIGHUP: open connections stay); a
# change of anything else, or of the package, restarts it.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.egressd;
  inherit (lib) mkOption types;

  egressdConfig = import ./settings.nix {
    inherit (cfg)
      interface
      prefix
      mode
      listen
      allow
      limits
      authFile
      settings
      ;
  };
  configFile = pkgs.writeText "egressd.json" (builtins.toJSON egressdConfig);
  # What SIGHUP applies; every other key needs a restart.
  reloadable = import ./reloadable.nix;

  # The port of each host:port egressd listens on, for the firewall.
  port = addr: lib.toInt (lib.last (lib.splitString ":" addr));
  ports = map port (
    (egressdConfig.listen or [ ])
    ++ lib.optional ((egressdConfig.socks5 or "") != "") egressdConfig.socks5
  );
in
{
  options.services.egressd = {
    enable = lib.mkEnableOption "egressd, a forward proxy that sends every upstream connection from a fresh IPv6 address of the host's prefix";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The egressd package (egressd and egressctl).";
    };

    interface = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "eth0";
      description = "Interface egress addresses are added to. null: the interface of the IPv6 default route.";
    };

    prefix = mkOption {
      type = types.nullOr (types.either types.str (types.listOf types.str));
      default = null;
      example = [
        "2001:db8:1:2::/64"
        "2001:db8:0:100::/56"
      ];
      description = "Prefix, or list of prefixes, egress addresses are drawn from; one shorter than /64 is used as its /64s. null: the /64 of the interface's first global address.";
    };

    mode = mkOption {
      type = types.enum [
        "onlink"
        "routed"
      ];
      default = "onlink";
      description = ''
        onlink adds every egress address to the interface; routed needs the
        prefix routed to the host (Hetzner's dedicated servers, for one) and
        adds no address.
      '';
    };

    listen = mkOption {
      type = types.listOf types.str;
      default = [ "127.0.0.1:3128" ];
      example = [
        "127.0.0.1:3128"
        "10.0.5.1:3128"
      ];
      description = ''
        Addresses (host:port) proxy clients connect to. egressd refuses to
        listen off loopback unless allow or authFile is set.
      '';
    };

    allow = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "127.0.0.0/8"
        "10.0.5.0/24"
      ];
      description = "Networks (CIDR) whose clients may use the proxy. Empty: loopback only. Reloaded without a restart.";
    };

    limits = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "aur.archlinux.org=60r/m,burst=10,concurrency=4,wait=2m" ];
      description = "Rules pacing requests per upstream, each as egressd's -limit takes it. Reloaded without a restart.";
    };

    authFile = mkOption {
      type = types.nullOr (types.strMatching "/.*");
      default = null;
      example = "/run/secrets/egressd-htpasswd";
      description = ''
        htpasswd file (bcrypt lines, as `htpasswd -B` writes them) whose users
        must authenticate to the proxy. A path as a string, so that the secret
        never enters the Nix store; it must be readable by the group egressd
        (for example mode 0640, group egressd). Reloaded without a restart,
        also after the file changes: `systemctl reload egressd`.
      '';
    };

    settings = mkOption {
      type = (pkgs.formats.json { }).type;
      default = { };
      example = {
        rotate = "session";
        max-addrs = 512;
        socks5 = "127.0.0.1:1080";
      };
      description = ''
        Further keys of egressd's config file (its flag names; `egressd -h`
        lists them), merged over the options above; null removes a key. A
        change of log-level or grace is reloaded without a restart; of any
        other key here, egressd restarts.
      '';
    };

    firewallInterfaces = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "br0" ];
      description = ''
        Interfaces on which the firewall admits the listen and socks5 ports.
        Empty: the firewall is left as it is.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    environment.systemPackages = [ cfg.package ];
    environment.etc."egressd/egressd.json".source = configFile;

    # Static, so that a secret (authFile) can be given to the group; the
    # unit's DynamicUser=yes uses it when it exists.
    users.users.egressd = {
      isSystemUser = true;
      group = "egressd";
      description = "egressd forward proxy";
    };
    users.groups.egressd = { };

    networking.firewall.interfaces = lib.genAttrs cfg.firewallInterfaces (_: {
      allowedTCPPorts = ports;
    });

    systemd.services.egressd = {
      description = "egressd forward proxy with a fresh IPv6 source address per connection";
      documentation = [ "https://github.com/egressd/egressd" ];
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # ExecStart names the stable /etc path, so a new config file alone
      # leaves the unit unchanged but for these triggers.
      reloadTriggers = [ configFile ];
      restartTriggers = [ (builtins.toJSON (builtins.removeAttrs egressdConfig reloadable)) ];
      serviceConfig = import ./service.nix // {
        ExecStart = "${cfg.package}/bin/egressd -config /etc/egressd/egressd.json";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
      };
    };
  };
}
