# Evaluation tests of jetrelay's Nix files with the real module system (./default.nix):
# each attribute is `true`, or a string saying what is wrong. Run by .ci/nix-check with
# `nix-instantiate --read-write-mode --store <throwaway>` (generated files are read back).
{
  root ? ../..,
}:

let
  eval = import ./default.nix { inherit root; };
  inherit (eval) lib outputs;
  inherit (builtins)
    attrNames
    concatStringsSep
    filter
    fromJSON
    isString
    readFile
    toJSON
    tryEval
    deepSeq
    ;

  expect =
    what: actual: expected:
    if actual == expected then true else "${what}: expected ${toJSON expected}, got ${toJSON actual}";
  ok = what: cond: if cond then true else "${what}: false";
  allOf =
    results:
    let
      bad = filter (r: r != true) results;
    in
    if bad == [ ] then true else concatStringsSep "; " bad;
  # Whether evaluating `v` fully fails (a type error, a conflict, a throw).
  fails = v: !(tryEval (deepSeq v v)).success;

  flake = eval.flake;
  lock = fromJSON (readFile (root + "/flake.lock"));
  cargo = lib.importTOML (root + "/Cargo.toml");
  jetrelay = outputs.packages.x86_64-linux.default;

  # A system with the flake's module, the relay enabled, and `extra`.
  on = extra: eval.nixosWithJetrelay [
    { services.jetrelay.enable = true; }
    extra
  ];
  cfgOf = extra: (on extra).config;
  minimal = on { };
  sc = minimal.config.systemd.services.jetrelay.serviceConfig;
  sysctlOf = extra: (cfgOf extra).boot.kernel.sysctl;

  # The relay's TOML file as the module generates it, read back from the store.
  tomlOf =
    config: service:
    let
      exec = config.systemd.services.${service}.serviceConfig.ExecStart;
      file = lib.last (lib.splitString " " exec);
    in
    builtins.fromTOML (readFile file);

  certFiles = {
    services.jetrelay.tls = {
      enable = true;
      certFile = "/var/lib/certs/cert.pem";
      keyFile = "/var/lib/certs/key.pem";
      openFirewall = true;
    };
  };
  acmeTerms = {
    security.acme = {
      acceptTerms = true;
      defaults.email = "admin@example.org";
    };
  };
  tlsFiles = on certFiles;
  tlsAcme = on {
    imports = [ acmeTerms ];
    services.jetrelay.tls = {
      enable = true;
      domain = "relay.example.org";
      enableACME = true;
      openFirewall = true;
    };
  };
  tlsHost = on {
    imports = [ acmeTerms ];
    services.jetrelay.tls = {
      enable = true;
      useACMEHost = "example.org";
    };
    security.acme.certs."example.org".webroot = "/var/lib/acme/acme-challenge";
  };

  # systemd's rule for a unit's user and groups (src/core/dynamic-user.c, execute.c):
  # with DynamicUser=, a name that is a static group but not a static user is refused
  # (EILSEQ, exit 217/USER); without it, User=, Group= and every SupplementaryGroups=
  # entry must exist. `extraGroups` are the groups that exist outside this evaluation
  # (a NixOS system's own, e.g. "acme" from the acme module).
  unitIdentityProblems =
    config: extraGroups:
    let
      users = attrNames config.users.users;
      groups = attrNames config.users.groups ++ extraGroups;
      check =
        name: service:
        let
          s = service.serviceConfig;
          dynamic = s.DynamicUser or false;
          user = s.User or null;
          group = s.Group or null;
          supplementary = s.SupplementaryGroups or [ ];
        in
        lib.optional (
          dynamic && user != null && !(builtins.elem user users) && builtins.elem user groups
        ) "${name}: DynamicUser with User=${user}, a static group but no static user (217/USER)"
        ++ lib.optional (
          dynamic && group != null && group != user && !(builtins.elem group groups) && builtins.elem group users
        ) "${name}: DynamicUser with Group=${group}, a static user but no static group"
        ++ lib.optional (
          !dynamic && user != null && !(builtins.elem user users) && user != "root"
        ) "${name}: User=${user} does not exist"
        ++ lib.optional (
          !dynamic && group != null && !(builtins.elem group groups) && group != "root"
        ) "${name}: Group=${group} does not exist"
        ++ map (g: "${name}: SupplementaryGroups=${g} does not exist") (
          filter (g: !(builtins.elem g groups)) supplementary
        );
      userGroups = lib.concatLists (
        lib.mapAttrsToList (
          name: u:
          lib.optional (u.group != "" && !(builtins.elem u.group groups)) "users.users.${name}.group ${u.group} does not exist"
        ) config.users.users
      );
    in
    lib.concatLists (lib.mapAttrsToList check config.systemd.services) ++ userGroups;
  identityHolds =
    what: evaluated: extraGroups:
    expect "${what}: users, groups and units" (unitIdentityProblems evaluated.config extraGroups) [ ];

  vmNodes = lib.concatLists (
    lib.mapAttrsToList (
      test: t: lib.mapAttrsToList (node: n: { name = "vm-${test}.${node}"; value = n; }) t.nodes
    ) eval.vmTests
  );
  memoryOf = t: lib.foldl' (sum: n: sum + n.config.virtualisation.memorySize) 0 (lib.attrValues t.nodes);
