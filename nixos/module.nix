{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    mkPackageOption
    optional
    optionals
    types
    ;

  cfg = config.services.jetrelay;
  tlsCfg = cfg.tls;

  settingsFormat = pkgs.formats.toml { };
  # TOML has no null: an optional key left at null is left out of the file, so the
  # relay's own default applies.
  withoutNulls = lib.filterAttrsRecursive (_: value: value != null);
  configFile = settingsFormat.generate "jetrelay.toml" (withoutNulls cfg.settings);
  tlsConfigFile = settingsFormat.generate "jetrelay-tls.toml" (withoutNulls tlsCfg.settings);

  # The relay owns this directory (its user and group); the sidecar, a member of the
  # relay's group, may only traverse it and connect to the socket in it.
  runtimeDirectory = "/run/jetrelay";
  trustedSocket = "${runtimeDirectory}/trusted.sock";

  # The TCP port of a listener address ("HOST:PORT", "[V6]:PORT"), or null for a
  # disabled listener (null or ""), a Unix socket ("unix:PATH") or anything else.
  tcpPort =
    address:
    let
      port = builtins.match ".*:([0-9]+)" address;
    in
    if address == null || address == "" || lib.hasPrefix "unix:" address || port == null then
      null
    else
      lib.toInt (lib.head port);
  privilegedTcp =
    address:
    let
      port = tcpPort address;
    in
    port != null && port < 1024;

  # Binding below 1024 needs CAP_NET_BIND_SERVICE, and a capability only counts in the
  # host network namespace if the process is not inside a private user namespace.
  relayNeedsBindCap = lib.any privilegedTcp [
    cfg.settings.listen
    cfg.settings.metrics_listen
    cfg.settings.trusted_listen
  ];
  listenPort = tcpPort cfg.settings.listen;

  usesACME = tlsCfg.enableACME || tlsCfg.useACMEHost != null;
  acmeCertName = if tlsCfg.enableACME then tlsCfg.domain else tlsCfg.useACMEHost;
  acmeCert = config.security.acme.certs.${acmeCertName};
  tlsCertFile = if usesACME then "${acmeCert.directory}/fullchain.pem" else tlsCfg.certFile;
  tlsKeyFile = if usesACME then "${acmeCert.directory}/key.pem" else tlsCfg.keyFile;

  # boot.kernel.sysctl values may be null, bools, ints or strings.
  ioUringDisabled =
    let
      value = config.boot.kernel.sysctl."kernel.io_uring_disabled" or null;
    in
    if value == null then
      0
    else if builtins.isBool value then
      (if value then 1 else 0)
    else if builtins.isInt value then
      value
    else
      lib.toInt (toString value);

  # The priority of every sysctl this module sets: weaker than mkDefault (1000), so that a
  # value from anywhere else (the administrator, or another module even with mkDefault)
  # wins instead of conflicting: boot.kernel.sysctl takes exactly one definition per key
  # at the winning priority, even when two are equal. Stronger than an option's own
  # default (1500).
  tuned = lib.mkOverride 1100;

  # Shared by both units. Each line removes something neither process needs; the relay
  # adds the few things that need a comment of their own. Both run as static system
  # users (see users.users below), so everything DynamicUser= would imply is spelled out:
  # ProtectSystem=strict, ProtectHome, PrivateTmp, RemoveIPC, NoNewPrivileges,
  # RestrictSUIDSGID.
  hardening = {
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    PrivateMounts = true;
    DevicePolicy = "closed";
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    # AF_UNIX: the trusted socket, sd_notify and the nscd socket that name lookups go
    # through. No AF_NETLINK: nothing here enumerates links.
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RemoveIPC = true;
    KeyringMode = "private";
    SystemCallArchitectures = "native";
    # @system-service includes @aio, which is where systemd files io_uring_setup,
    # io_uring_enter and io_uring_register, so the io_uring fan-out runs under the filter
    # unchanged. ~@resources removes setrlimit/sched_setaffinity/set_mempolicy: limits and
    # CPU placement are systemd's job here (LimitNOFILE, AllowedCPUs, CPUQuota).
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
      "~@resources"
    ];
    # A filtered call fails with EPERM instead of killing the process, so an optional
    # call (e.g. a best-effort thread pinning) degrades.
    SystemCallErrorNumber = "EPERM";
    UMask = "0077";
  };
