# The systemd service settings egressd runs with, as NixOS's
# systemd.services.<name>.serviceConfig: the same as
# deploy/systemd/egressd.service, less ExecStart and ExecReload, which the
# module adds (a test compares the two). Builtins only, so that a test can
# evaluate it without nixpkgs. Comments on each choice are in the unit file.
{
  Type = "notify";
  NotifyAccess = "main";
  TimeoutStopSec = "45s";
  Restart = "on-failure";
  RestartSec = "5s";

  DynamicUser = true;
  User = "egressd";
  Group = "egressd";
  AmbientCapabilities = "CAP_NET_ADMIN";
  CapabilityBoundingSet = "CAP_NET_ADMIN";
  RuntimeDirectory = "egressd";
  RuntimeDirectoryMode = "0750";
  UMask = "0077";
  LimitNOFILE = 524288;

  NoNewPrivileges = true;
  ProtectSystem = "strict";
  ProtectHome = true;
  PrivateTmp = true;
  PrivateDevices = true;
  PrivateIPC = true;
  ProtectKernelTunables = true;
  ProtectKernelModules = true;
  ProtectKernelLogs = true;
  ProtectControlGroups = true;
  ProtectClock = true;
  ProtectHostname = true;
  ProtectProc = "invisible";
  RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6 AF_NETLINK";
  RestrictNamespaces = true;
  RestrictRealtime = true;
  RestrictSUIDSGID = true;
  LockPersonality = true;
  MemoryDenyWriteExecute = true;
  RemoveIPC = true;
  KeyringMode = "private";
  SystemCallArchitectures = "native";
  SystemCallFilter = [
    "@system-service"
    "~@privileged @resources"
  ];
  SystemCallErrorNumber = "EPERM";
  DevicePolicy = "closed";
}