in
{
  flake-input = expect "nixpkgs url" flake.inputs.nixpkgs.url "github:NixOS/nixpkgs/nixos-26.05";

  # The pin the issue gives, as it appears in independent public flake.lock files.
  flake-lock-pin = allOf [
    (expect "version" lock.version 7)
    (expect "nodes" (attrNames lock.nodes) [
      "nixpkgs"
      "root"
    ])
    (expect "locked" lock.nodes.nixpkgs.locked {
      lastModified = 1784432872;
      narHash = "sha256-n3gKTBIV4ZA5VQpUakffBe3KGu4+mhPoA34rrqS0GkA=";
      owner = "NixOS";
      repo = "nixpkgs";
      rev = "fd1462031fdee08f65fd0b4c6b64e22239a77870";
      type = "github";
    })
    (
      let
        o = lock.nodes.nixpkgs.original;
      in
      expect "original matches the input" "${o.type}:${o.owner}/${o.repo}/${o.ref}" flake.inputs.nixpkgs.url
    )
  ];

  outputs-attributes = allOf [
    (expect "checks" (attrNames outputs.checks.x86_64-linux) [
      "app-demo"
      "app-follow"
      "clippy"
      "fmt"
      "package"
      "vm-basic"
      "vm-fleet"
      "vm-hardening"
      "vm-tls"
    ])
    (expect "packages" (attrNames outputs.packages.x86_64-linux) [
      "default"
      "jetrelay"
    ])
    (expect "apps" (attrNames outputs.apps.x86_64-linux) [
      "default"
      "demo"
    ])
  ];

  package-identity = allOf [
    (expect "pname" jetrelay.pname "jetrelay")
    (expect "version follows Cargo.toml" jetrelay.version cargo.package.version)
    (expect "mainProgram" jetrelay.meta.mainProgram "jetrelay")
  ];

  # The check phase: tools the tests it runs call, and one test thread (the cargo check
  # hook passes --test-threads=$NIX_BUILD_CORES otherwise; .cargo/config.toml's
  # RUST_TEST_THREADS is not in the source and would be overridden by that flag anyway).
  package-check-phase = allOf [
    (expect "dontUseCargoParallelTests" (jetrelay.dontUseCargoParallelTests or false) true)
    (expect "tools for the tests" (map (d: d.name) (jetrelay.nativeCheckInputs or [ ])) [
      "openssl"
      "python3-env"
      "util-linux"
    ])
    (ok "every flag is a --skip" (lib.all (f: lib.hasPrefix "--skip=" f) jetrelay.checkFlags))
    # Every test target named exists (tests/<name>.rs).
    (ok "test targets exist" (
      lib.all (t: builtins.pathExists (root + "/tests/${t}.rs")) (
        lib.filter (f: !(lib.hasPrefix "--" f)) jetrelay.cargoTestFlags
      )
    ))
  ];

  package-source-set =
    let
      files = map toString (lib.fileset.toList jetrelay.passthru.sourceFiles);
      has = path: builtins.elem (toString (root + path)) files;
      under = dir: lib.any (f: lib.hasPrefix (toString (root + dir) + "/") f) files;
    in
    allOf [
      (ok "Cargo.toml and Cargo.lock" (has "/Cargo.toml" && has "/Cargo.lock"))
      (ok "src, assets and tests" (under "/src" && under "/assets" && under "/tests"))
      (ok "the Python interop client" (has "/tests/interop/websockets_client.py"))
      (ok "nothing Nix-only" (!(under "/nix" || under "/nixos" || under "/vm-tests" || has "/flake.nix")))
    ];

  minimal-relay-unit = allOf [
    (expect "Type" sc.Type "notify")
    (expect "User" sc.User "jetrelay")
    (expect "Group" sc.Group "jetrelay")
    (expect "no DynamicUser" (sc ? DynamicUser) false)
    (expect "WatchdogSec" sc.WatchdogSec "30s")
    (expect "Restart" sc.Restart "on-failure")
    (expect "no capability" sc.CapabilityBoundingSet [ "" ])
    (expect "PrivateUsers" sc.PrivateUsers true)
    (expect "failed assertions" minimal.failedAssertions [ ])
    (expect "warnings" minimal.warnings [ ])
  ];

  minimal-relay-toml = expect "TOML" (tomlOf minimal.config "jetrelay") {
    listen = "[::]:6008";
    metrics_listen = "127.0.0.1:6009";
    retention = "24h";
    max_disk = "20GiB";
  };

  settings-rfc42 = allOf [
    (expect "freeform keys pass through, nulls are left out"
      (tomlOf (cfgOf {
        services.jetrelay.settings = {
          upstream = [ "ws://upstream:6010/subscribe" ];
          workers = 4;
          max_clients = 5000;
          allow_ip = [ "10.0.0.0/8" ];
        };
      }) "jetrelay")
      {
        listen = "[::]:6008";
        metrics_listen = "127.0.0.1:6009";
        retention = "24h";
        max_disk = "20GiB";
        upstream = [ "ws://upstream:6010/subscribe" ];
        workers = 4;
        max_clients = 5000;
        allow_ip = [ "10.0.0.0/8" ];
      }
    )
    (ok "max_disk \"lots\" is refused" (fails (cfgOf { services.jetrelay.settings.max_disk = "lots"; }).services.jetrelay.settings))
    (ok "workers 0 is refused" (fails (cfgOf { services.jetrelay.settings.workers = 0; }).services.jetrelay.settings))
    (ok "an empty upstream list is refused" (
      fails (cfgOf { services.jetrelay.settings.upstream = [ ]; }).services.jetrelay.settings
    ))
    (ok "keyFile in the store is refused" (
      fails (cfgOf { services.jetrelay.tls.keyFile = "/nix/store/00000000000000000000000000000000-key.pem"; }).services.jetrelay.tls.keyFile
    ))
    (ok "an empty sidecar listen list is refused" (
      fails (cfgOf { services.jetrelay.tls.settings.listen = [ ]; }).services.jetrelay.tls.settings
    ))
  ];

  # Issue 20 item 5: `metrics_listen = ""` (documented as "disable") failed with toInt "".
  metrics-disabled =
    let
      c = on { services.jetrelay.settings.metrics_listen = ""; };
    in
    allOf [
      (expect "failed assertions" c.failedAssertions [ ])
      (expect "TOML says disabled" (tomlOf c.config "jetrelay").metrics_listen "")
      (expect "no capability" c.config.systemd.services.jetrelay.serviceConfig.CapabilityBoundingSet [ "" ])
    ];

  privileged-ports = allOf (
    map
      (
        settings:
        let
          s = (cfgOf { services.jetrelay.settings = settings; }).systemd.services.jetrelay.serviceConfig;
        in
        allOf [
          (expect "${toJSON settings}: CapabilityBoundingSet" s.CapabilityBoundingSet [ "CAP_NET_BIND_SERVICE" ])
          (expect "${toJSON settings}: PrivateUsers" s.PrivateUsers false)
        ]
      )
      [
        { listen = "[::]:80"; }
        { metrics_listen = "0.0.0.0:443"; }
        { trusted_listen = "[::1]:999"; }
      ]
  );

  # Issue 20 item 1: the user/group combination systemd accepts, for every unit of every
  # configuration here and of every VM test node.
  users-and-groups = allOf (
    [
      (identityHolds "minimal" minimal [ ])
      (identityHolds "tls with files" tlsFiles [ ])
      (identityHolds "tls with ACME" tlsAcme [ ])
      (identityHolds "tls with an ACME host" tlsHost [ "acme" ])
      (expect "users" (attrNames tlsFiles.config.users.users) [
        "jetrelay"
        "jetrelay-tls"
      ])
      (expect "groups" (attrNames tlsFiles.config.users.groups) [
        "jetrelay"
        "jetrelay-tls"
      ])
      (expect "NixOS's user assertions" tlsFiles.failedAssertions [ ])
    ]
    ++ map (n: identityHolds n.name n.value [ ]) vmNodes
  );

  # The stand-in's rule catches what issue 20 item 1 describes: a static group named like
  # a DynamicUser's user, no static user.
  users-and-groups-rule-catches-eilseq = ok "refused" (
    unitIdentityProblems
      (cfgOf {
        systemd.services.jetrelay.serviceConfig.DynamicUser = true;
        users.users = lib.mkForce { };
      })
      [ ]
    != [ ]
  );

  # Issue 20 item 5: two definitions of one sysctl at the same priority are an error on
  # NixOS, even when equal; the module's sit below mkDefault, so others win.
  sysctl-composes = allOf [
    (expect "another module's mkDefault wins" (sysctlOf {
      boot.kernel.sysctl."net.core.somaxconn" = lib.mkDefault 4096;
    })."net.core.somaxconn" 4096)
    (expect "an equal mkDefault elsewhere" (sysctlOf {
      boot.kernel.sysctl."net.core.somaxconn" = lib.mkDefault 65535;
    })."net.core.somaxconn" 65535)
    (expect "a plain definition wins" (sysctlOf {
      boot.kernel.sysctl."net.ipv4.tcp_max_syn_backlog" = 1024;
    })."net.ipv4.tcp_max_syn_backlog" 1024)
    (expect "fs.nr_open from elsewhere" (sysctlOf {
      boot.kernel.sysctl."fs.nr_open" = lib.mkDefault 2000000000;
    })."fs.nr_open" 2000000000)
    (expect "many-clients composes too" (sysctlOf {
      services.jetrelay.kernelTuning = "many-clients";
      boot.kernel.sysctl."net.ipv4.tcp_wmem" = lib.mkDefault "4096 65536 4194304";
    })."net.ipv4.tcp_wmem" "4096 65536 4194304")
    # The option really refuses two equal definitions at one priority: what made the
    # old mkDefault values break other modules.
    (ok "two equal mkDefaults still conflict" (
      fails (sysctlOf {
        imports = [
          { boot.kernel.sysctl."vm.swappiness" = lib.mkDefault 10; }
          { boot.kernel.sysctl."vm.swappiness" = lib.mkDefault 10; }
        ];
      })."vm.swappiness"
    ))
  ];

  kernel-tuning-levels = allOf [
    (expect "default: backlogs and nr_open" (attrNames (sysctlOf { })) [
      "fs.nr_open"
      "net.core.rmem_max"
      "net.core.somaxconn"
      "net.core.wmem_max"
      "net.ipv4.tcp_max_syn_backlog"
    ])
    (expect "default rendered" minimal.rendered.sysctl ''
      fs.nr_open=1073741816
      net.core.somaxconn=65535
      net.ipv4.tcp_max_syn_backlog=65535
    '')
    (expect "none: only nr_open" (cfgOf { services.jetrelay.kernelTuning = "none"; }).boot.kernel.sysctl."net.core.somaxconn" or null null)
    (
      let
        c = cfgOf { services.jetrelay.kernelTuning = "many-clients"; };
      in
      allOf [
        (expect "tcp_wmem" c.boot.kernel.sysctl."net.ipv4.tcp_wmem" "4096 16384 1048576")
        (expect "tcp_rmem" c.boot.kernel.sysctl."net.ipv4.tcp_rmem" "4096 16384 6291456")
        (expect "notsent_lowat" c.boot.kernel.sysctl."net.ipv4.tcp_notsent_lowat" 131072)
        (expect "conntrack" c.boot.kernel.sysctl."net.netfilter.nf_conntrack_max" 262144)
        (expect "conntrack module" c.boot.kernelModules [ "nf_conntrack" ])
        (ok "never tcp_mem or file-max" (!(c.boot.kernel.sysctl ? "net.ipv4.tcp_mem" || c.boot.kernel.sysctl ? "fs.file-max")))
      ]
    )
    (expect "nr_open follows a larger limit" (sysctlOf { services.jetrelay.limitNOFILE = 2000000000; })."fs.nr_open" 2000000000)
  ];

  firewall = allOf [
    (expect "closed by default" minimal.config.networking.firewall.allowedTCPPorts [ ])
    (expect "openFirewall" (cfgOf { services.jetrelay.openFirewall = true; }).networking.firewall.allowedTCPPorts [ 6008 ])
    (expect "tls" tlsFiles.config.networking.firewall.allowedTCPPorts [ 443 ])
    (expect "tls with ACME" tlsAcme.config.networking.firewall.allowedTCPPorts [
      443
      80
    ])
  ];

  resource-controls =
    let
      s = (cfgOf {
        services.jetrelay = {
          cpuQuota = "400%";
          allowedCPUs = "2-7";
        };
      }).systemd.services.jetrelay.serviceConfig;
    in
    allOf [
      (expect "CPUQuota" s.CPUQuota "400%")
      (expect "AllowedCPUs" s.AllowedCPUs "2-7")
      (expect "unset by default" (sc ? CPUQuota || sc ? AllowedCPUs) false)
    ];

  io-uring-disabled = allOf [
    (expect "2 is refused" (builtins.length (on { boot.kernel.sysctl."kernel.io_uring_disabled" = 2; }).failedAssertions) 1)
    (expect "1 warns" (builtins.length (on { boot.kernel.sysctl."kernel.io_uring_disabled" = 1; }).warnings) 1)
    (expect "0 is fine" (on { boot.kernel.sysctl."kernel.io_uring_disabled" = 0; }).failedAssertions [ ])
  ];

  tls-units =
    let
      c = tlsFiles.config;
      t = c.systemd.services.jetrelay-tls.serviceConfig;
      r = c.systemd.services.jetrelay.serviceConfig;
    in
    allOf [
      (expect "sidecar User" t.User "jetrelay-tls")
      (expect "sidecar joins the relay's group" t.SupplementaryGroups [ "jetrelay" ])
      (expect "sidecar capability" t.CapabilityBoundingSet [ "CAP_NET_BIND_SERVICE" ])
      (expect "relay UMask" r.UMask "0077")
      (expect "sidecar TOML" (tomlOf c "jetrelay-tls") {
        listen = [ "[::]:443" ];
        backend = "unix:/run/jetrelay/trusted.sock";
        cert = [ "/var/lib/certs/cert.pem" ];
        key = [ "/var/lib/certs/key.pem" ];
      })
      (expect "relay trusted_listen" (tomlOf c "jetrelay").trusted_listen "unix:/run/jetrelay/trusted.sock")
      (expect "failed assertions" tlsFiles.failedAssertions [ ])
    ];

  tls-acme = allOf [
    (expect "failed assertions" tlsAcme.failedAssertions [ ])
    (expect "reloadServices" tlsAcme.config.security.acme.certs."relay.example.org".reloadServices [ "jetrelay-tls.service" ])
    (expect "key group" tlsAcme.config.security.acme.certs."relay.example.org".group "jetrelay-tls")
    (expect "cert" tlsAcme.config.services.jetrelay.tls.settings.cert [ "/var/lib/acme/relay.example.org/fullchain.pem" ])
    (expect "wants" tlsAcme.config.systemd.services.jetrelay-tls.wants [
      "jetrelay.service"
      "acme-relay.example.org.service"
    ])
    (expect "acme host: joins its group" tlsHost.config.systemd.services.jetrelay-tls.serviceConfig.SupplementaryGroups [
      "jetrelay"
      "acme"
    ])
    (expect "acme host: failed assertions" tlsHost.failedAssertions [ ])
    (expect "ACME without accepted terms is refused" (
      builtins.length (on { services.jetrelay.tls = { enable = true; domain = "x.example"; enableACME = true; }; }).failedAssertions
    ) 2)
  ];

  tls-misconfigurations = allOf [
    (ok "no certificate source" ((on { services.jetrelay.tls.enable = true; }).failedAssertions != [ ]))
    (ok "certFile without keyFile" (
      (on {
        services.jetrelay.tls = {
          enable = true;
          certFile = "/var/lib/certs/cert.pem";
        };
      }).failedAssertions != [ ]
    ))
    (ok "a TCP trusted_listen with the sidecar" (
      (on {
        imports = [ certFiles ];
        services.jetrelay.settings.trusted_listen = "[::]:6011";
      }).failedAssertions != [ ]
    ))
    (ok "a unix: listen" ((on { services.jetrelay.settings.listen = "unix:/run/x.sock"; }).failedAssertions != [ ]))
  ];

  vm-nodes-evaluate = allOf (
    map (n: expect "${n.name}: failed assertions and warnings" (n.value.failedAssertions ++ n.value.warnings) [ ]) vmNodes
  );

  # What a workstation's `nix flake check` starts (see the README): no test over 4 GiB.
  vm-test-sizes = allOf (
    lib.mapAttrsToList (name: t: ok "vm-${name}: ${toString (memoryOf t)} MiB" (memoryOf t <= 4096)) eval.vmTests
  );

  # Raw material for the shell part of .ci/nix-check.
  scripts = lib.mapAttrs (_: t: t.testScript) eval.vmTests;
  nodeNames = lib.mapAttrs (_: t: attrNames t.nodes) eval.vmTests;
  units = {
    jetrelay = minimal.rendered.units."jetrelay.service";
    jetrelay-tls = tlsFiles.rendered.units."jetrelay-tls.service";
  };
  wrappers = {
    follow = outputs.checks.x86_64-linux.app-follow.text;
    demo = outputs.checks.x86_64-linux.app-demo.text;
  };
}