in
{
  options.services.jetrelay = {
    enable = mkEnableOption "jetrelay, a Jetstream relay that fans the Bluesky firehose out to many WebSocket clients";

    package = mkPackageOption pkgs "jetrelay" { };

    settings = mkOption {
      default = { };
      example = literalExpression ''
        {
          upstream = [ "wss://jetstream2.us-east.bsky.network/subscribe" ];
          retention = "72h";
          max_disk = "200GiB";
          max_clients = 200000;
          allow_ip = [ "10.0.0.0/8" ];
        }
      '';
      description = ''
        Relay configuration, written to a TOML file passed with `--config`. A key is the
        relay's flag name with `-` replaced by `_` (the configuration table of the
        jetrelay README lists them all); the common ones are declared below with their
        defaults, any other key is passed through. `data_dir` defaults to the unit's
        state directory, {file}`/var/lib/jetrelay`.
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          listen = mkOption {
            type = types.str;
            default = "[::]:6008";
            example = "127.0.0.1:6008";
            description = "Public plain-WebSocket listener (`GET /subscribe`); `[::]` takes IPv4 and IPv6.";
          };
          upstream = mkOption {
            type = types.nullOr (types.nonEmptyListOf types.str);
            default = null;
            example = [
              "wss://jetstream2.us-east.bsky.network/subscribe"
              "ws://10.0.0.5:6008/subscribe"
            ];
            description = ''
              Upstream Jetstream URLs, tried in turn on failure. `null`: the relay's
              built-in list of the six public Bluesky Jetstream instances (the two
              `subscribeEvents` hosts, then the four legacy `/subscribe` ones). Another
              jetrelay is a valid upstream.
            '';
          };
          retention = mkOption {
            type = types.str;
            default = "24h";
            example = "72h";
            description = "How long events are kept for cursor replay (`30s`, `10m`, `24h`).";
          };
          max_disk = mkOption {
            type = types.strMatching "[0-9]+ *(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?";
            default = "20GiB";
            example = "200GiB";
            description = "Disk cap for all logs; the oldest events go first when it is reached, even inside the retention window.";
          };
          workers = mkOption {
            type = types.nullOr (types.ints.between 1 64);
            default = null;
            example = 8;
            description = ''
              Fan-out worker threads. `null`: one per CPU the relay may run on, which
              honours {option}`services.jetrelay.allowedCPUs`.
            '';
          };
          metrics_listen = mkOption {
            type = types.str;
            default = "127.0.0.1:6009";
            example = "[::]:6009";
            description = ''
              Metrics, dashboard and health listener (`/metrics`, `/healthz`, `/readyz`).
              `""` disables it.
            '';
          };
          trusted_listen = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "[::]:6011";
            description = ''
              Listener that requires a PROXY v2 header (the TLS sidecar, or a load
              balancer with `send-proxy-v2`): `HOST:PORT` or `unix:PATH`. Set to the
              sidecar's socket when {option}`services.jetrelay.tls.enable` is on.
            '';
          };
          data_dir = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "/srv/jetrelay";
            description = ''
              Where the logs live. `null`: {file}`/var/lib/jetrelay`, the unit's state
              directory. Another directory must exist and belong to the user `jetrelay`.
            '';
          };
        };
      };
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the port of {option}`services.jetrelay.settings.listen` in the firewall.";
    };

    limitNOFILE = mkOption {
      type = types.ints.positive;
      default = 1048576;
      description = ''
        File descriptor limit of the relay and the TLS sidecar. Every client is one
        descriptor in the relay (two in the sidecar), so this bounds the number of
        clients together with `max_clients`. The module keeps `fs.nr_open` at or above
        it, otherwise systemd could not apply it.
      '';
    };

    cpuQuota = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "400%";
      description = "systemd `CPUQuota=` of the relay, to leave CPU time to other services on the host.";
    };

    allowedCPUs = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "2-7";
      description = ''
        systemd `AllowedCPUs=` of the relay, e.g. to keep it off the CPUs that take NIC
        interrupts. The default worker count follows it.
      '';
    };

    kernelTuning = mkOption {
      type = types.enum [
        "none"
        "backlog"
        "many-clients"
      ];
      default = "backlog";
      description = ''
        Kernel settings for a server that many clients reconnect to at once. Every value
        is set below `mkDefault` priority, so a `boot.kernel.sysctl` value from anywhere
        else wins.

        - `"none"`: only `fs.nr_open`, so that {option}`services.jetrelay.limitNOFILE`
          can be applied.
        - `"backlog"` (the default, safe on any host): also the listen and SYN backlogs
          (`net.core.somaxconn`, `net.ipv4.tcp_max_syn_backlog` = 65535), which cost
          memory only while a reconnect storm fills them.
        - `"many-clients"`: for a host dedicated to tens of thousands of mostly idle
          clients. Also 16 KiB default socket buffers (`net.ipv4.tcp_rmem`,
          `net.ipv4.tcp_wmem`, max 6 MiB / 1 MiB), a 128 KiB unsent-data low-water mark
          (`net.ipv4.tcp_notsent_lowat`) and, with the firewall on, room for one
          tracked connection per client (`net.netfilter.nf_conntrack_max`). These apply
          to every socket on the host.
      '';
    };

    tls = {
      # The sidecar terminates TLS (wss://) and hands each connection to the relay over a
      # Unix socket, behind a PROXY protocol v2 header that carries the client's address.
      enable = mkEnableOption "the jetrelay-tls sidecar that serves wss:// in front of the relay";

      domain = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "jetstream.example.org";
        description = "Public DNS name of the relay; the certificate is ordered for it when {option}`services.jetrelay.tls.enableACME` is set.";
      };

      enableACME = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Order a certificate for {option}`services.jetrelay.tls.domain` with
          `security.acme`, answering the HTTP-01 challenge with lego's built-in server on
          port 80. For DNS-01 or a certificate shared with a web server, declare it in
          `security.acme.certs` and use {option}`services.jetrelay.tls.useACMEHost`.
        '';
      };

      useACMEHost = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "example.org";
        description = ''
          Name of a certificate in `security.acme.certs` to serve. The sidecar joins the
          certificate's group to read the key, and the acme module reloads it after every
          renewal.
        '';
      };

      certFile = mkOption {
        type = types.nullOr (types.pathWith { absolute = true; });
        default = null;
        example = "/var/lib/jetrelay-certs/fullchain.pem";
        description = ''
          PEM certificate chain, when not using ACME. Replace the file and run
          `systemctl reload jetrelay-tls` to rotate it.
        '';
      };

      keyFile = mkOption {
        type = types.nullOr (
          types.pathWith {
            absolute = true;
            inStore = false;
          }
        );
        default = null;
        example = "/var/lib/jetrelay-certs/key.pem";
        description = ''
          PEM private key for {option}`services.jetrelay.tls.certFile`. It must be
          readable by the group `jetrelay-tls` (e.g. `root:jetrelay-tls`, mode `0640`)
          and must not be in the Nix store.
        '';
      };

      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Open the ports of {option}`services.jetrelay.tls.settings.listen`, and port 80
          for the HTTP-01 challenge when {option}`services.jetrelay.tls.enableACME` is
          set.
        '';
      };

      settings = mkOption {
        default = { };
        example = literalExpression ''
          {
            listen = [ "[::]:443" "[::]:8443" ];
            max_connections = 50000;
            idle_timeout = "300s";
          }
        '';
        description = ''
          Sidecar configuration (TOML, passed with `--config`); keys are the flags of
          `jetrelay-tls --help` with `-` replaced by `_`. `backend`, `cert` and `key` are
          filled in from the options above.
        '';
        type = types.submodule {
          freeformType = settingsFormat.type;
          options.listen = mkOption {
            type = types.nonEmptyListOf types.str;
            default = [ "[::]:443" ];
            description = "Addresses the TLS sidecar listens on.";
          };
        };
      };
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = ioUringDisabled != 2;
          message = ''
            services.jetrelay needs io_uring, but boot.kernel.sysctl."kernel.io_uring_disabled"
            is 2, which disables it for every process.
          '';
        }
        {
          assertion = listenPort != null;
          message = ''
            services.jetrelay.settings.listen must be a TCP address ("HOST:PORT" or
            "[V6]:PORT"), not "${cfg.settings.listen}".
          '';
        }
      ];

      warnings = optional (ioUringDisabled == 1) ''
        boot.kernel.sysctl."kernel.io_uring_disabled" is 1: only members of the group
        named by kernel.io_uring_group may use io_uring. Set users.groups.jetrelay.gid and
        kernel.io_uring_group to the same number, or the relay fails to start.
      '';

      services.jetrelay.settings = {
        trusted_listen = mkIf tlsCfg.enable (lib.mkDefault "unix:${trustedSocket}");
      };

      # Static system users rather than DynamicUser=, for three reasons: the private key
      # and an ACME certificate are group-owned by `jetrelay-tls`, which must exist before
      # the sidecar first starts (and systemd refuses a DynamicUser= whose name is also a
      # static group's, exit status 217/USER); the trusted socket is shared through the
      # relay's own group, of which the sidecar is a member; and kernel.io_uring_group
      # needs a GID that stays the same across restarts. The sandbox DynamicUser= would
      # imply is set explicitly above. The relay and the sidecar keep separate UIDs: the
      # sidecar holds the private key and CAP_NET_BIND_SERVICE, the relay parses untrusted
      # WebSocket traffic, and neither may signal or read the other.
      users.users.jetrelay = {
        isSystemUser = true;
        group = "jetrelay";
        description = "jetrelay Jetstream relay";
      };
      users.groups.jetrelay = { };

      systemd.services.jetrelay = {
        description = "jetrelay Jetstream relay";
        wantedBy = [ "multi-user.target" ];
        # Upstream connections are retried by the relay itself, so it does not wait for
        # network-online.target.
        after = [ "network.target" ];

        serviceConfig = hardening // {
          Type = "notify";
          ExecStart = "${lib.getExe cfg.package} --config ${configFile}";
          # The relay sends WATCHDOG=1 only while every critical part (follower and
          # writer, each fan-out worker, the listener, retention) makes progress or is
          # idle for a stated reason; a wedged relay is restarted (Restart=on-failure
          # covers a watchdog timeout) instead of silently starving every client.
          WatchdogSec = "30s";
          Restart = "on-failure";
          RestartSec = "2s";
          # SIGTERM sends close frames to every client and syncs the log; with 100k
          # clients that takes a moment.
          TimeoutStopSec = "60s";

          User = "jetrelay";
          Group = "jetrelay";
          # data_dir defaults to $STATE_DIRECTORY.
          StateDirectory = "jetrelay";
          StateDirectoryMode = "0700";
          # Removed on stop (RuntimeDirectoryPreserve=no), so a restart never finds a
          # stale socket. The sidecar dials per connection and rides over the restart
          # like any client.
          RuntimeDirectory = "jetrelay";
          RuntimeDirectoryMode = "0750";
          # Files stay private to the relay's user; the relay makes the trusted socket
          # 0660 itself, for the sidecar in its group.
          UMask = "0077";
          ReadWritePaths = optional (cfg.settings.data_dir != null) cfg.settings.data_dir;

          # One descriptor per client, plus log segments; see limitNOFILE.
          LimitNOFILE = cfg.limitNOFILE;
          CPUQuota = mkIf (cfg.cpuQuota != null) cfg.cpuQuota;
          AllowedCPUs = mkIf (cfg.allowedCPUs != null) cfg.allowedCPUs;

          CapabilityBoundingSet = if relayNeedsBindCap then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
          AmbientCapabilities = if relayNeedsBindCap then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
          # Capabilities held inside a private user namespace do not count for the host
          # network namespace, so a privileged port rules it out.
          PrivateUsers = !relayNeedsBindCap;
        };
      };

      networking.firewall.allowedTCPPorts = optional (cfg.openFirewall && listenPort != null) listenPort;

      # LimitNOFILE above fs.nr_open makes the unit fail to start. systemd's PID 1 raises
      # nr_open to this same maximum at boot; stating it keeps the guarantee where that
      # bump does not happen (containers, other init setups) and never lowers it.
      boot.kernel.sysctl."fs.nr_open" = tuned (lib.max cfg.limitNOFILE 1073741816);
    }

    (mkIf (cfg.kernelTuning != "none") {
      boot.kernel.sysctl = {
        # Accept queue: after a restart or a failover every client reconnects within a
        # second or two; the default 4096 drops SYNs. A backlog costs memory only while
        # it holds connections.
        "net.core.somaxconn" = tuned 65535;
        # SYN queue for the same storm (and SYN cookies take over beyond it).
        "net.ipv4.tcp_max_syn_backlog" = tuned 65535;
      };
    })

    (mkIf (cfg.kernelTuning == "many-clients") {
      boot.kernel.sysctl = {
        # min/default/max send buffer per socket. Most clients are idle between ~1 KB
        # events: a small default keeps 100k sockets cheap, while autotuning still grows
        # a busy replaying socket to 1 MiB. A larger max only lets a slow client pin
        # more kernel memory.
        "net.ipv4.tcp_wmem" = tuned "4096 16384 1048576";
        # Clients send almost nothing (pings, options updates); the kernel default of
        # 128 KiB per socket is wasted 100k times. The max stays at the kernel's 6 MiB so
        # the one upstream connection can still autotune.
        "net.ipv4.tcp_rmem" = tuned "4096 16384 6291456";
        # Only 128 KiB of not-yet-sent data may sit in a socket: the relay learns early
        # that a client is slow instead of parking megabytes per laggard in the kernel.
        "net.ipv4.tcp_notsent_lowat" = tuned 131072;
      };
    })

    (mkIf (cfg.kernelTuning == "many-clients" && config.networking.firewall.enable) {
      # The firewall tracks every connection; one entry per client, and the default
      # (derived from RAM, often 65536) fills up with 100k clients, after which new
      # connections are dropped. A maximum, not an allocation. Loading the module at boot
      # makes the key exist when systemd-sysctl runs.
      boot.kernelModules = [ "nf_conntrack" ];
      boot.kernel.sysctl."net.netfilter.nf_conntrack_max" = tuned (
        lib.max 262144 (2 * (cfg.settings.max_clients or 100000))
      );
    })

    (mkIf tlsCfg.enable {
      assertions = [
        {
          assertion =
            lib.length (
              lib.filter lib.id [
                tlsCfg.enableACME
                (tlsCfg.useACMEHost != null)
                (tlsCfg.certFile != null || tlsCfg.keyFile != null)
              ]
            ) == 1;
          message = "services.jetrelay.tls needs exactly one of enableACME, useACMEHost, or certFile with keyFile.";
        }
        {
          assertion = (tlsCfg.certFile == null) == (tlsCfg.keyFile == null);
          message = "services.jetrelay.tls.certFile and services.jetrelay.tls.keyFile must be set together.";
        }
        {
          assertion = tlsCfg.enableACME -> tlsCfg.domain != null;
          message = "services.jetrelay.tls.enableACME needs services.jetrelay.tls.domain.";
        }
        {
          assertion = lib.hasPrefix "unix:${runtimeDirectory}/" (
            if cfg.settings.trusted_listen == null then "" else cfg.settings.trusted_listen
          );
          message = ''
            services.jetrelay.tls talks to the relay over a Unix socket in ${runtimeDirectory};
            services.jetrelay.settings.trusted_listen must be "unix:${runtimeDirectory}/<name>".
          '';
        }
      ];

      services.jetrelay.tls.settings = {
        backend = lib.mkDefault cfg.settings.trusted_listen;
        cert = mkIf (tlsCertFile != null) (lib.mkDefault [ tlsCertFile ]);
        key = mkIf (tlsKeyFile != null) (lib.mkDefault [ tlsKeyFile ]);
      };

      # The sidecar's user; its group owns explicit key files (root:jetrelay-tls 0640)
      # and the certificate an ACME order of this module produces.
      users.users.jetrelay-tls = {
        isSystemUser = true;
        group = "jetrelay-tls";
        description = "jetrelay TLS sidecar";
      };
      users.groups.jetrelay-tls = { };

      security.acme.certs = lib.optionalAttrs usesACME {
        ${acmeCertName} = mkMerge [
          { reloadServices = [ "jetrelay-tls.service" ]; }
          (mkIf tlsCfg.enableACME {
            listenHTTP = lib.mkDefault ":80";
            # Only the sidecar can read the key, not every acme consumer.
            group = lib.mkDefault "jetrelay-tls";
          })
        ];
      };

      systemd.services.jetrelay-tls = {
        description = "jetrelay TLS sidecar";
        wantedBy = [ "multi-user.target" ];
        # Wants, not Requires: a relay restart must not cycle the TLS listener; clients
        # reconnect through it with their cursor.
        wants = [ "jetrelay.service" ] ++ optional usesACME "acme-${acmeCertName}.service";
        # acme-<name>.service leaves a certificate (at worst a self-signed placeholder)
        # in place before the sidecar reads it.
        after = [
          "network.target"
          "jetrelay.service"
        ]
        ++ optional usesACME "acme-${acmeCertName}.service";

        serviceConfig = hardening // {
          Type = "notify";
          ExecStart = "${lib.getExe' cfg.package "jetrelay-tls"} --config ${tlsConfigFile}";
          # SIGHUP re-reads the certificate and key without dropping connections;
          # security.acme calls this after each renewal.
          ExecReload = "${lib.getExe' pkgs.coreutils "kill"} -HUP $MAINPID";
          Restart = "on-failure";
          RestartSec = "2s";

          User = "jetrelay-tls";
          Group = "jetrelay-tls";
          # The relay's group: enter /run/jetrelay and connect to the trusted socket.
          SupplementaryGroups = [
            "jetrelay"
          ]
          ++ optional (usesACME && acmeCert.group != "jetrelay-tls") acmeCert.group;

          # Two descriptors per client: the TLS side and the backend side.
          LimitNOFILE = cfg.limitNOFILE;

          CapabilityBoundingSet = [ "CAP_NET_BIND_SERVICE" ];
          AmbientCapabilities = [ "CAP_NET_BIND_SERVICE" ];
          # A private user namespace would make CAP_NET_BIND_SERVICE meaningless for the
          # host network namespace (port 443).
          PrivateUsers = false;
        };
      };

      networking.firewall.allowedTCPPorts = optionals tlsCfg.openFirewall (
        lib.filter (port: port != null) (map tcpPort tlsCfg.settings.listen)
        ++ optional tlsCfg.enableACME 80
      );
    })
  ]);

  meta.maintainers = [ ];
}
