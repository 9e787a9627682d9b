{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    literalExpression
    mkDefault
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
  configFile = settingsFormat.generate "jetrelay.toml" cfg.settings;
  tlsConfigFile = settingsFormat.generate "jetrelay-tls.toml" tlsCfg.settings;

  # The relay owns this directory; the sidecar only connects to the socket
  # in it (see the group discussion at users.groups below).
  runtimeDirectory = "/run/jetrelay";
  trustedSocket = "${runtimeDirectory}/trusted.sock";

  # "HOST:PORT" or "[V6]:PORT" -> PORT.
  portOf = address: lib.toInt (lib.last (lib.splitString ":" address));
  isUnix = lib.hasPrefix "unix:";
  privilegedTcp = address: address != null && !(isUnix address) && portOf address < 1024;

  # Every TCP listener the relay itself opens.
  relayListeners = [
    cfg.settings.listen
    (cfg.settings.metrics_listen or null)
    (cfg.settings.trusted_listen or null)
  ];
  # Binding below 1024 needs CAP_NET_BIND_SERVICE, and a capability only
  # counts in the host network namespace if the process is not inside a
  # private user namespace.
  relayNeedsBindCap = lib.any privilegedTcp relayListeners;

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

  # Shared by both units. Each line removes something neither process
  # needs; the relay adds the few things that need a comment of their own.
  hardening = {
    DynamicUser = true;
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
    # AF_UNIX: the trusted socket, sd_notify and the nscd socket that name
    # lookups go through. No AF_NETLINK: nothing here enumerates links.
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
    # @system-service includes @aio, which is where systemd files
    # io_uring_setup, io_uring_enter and io_uring_register, so the io_uring
    # fan-out runs under the filter unchanged. ~@resources removes
    # setrlimit/sched_setaffinity/set_mempolicy: limits and CPU placement
    # are systemd's job here (LimitNOFILE, AllowedCPUs, CPUQuota).
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
      "~@resources"
    ];
    # A filtered call fails with EPERM instead of killing the process, so
    # an optional call (e.g. a best-effort thread pinning) degrades.
    SystemCallErrorNumber = "EPERM";
    UMask = "0077";
  };
