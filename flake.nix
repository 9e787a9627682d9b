{
  description = "jetrelay: a Jetstream relay that fans the Bluesky firehose out to tens of thousands of WebSocket clients with io_uring";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      # io_uring and splice(2) make the relay Linux-only.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];

      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      jetrelayFor = pkgs: self.packages.${pkgs.stdenv.hostPlatform.system}.jetrelay;
      appsFor = pkgs: pkgs.callPackage ./nix/apps.nix { jetrelay = jetrelayFor pkgs; };
    in
    {
      overlays.default = final: _prev: {
        jetrelay = final.callPackage ./nix/package.nix { };
      };

      packages = forAllSystems (
        pkgs:
        let
          jetrelay = pkgs.callPackage ./nix/package.nix { };
        in
        {
          inherit jetrelay;
          default = jetrelay;
        }
      );

      apps = forAllSystems (
        pkgs:
        let
          wrappers = appsFor pkgs;
        in
        {
          default = {
            type = "app";
            program = lib.getExe wrappers.follow;
            meta.description = "Relay the public Bluesky Jetstream on 127.0.0.1:6008";
          };
          demo = {
            type = "app";
            program = lib.getExe wrappers.demo;
            meta.description = "Run jetrelay offline against its built-in simulated upstream";
          };
        }
      );

      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nixos/module.nix ];
          # Built with the system's own nixpkgs, so the module works without
          # the overlay and with read-only pkgs (e.g. in NixOS tests).
          services.jetrelay.package = lib.mkDefault (pkgs.callPackage ./nix/package.nix { });
        };
      nixosModules.jetrelay = self.nixosModules.default;

      checks = forAllSystems (
        pkgs:
        let
          jetrelay = jetrelayFor pkgs;
          lint = pkgs.callPackage ./nix/lint.nix { inherit jetrelay; };
          vmTest =
            file:
            import file {
              inherit pkgs jetrelay;
              module = self.nixosModules.default;
            };
        in
        {
          package = jetrelay;
          inherit (lint) clippy fmt;
          # writeShellApplication runs shellcheck on the wrappers.
          app-follow = (appsFor pkgs).follow;
          app-demo = (appsFor pkgs).demo;
          vm-basic = vmTest ./vm-tests/basic.nix;
          vm-tls = vmTest ./vm-tests/tls.nix;
          vm-fleet = vmTest ./vm-tests/fleet.nix;
          vm-hardening = vmTest ./vm-tests/hardening.nix;
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ (jetrelayFor pkgs) ];
          packages = with pkgs; [
            clippy
            rustfmt
            rust-analyzer
            nixfmt
            openssl
          ];
          env.RUST_SRC_PATH = "${pkgs.rustPlatform.rustLibSrc}";
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree);
    };
}
