# Evaluates jetrelay's Nix files with the real module system (nix/vendor/nixpkgs-lib)
# against the NixOS option declarations in ./nixos-options.nix and the stand-in package
# set in ./pkgs.nix, and renders what a NixOS system would deploy from a configuration:
# unit files, users, groups, tmpfiles rules and sysctls, as NixOS writes them.
#
#   nix-instantiate --eval --strict --json nix/eval -A vmTests.tls.nodes.relay.rendered
#
# Used by .ci/nix-check (evaluation tests, ./checks.nix), .ci/nixos-render (a Debian
# guest booted with exactly these units) and tests/vm_twins.rs (the HAProxy config and
# the relay TOML the VM tests deploy).
{
  root ? ../..,
  system ? "x86_64-linux",
}:

let
  lib = import ../vendor/nixpkgs-lib/lib;
  systems = [
    "aarch64-linux"
    "x86_64-linux"
  ];
  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs systems (system: import ./pkgs.nix { inherit lib system root; });
  };
  pkgs = nixpkgs.legacyPackages.${system};

  flake = import (root + "/flake.nix");
  outputs = flake.outputs {
    self = outputs;
    inherit nixpkgs;
  };

  # nixos/lib/systemd-lib.nix: `Key=value` lines, lists repeated, booleans as words.
  toOption =
    value:
    if value == true then
      "true"
    else if value == false then
      "false"
    else
      toString value;
  section =
    attrs:
    lib.concatStrings (
      lib.concatLists (
        lib.mapAttrsToList (name: value: map (v: "${name}=${toOption v}\n") (lib.toList value)) attrs
      )
    );
  # The unit file NixOS writes for systemd.services.<name>.
  serviceUnit =
    service:
    let
      unit = lib.filterAttrs (_: v: v != null) (
        {
          Description = if service.description == "" then null else service.description;
          After = if service.after == [ ] then null else toString service.after;
          Before = if service.before == [ ] then null else toString service.before;
          Wants = if service.wants == [ ] then null else toString service.wants;
          Requires = if service.requires == [ ] then null else toString service.requires;
          BindsTo = if service.bindsTo == [ ] then null else toString service.bindsTo;
          PartOf = if service.partOf == [ ] then null else toString service.partOf;
          Conflicts = if service.conflicts == [ ] then null else toString service.conflicts;
        }
        // service.unitConfig
      );
      environment = lib.mapAttrsToList (name: value: builtins.toJSON "${name}=${toString value}") (
        lib.filterAttrs (_: v: v != null) service.environment
      );
    in
    "[Unit]\n"
    + section unit
    + "\n[Service]\n"
    + lib.concatMapStrings (e: "Environment=${e}\n") environment
    + section service.serviceConfig;

  render =
    config:
    let
      services = lib.filterAttrs (_: s: s.enable) config.systemd.services;
      # target -> the units it pulls in, as NixOS links them under <target>.wants/.
      links =
        attr:
        lib.foldl' (
          acc: name:
          lib.foldl' (
            acc': target: acc' // { ${target} = (acc'.${target} or [ ]) ++ [ "${name}.service" ]; }
          ) acc services.${name}.${attr}
        ) { } (lib.attrNames services);
    in
    {
      units = lib.mapAttrs' (name: s: lib.nameValuePair "${name}.service" (serviceUnit s)) services;
      wants = links "wantedBy";
      requires = links "requiredBy";
      users = lib.mapAttrs (_: u: {
        inherit (u)
          uid
          group
          extraGroups
          isSystemUser
          isNormalUser
          description
          home
          createHome
          ;
      }) config.users.users;
      groups = lib.mapAttrs (_: g: { inherit (g) gid members; }) config.users.groups;
      # nixos/modules/config/sysctl.nix: /etc/sysctl.d/60-nixos.conf.
      sysctl = lib.concatStrings (
        lib.mapAttrsToList (
          name: value: lib.optionalString (value != null) "${name}=${if value == false then "0" else toString value}\n"
        ) config.boot.kernel.sysctl
      );
      tmpfiles = lib.concatMapStrings (rule: rule + "\n") config.systemd.tmpfiles.rules;
      kernelModules = config.boot.kernelModules;
      hostName = config.networking.hostName;
    };

  # Like nixpkgs.lib.nixosSystem, without NixOS's own modules: the option declarations
  # the jetrelay files use instead, and the stand-in pkgs.
  nixos =
    modules:
    let
      evaluated = lib.evalModules {
        modules = [
          ./nixos-options.nix
          { _module.args.pkgs = pkgs; }
        ]
        ++ modules;
      };
      inherit (evaluated) config;
    in
    {
      inherit config;
      inherit (evaluated) options;
      failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
      inherit (config) warnings;
      rendered = render config;
    };

  # A VM test's arguments and each node as the test driver configures it: the test's
  # `defaults`, the node's module, and the node's name as its host name.
  vmTest =
    name:
    let
      args = outputs.checks.${system}."vm-${name}".testArgs;
    in
    args
    // {
      nodes = lib.mapAttrs (
        nodeName: node:
        nixos [
          (args.defaults or { })
          node
          { networking.hostName = nodeName; }
        ]
      ) args.nodes;
    };
in
{
  inherit
    lib
    pkgs
    flake
    outputs
    nixos
    render
    ;
  # With the flake's module, as a system flake imports it.
  nixosWithJetrelay = modules: nixos ([ outputs.nixosModules.default ] ++ modules);
  vmTests = lib.genAttrs [
    "basic"
    "tls"
    "fleet"
    "hardening"
  ] vmTest;
}
