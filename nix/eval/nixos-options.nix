# Declarations of the NixOS options that nixos/module.nix and the VM test nodes use,
# written for evaluating them with the real module system (nix/vendor/nixpkgs-lib)
# where no nixpkgs checkout is available. Each option has the type NixOS gives it, so
# that merging, priorities and type errors behave as on NixOS: in particular
# boot.kernel.sysctl takes one definition per key at the winning priority (two equal
# mkDefaults conflict), systemd unit settings concatenate lists and demand that scalars
# agree, and users.users carries the assertions NixOS makes about system users.
# Written from the NixOS manual and option documentation (nixpkgs 25.11/26.05); where
# NixOS derives something (a unit's ExecStart from `script`, its PATH from `path`), the
# derivation is reproduced, and what a NixOS system would add on its own (its default
# services, /etc) is not.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkOption types;

  # nixos/modules/config/sysctl.nix: a bool, string, int or null per key, one definition.
  sysctlValue = lib.mkOptionType {
    name = "sysctl option value";
    check =
      value:
      let
        scalar = v: builtins.isBool v || builtins.isString v || builtins.isInt v || v == null;
      in
      scalar value || (value._type or "" == "override" && scalar value.content);
    merge = loc: defs: lib.mergeOneOption loc (lib.filterOverrides defs);
  };
  # The two keys NixOS declares itself merge to the largest value asked for.
  largestOf =
    description:
    mkOption {
      type = types.nullOr types.ints.unsigned // {
        merge =
          _loc: defs:
          lib.foldl (acc: def: if def.value == null then null else lib.max acc def.value) 0 (
            lib.filterOverrides defs
          );
      };
      default = null;
      inherit description;
    };

  # nixos/lib/systemd-unit-options.nix: lists concatenate; anything else must agree.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (def: builtins.isList def.value) defs' then
        lib.concatMap (def: lib.toList def.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };
  # NixOS checks these two [Service] keys at evaluation time.
  serviceChecks =
    section:
    lib.all lib.id [
      (
        !(section ? Type)
        || builtins.elem section.Type [
          "exec"
          "simple"
          "forking"
          "oneshot"
          "dbus"
          "notify"
          "notify-reload"
          "idle"
        ]
      )
      (
        !(section ? Restart)
        || builtins.elem section.Restart [
          "no"
          "on-success"
          "on-failure"
          "on-abnormal"
          "on-abort"
          "always"
        ]
      )
    ];
  unitNames = mkOption {
    type = types.listOf types.str;
    default = [ ];
  };

  serviceModule =
    { name, config, ... }:
    {
      options = {
        enable = mkOption {
          type = types.bool;
          default = true;
        };
        description = mkOption {
          type = types.str;
          default = "";
        };
        wantedBy = unitNames;
        requiredBy = unitNames;
        upheldBy = unitNames;
        after = unitNames;
        before = unitNames;
        wants = unitNames;
        requires = unitNames;
        bindsTo = unitNames;
        partOf = unitNames;
        conflicts = unitNames;
        unitConfig = mkOption {
          type = types.attrsOf unitOption;
          default = { };
        };
        serviceConfig = mkOption {
          type = types.addCheck (types.attrsOf unitOption) serviceChecks;
          default = { };
        };
        environment = mkOption {
          type =
            with types;
            attrsOf (
              nullOr (oneOf [
                str
                path
                package
              ])
            );
          default = { };
        };
        path = mkOption {
          type = with types; listOf (oneOf [
            package
            str
          ]);
          default = [ ];
        };
        script = mkOption {
          type = types.lines;
          default = "";
        };
        preStart = mkOption {
          type = types.lines;
          default = "";
        };
        restartTriggers = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        reloadTriggers = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        restartIfChanged = mkOption {
          type = types.bool;
          default = true;
        };
        startLimitIntervalSec = mkOption {
          type = types.nullOr types.int;
          default = null;
        };
      };
      # What NixOS derives for every service: the tools on its PATH, and ExecStart /
      # ExecStartPre scripts from `script` / `preStart` (a `#!bash -e` file in the store).
      config = {
        path = [
          pkgs.coreutils
          pkgs.findutils
          pkgs.gnugrep
          pkgs.gnused
          pkgs.systemd
        ];
        environment.PATH = "${lib.makeBinPath config.path}:${lib.makeSearchPathOutput "bin" "sbin" config.path}";
        serviceConfig = lib.mkMerge [
          (lib.mkIf (config.script != "") {
            ExecStart = "${pkgs.writeShellScriptBin "${name}-start" config.script}/bin/${name}-start";
          })
          (lib.mkIf (config.preStart != "") {
            ExecStartPre = [ "${pkgs.writeShellScriptBin "${name}-pre-start" config.preStart}/bin/${name}-pre-start" ];
          })
        ];
      };
    };

  userModule =
    { name, ... }:
    {
      options = {
        name = mkOption {
          type = types.str;
          default = name;
        };
        uid = mkOption {
          type = types.nullOr types.int;
          default = null;
        };
        group = mkOption {
          type = types.str;
          default = "";
        };
        extraGroups = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        isSystemUser = mkOption {
          type = types.bool;
          default = false;
        };
        isNormalUser = mkOption {
          type = types.bool;
          default = false;
        };
        description = mkOption {
          type = types.str;
          default = "";
        };
        home = mkOption {
          type = types.path;
          default = "/var/empty";
        };
        createHome = mkOption {
          type = types.bool;
          default = false;
        };
      };
    };

  groupModule =
    { name, ... }:
    {
      options = {
        name = mkOption {
          type = types.str;
          default = name;
        };
        gid = mkOption {
          type = types.nullOr types.int;
          default = null;
        };
        members = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
      };
    };

  acmeCertModule =
    { name, ... }:
    {
      options = {
        directory = mkOption {
          type = types.str;
          default = "/var/lib/acme/${name}";
        };
        group = mkOption {
          type = types.str;
          default = "acme";
        };
        reloadServices = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        listenHTTP = mkOption {
          type = types.nullOr types.str;
          default = null;
        };
        webroot = mkOption {
          type = types.nullOr types.path;
          default = null;
        };
        dnsProvider = mkOption {
          type = types.nullOr types.str;
          default = null;
        };
        email = mkOption {
          type = types.nullOr types.str;
          default = config.security.acme.defaults.email;
        };
      };
    };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
      internal = true;
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
      internal = true;
    };
    meta.maintainers = mkOption {
      type = types.listOf types.raw;
      default = [ ];
    };

    boot.kernel.sysctl = mkOption {
      type = types.submodule {
        freeformType = types.attrsOf sysctlValue;
        options."net.core.rmem_max" = largestOf "The maximum socket receive buffer size.";
        options."net.core.wmem_max" = largestOf "The maximum socket send buffer size.";
      };
      default = { };
    };
    boot.kernelModules = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    networking.hostName = mkOption {
      type = types.str;
      default = "nixos";
    };
    networking.firewall.enable = mkOption {
      type = types.bool;
      default = true;
    };
    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };

    environment.systemPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
    };

    users.users = mkOption {
      type = types.attrsOf (types.submodule userModule);
      default = { };
    };
    users.groups = mkOption {
      type = types.attrsOf (types.submodule groupModule);
      default = { };
    };

    systemd.services = mkOption {
      type = types.attrsOf (types.submodule serviceModule);
      default = { };
    };
    systemd.tmpfiles.rules = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    security.acme.acceptTerms = mkOption {
      type = types.bool;
      default = false;
    };
    security.acme.defaults.email = mkOption {
      type = types.nullOr types.str;
      default = null;
    };
    security.acme.certs = mkOption {
      type = types.attrsOf (types.submodule acmeCertModule);
      default = { };
    };
    security.pki.certificateFiles = mkOption {
      type = types.listOf types.path;
      default = [ ];
    };

    services.haproxy.enable = mkOption {
      type = types.bool;
      default = false;
    };
    services.haproxy.config = mkOption {
      type = types.nullOr types.lines;
      default = null;
    };

    # The VM tests' machine sizes (nixos/modules/virtualisation/qemu-vm.nix), in MiB.
    virtualisation.memorySize = mkOption {
      type = types.ints.positive;
      default = 1024;
    };
    virtualisation.cores = mkOption {
      type = types.ints.positive;
      default = 1;
    };
    virtualisation.diskSize = mkOption {
      type = types.ints.positive;
      default = 1024;
    };

    system.stateVersion = mkOption {
      type = types.str;
      default = "26.05";
    };
  };

  config = {
    # nixos/modules/config/users-groups.nix
    assertions = lib.concatLists (
      lib.mapAttrsToList (name: user: [
        {
          assertion =
            let
              system = user.isSystemUser || (user.uid != null && user.uid < 1000 && !user.isNormalUser);
            in
            system != user.isNormalUser;
          message = "Exactly one of users.users.${name}.isSystemUser and users.users.${name}.isNormalUser must be set.";
        }
        {
          assertion = user.group != "";
          message = "users.users.${name}.group is unset.";
        }
      ]) config.users.users
    )
    # nixos/modules/security/acme: the CA's terms and a contact address.
    ++ lib.optionals (config.security.acme.certs != { }) [
      {
        assertion = config.security.acme.acceptTerms;
        message = "You must accept the CA's terms of service before using the ACME module by setting security.acme.acceptTerms to true.";
      }
      {
        assertion = lib.all (cert: cert.email != null) (lib.attrValues config.security.acme.certs);
        message = "You must define security.acme.certs.<name>.email or security.acme.defaults.email to register with the CA.";
      }
    ];
  };
}