in
{
  options.services.jetrelay = {
    enable = mkEnableOption "jetrelay, a Jetstream relay that fans the Bluesky firehose out to many WebSocket clients";

    package = mkPackageOption pkgs "jetrelay" { };

    listen = mkOption {
      type = types.str;
      default = "[::]:6008";
      example = "127.0.0.1:6008";
      description = ''
        Address of the public plain-WebSocket listener (`GET /subscribe`).
        `[::]` accepts IPv4 and IPv6. Maps to `settings.listen`.
      '';
    };

    upstreams = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "wss://jetstream2.us-east.bsky.network/subscribe"
        "ws://10.0.0.5:6008/subscribe"
      ];
      description = ''
        Upstream Jetstream URLs, tried in turn on failure. The empty list
        keeps the relay's built-in list of the four public Bluesky
        Jetstream instances. Another jetrelay is a valid upstream. Maps to
        `settings.upstream`.
      '';
    };

    retention = mkOption {
      type = types.str;
      default = "24h";
      example = "72h";
      description = ''
        How long events are kept for cursor replay (`30s`, `10m`, `24h`).
        Maps to `settings.retention`.
      '';
    };

    maxDisk = mkOption {
      type = types.either types.ints.positive (types.strMatching "[0-9]+ *(B|KiB|MiB|GiB|TiB)?");
      default = "20GiB";
      example = "200GiB";
      description = ''
        Disk cap for all logs; the oldest segments go first when it is
        reached, even inside the retention window. Maps to
        `settings.max_disk`.
      '';
    };

    workers = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      example = 8;
      description = ''
        Fan-out worker threads. `null` lets the relay use one per CPU it
        may run on, which honours {option}`services.jetrelay.allowedCPUs`.
        Maps to `settings.workers`.
      '';
    };

    settings = mkOption {
      type = types.submodule { freeformType = settingsFormat.type; };
      default = { };
      example = literalExpression ''
        {
          metrics_listen = "[::1]:6009";
          max_clients = 200000;
          allow_ip = [ "10.0.0.0/8" ];
        }
      '';
      description = ''
        Relay configuration, written to a TOML file passed with
        `--config`. Keys are the relay's flag names with `-` replaced by
        `_`; see INTERFACES.md in the jetrelay repository. The typed
        options above set their keys with `mkDefault`, so a value here
        wins. `data_dir` defaults to the unit's state directory,
        {file}`/var/lib/jetrelay`.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the port of {option}`services.jetrelay.listen` in the firewall.";
    };

    limitNOFILE = mkOption {
      type = types.ints.positive;
      default = 1048576;
      description = ''
        File descriptor limit of the relay and the TLS sidecar. Every
        client is one descriptor in the relay (two in the sidecar), so this
        bounds the number of clients together with `max_clients`. The
        module keeps `fs.nr_open` at or above it, otherwise systemd could
        not apply it.
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
        systemd `AllowedCPUs=` of the relay, e.g. to keep it off the CPUs
        that take NIC interrupts. The default worker count follows it.
      '';
    };

    tuneKernel = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Set the sysctls a server with many mostly idle connections needs
        (listen backlogs, per-socket buffer sizes, TCP memory, unsent-data
        low-water mark, file and conntrack limits). Every value is a
        `mkDefault`, so a `boot.kernel.sysctl` setting of your own wins.
      '';
    };

    tls = {
      # The sidecar terminates TLS (wss://) and hands each connection to
      # the relay over a Unix socket, behind a PROXY protocol v2 header
      # that carries the client's address.
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
          Order a certificate for {option}`services.jetrelay.tls.domain`
          with `security.acme`, answering the HTTP-01 challenge with lego's
          built-in server on port 80. For DNS-01 or a certificate shared
          with a web server, declare it in `security.acme.certs` and use
          {option}`services.jetrelay.tls.useACMEHost`.
        '';
      };

      useACMEHost = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "example.org";
        description = ''
          Name of a certificate in `security.acme.certs` to serve. The
          sidecar joins the certificate's group to read the key, and the
          acme module reloads it after every renewal.
        '';
      };

      certFile = mkOption {
        type = types.nullOr (types.pathWith { absolute = true; });
        default = null;
        example = "/var/lib/jetrelay-certs/fullchain.pem";
        description = ''
          PEM certificate chain, when not using ACME. Replace the file and
          run `systemctl reload jetrelay-tls` to rotate it.
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
          PEM private key for {option}`services.jetrelay.tls.certFile`.
          It must be readable by the group `jetrelay-tls` (e.g.
          `root:jetrelay-tls`, mode `0640`) and must not be in the Nix
          store.
        '';
      };

      listen = mkOption {
        type = types.nonEmptyListOf types.str;
        default = [ "[::]:443" ];
        description = "Addresses the TLS sidecar listens on.";
      };

      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Open the ports of {option}`services.jetrelay.tls.listen`, and
          port 80 for the HTTP-01 challenge when
          {option}`services.jetrelay.tls.enableACME` is set.
        '';
      };

      settings = mkOption {
        type = types.submodule { freeformType = settingsFormat.type; };
        default = { };
        example = literalExpression ''
          {
            max_connections = 50000;
            idle_timeout = "300s";
          }
        '';
        description = ''
          Sidecar configuration (TOML, passed with `--config`). `listen`,
          `backend`, `cert` and `key` are filled in from the options above
          with `mkDefault`.
        '';
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
      ];

      warnings = optional (ioUringDisabled == 1) ''
        boot.kernel.sysctl."kernel.io_uring_disabled" is 1: only members of the group
        named by kernel.io_uring_group may use io_uring. Set users.groups.jetrelay.gid and
        kernel.io_uring_group to the same number, or the relay fails to start.
      '';

      services.jetrelay.settings = {
        listen = mkDefault cfg.listen;
        upstream = mkIf (cfg.upstreams != [ ]) (mkDefault cfg.upstreams);
        retention = mkDefault cfg.retention;
        # Always a string: "1073741824" reads as plain bytes.
        max_disk = mkDefault (toString cfg.maxDisk);
        workers = mkIf (cfg.workers != null) (mkDefault cfg.workers);
        trusted_listen = mkIf tlsCfg.enable (mkDefault "unix:${trustedSocket}");
      };

      # Why a static group next to DynamicUser: the relay and the sidecar
      # run under separate transient UIDs (the sidecar holds the private
      # key and CAP_NET_BIND_SERVICE; the relay parses untrusted WebSocket
      # traffic, and sharing one UID would let either signal or read the
      # other). The only thing they share is the trusted socket. The relay
      # runs with this group as its primary group (systemd reuses a static
      # group of the configured name instead of allocating one), so the
      # runtime directory and the socket in it belong to it; the sidecar
      # gets it as a supplementary group. A fixed GID also lets operators
      # name it in kernel.io_uring_group.
      users.groups.jetrelay = { };

      systemd.services.jetrelay = {
        description = "jetrelay Jetstream relay";
        wantedBy = [ "multi-user.target" ];
        # Upstream connections are retried by the relay itself, so it does
        # not wait for network-online.target.
        after = [ "network.target" ];

        serviceConfig = hardening // {
          Type = "notify";
          ExecStart = "${lib.getExe cfg.package} --config ${configFile}";
          # The relay sends WATCHDOG=1 whenever WATCHDOG_USEC is set; a
          # wedged fan-out loop is restarted instead of silently starving
          # every client.
          WatchdogSec = "30s";
          Restart = "on-failure";
          RestartSec = "2s";
          # SIGTERM sends close frames to every client and syncs the log;
          # with 100k clients that takes a moment.
          TimeoutStopSec = "60s";

          User = "jetrelay";
          Group = "jetrelay";
          # data_dir defaults to $STATE_DIRECTORY. With DynamicUser it lives
          # in /var/lib/private/jetrelay, which nothing else can enter.
          StateDirectory = "jetrelay";
          StateDirectoryMode = "0700";
          # Removed on stop (RuntimeDirectoryPreserve=no), so a restart
          # never finds a stale socket. The sidecar dials per connection
          # and rides over the restart like any client.
          RuntimeDirectory = "jetrelay";
          RuntimeDirectoryMode = "0750";
          # The trusted socket must be group-connectable for the sidecar;
          # bind(2) applies the umask to it. Files in the state directory
          # stay private regardless, since /var/lib/private is 0700.
          UMask = if tlsCfg.enable then "0007" else "0077";
          ReadWritePaths = optional (cfg.settings ? data_dir) cfg.settings.data_dir;

          # One descriptor per client, plus log segments; see limitNOFILE.
          LimitNOFILE = cfg.limitNOFILE;
          CPUQuota = mkIf (cfg.cpuQuota != null) cfg.cpuQuota;
          AllowedCPUs = mkIf (cfg.allowedCPUs != null) cfg.allowedCPUs;

          CapabilityBoundingSet = if relayNeedsBindCap then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
          AmbientCapabilities = if relayNeedsBindCap then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
          # Capabilities held inside a private user namespace do not count
          # for the host network namespace, so a privileged port rules it out.
          PrivateUsers = !relayNeedsBindCap;
        };
      };

      networking.firewall.allowedTCPPorts = optional cfg.openFirewall (portOf cfg.settings.listen);

      # LimitNOFILE above fs.nr_open makes the unit fail to start. systemd's
      # PID 1 raises nr_open to this same maximum at boot; stating it keeps
      # the guarantee where that bump does not happen (containers, other
      # init setups) and never lowers it for other services.
      boot.kernel.sysctl."fs.nr_open" = mkDefault (lib.max cfg.limitNOFILE 1073741816);
    }

    (mkIf cfg.tuneKernel {
      boot.kernel.sysctl = {
        # Accept queue: after a restart or a failover every client
        # reconnects within a second or two; the default 4096 drops SYNs.
        "net.core.somaxconn" = mkDefault 65535;
        # SYN queue for the same storm (and SYN cookies take over beyond it).
        "net.ipv4.tcp_max_syn_backlog" = mkDefault 65535;
        # min/default/max send buffer per socket. Most clients are idle
        # between ~1 KB events: a small default keeps 100k sockets cheap,
        # while autotuning still grows a busy replaying socket to 1 MiB.
        # A larger max only lets a slow client pin more kernel memory.
        "net.ipv4.tcp_wmem" = mkDefault "4096 16384 1048576";
        # Clients send almost nothing (pings, options updates); the kernel
        # default of 128 KiB per socket is wasted 100k times. The max
        # stays high so the one upstream connection can still autotune.
        "net.ipv4.tcp_rmem" = mkDefault "4096 16384 6291456";
        # Total TCP memory in 4 KiB pages (no pressure / pressure / hard
        # limit): 1.5, 2 and 3 GiB, sized for the 8 GiB+ hosts a 100k-client
        # relay runs on. Under pressure the kernel shrinks buffers of the
        # idle majority instead of failing allocations.
        "net.ipv4.tcp_mem" = mkDefault "393216 524288 786432";
        # Only 128 KiB of not-yet-sent data may sit in a socket: the relay
        # learns early that a client is slow (and can skip or drop it)
        # instead of parking megabytes per laggard in the kernel.
        "net.ipv4.tcp_notsent_lowat" = mkDefault 131072;
        # System-wide open files: the relay's limit, the sidecar's two per
        # TLS client, and the rest of the host. A finite cap (PID 1 would
        # otherwise set LONG_MAX) makes an fd leak fail with ENFILE rather
        # than eat kernel memory.
        "fs.file-max" = mkDefault (4 * cfg.limitNOFILE);
      };
    })

    (mkIf (cfg.tuneKernel && config.networking.firewall.enable) {
      # The firewall tracks every connection; one entry per client, and the
      # default (derived from RAM, often 65536) fills up with 100k clients,
      # after which new connections are dropped. Loading the module at boot
      # makes the key exist when systemd-sysctl runs.
      boot.kernelModules = [ "nf_conntrack" ];
      boot.kernel.sysctl."net.netfilter.nf_conntrack_max" = mkDefault (
        lib.max 262144 (2 * (cfg.settings.max_clients or 100000))
      );
    })

    (mkIf tlsCfg.enable {
      assertions = [
        {
          assertion = lib.length (lib.filter lib.id [
            tlsCfg.enableACME
            (tlsCfg.useACMEHost != null)
            (tlsCfg.certFile != null || tlsCfg.keyFile != null)
          ]) == 1;
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
          assertion = lib.hasPrefix "unix:${runtimeDirectory}/" (cfg.settings.trusted_listen or "");
          message = ''
            services.jetrelay.tls talks to the relay over a Unix socket in ${runtimeDirectory};
            services.jetrelay.settings.trusted_listen must be "unix:${runtimeDirectory}/<name>".
          '';
        }
      ];

      services.jetrelay.tls.settings = {
        listen = mkDefault tlsCfg.listen;
        backend = mkDefault cfg.settings.trusted_listen;
        cert = mkIf (tlsCertFile != null) (mkDefault [ tlsCertFile ]);
        key = mkIf (tlsKeyFile != null) (mkDefault [ tlsKeyFile ]);
      };

      # Owner of explicit key files (root:jetrelay-tls 0640), and the
      # group an ACME certificate ordered by this module is issued to.
      users.groups.jetrelay-tls = { };

      security.acme.certs = lib.optionalAttrs usesACME {
        ${acmeCertName} = mkMerge [
          { reloadServices = [ "jetrelay-tls.service" ]; }
          (mkIf tlsCfg.enableACME {
            listenHTTP = mkDefault ":80";
            # Only the sidecar can read the key, not every acme consumer.
            group = mkDefault "jetrelay-tls";
          })
        ];
      };

      systemd.services.jetrelay-tls = {
        description = "jetrelay TLS sidecar";
        wantedBy = [ "multi-user.target" ];
        # Wants, not Requires: a relay restart must not cycle the TLS
        # listener; clients reconnect through it with their cursor.
        wants = [ "jetrelay.service" ] ++ optional usesACME "acme-${acmeCertName}.service";
        # acme-<name>.service leaves a certificate (at worst a self-signed
        # placeholder) in place before the sidecar reads it.
        after = [
          "network.target"
          "jetrelay.service"
        ]
        ++ optional usesACME "acme-${acmeCertName}.service";

        serviceConfig = hardening // {
          Type = "notify";
          ExecStart = "${lib.getExe' cfg.package "jetrelay-tls"} --config ${tlsConfigFile}";
          # SIGHUP re-reads the certificate and key without dropping
          # connections; security.acme calls this after each renewal.
          ExecReload = "${lib.getExe' pkgs.coreutils "kill"} -HUP $MAINPID";
          Restart = "on-failure";
          RestartSec = "2s";

          User = "jetrelay-tls";
          Group = "jetrelay-tls";
          SupplementaryGroups = [
            "jetrelay"
          ]
          ++ optional (usesACME && acmeCert.group != "jetrelay-tls") acmeCert.group;

          # Two descriptors per client: the TLS side and the backend side.
          LimitNOFILE = cfg.limitNOFILE;

          CapabilityBoundingSet = [ "CAP_NET_BIND_SERVICE" ];
          AmbientCapabilities = [ "CAP_NET_BIND_SERVICE" ];
          # A private user namespace would make CAP_NET_BIND_SERVICE
          # meaningless for the host network namespace (port 443).
          PrivateUsers = false;
        };
      };

      networking.firewall.allowedTCPPorts = optionals tlsCfg.openFirewall (
        map portOf tlsCfg.listen ++ optional tlsCfg.enableACME 80
      );
    })
  ]);

  meta.maintainers = [ ];
}
