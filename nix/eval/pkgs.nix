# A stand-in for the nixpkgs package set, with the real lib: what jetrelay's Nix files
# take from pkgs, where every derivation is an attribute set with a store path and a
# *recipe*. Nothing is built during evaluation; the recipe is a JSON file in the store
# whose hash is the derivation's (its outPath is "/nix/store/<recipe hash>-<name>"), so
# that tooling handed any store path found in a rendered unit can find out what it is
# and make it (.ci/nixos-render: copy the cargo-built binaries, link a Debian tool, write
# a text file, run a runCommand's script). Files whose content is known at evaluation
# (the TOML a module generates) are written to the store as they are, with the same text
# a NixOS build would produce up to formatting.
#
# Writing recipes needs `nix-instantiate --read-write-mode` and a store (use
# `--store DIR` for a throwaway one); in --readonly-mode the paths are computed alike and
# nothing is written, which is enough for checks that only compare values.
{
  lib,
  system ? "x86_64-linux",
  # Source checkout, for the package's own nix/package.nix.
  root ? ../..,
}:

let
  inherit (builtins) toJSON;

  mkDerivation =
    recipe: attrs:
    let
      recipeFile = builtins.toFile "${recipe.name}.recipe" (toJSON recipe);
      # "/nix/store/" is 11 characters, a store hash 32.
      hash = builtins.substring 11 32 recipeFile;
      self =
        attrs
        // {
          type = "derivation";
          inherit (recipe) name;
          inherit system;
          outPath = "/nix/store/${hash}-${recipe.name}";
          drvPath = recipeFile;
          outputs = [ "out" ];
          out = self;
          outputName = "out";
          meta = attrs.meta or { };
          # The argument set it was made from, like a real derivation's attributes.
          overrideAttrs = f: mkDerivation recipe (attrs // f attrs);
          passthru = attrs.passthru or { };
        }
        // (attrs.passthru or { });
    in
    self;

  # A program the NixOS modules and tests take from nixpkgs; tooling links the Debian
  # package's files in its place.
  tool =
    name:
    mkDerivation {
      kind = "tool";
      inherit name;
    } { meta.mainProgram = name; };

  writeTextFile =
    {
      name,
      text,
      executable ? false,
      destination ? "",
      meta ? { },
    }:
    mkDerivation {
      kind = "text";
      inherit
        name
        text
        executable
        destination
        ;
    } { inherit meta text; };

  runtimeShell = "${pkgs.bash}/bin/bash";

  # TOML as pkgs.formats.toml renders it (through remarshal there): scalars and arrays
  # first, then one [table] per nested attribute set. Null values have no TOML form and
  # are refused, as remarshal refuses them.
  toTOML =
    let
      key = name: if builtins.match "[A-Za-z0-9_-]+" name != null then name else toJSON name;
      value =
        v:
        if v == null then
          throw "TOML has no null"
        else if builtins.isList v then
          "[" + lib.concatMapStringsSep ", " value v + "]"
        else if builtins.isAttrs v then
          "{ " + lib.concatStringsSep ", " (lib.mapAttrsToList (n: x: "${key n} = ${value x}") v) + " }"
        else if builtins.isBool v then
          lib.boolToString v
        else if builtins.isPath v then
          toJSON (toString v)
        else
          toJSON v;
      table =
        prefix: attrs:
        let
          scalars = lib.filterAttrs (_: v: !builtins.isAttrs v) attrs;
          tables = lib.filterAttrs (_: builtins.isAttrs) attrs;
        in
        lib.concatStrings (lib.mapAttrsToList (n: v: "${key n} = ${value v}\n") scalars)
        + lib.concatStrings (
          lib.mapAttrsToList (n: v: "\n[${prefix}${key n}]\n" + table "${prefix}${key n}." v) tables
        );
    in
    table "";

  # pkgs/pkgs-lib/formats.nix: the JSON value type that the TOML format reuses.
  tomlValue =
    with lib.types;
    let
      valueType =
        nullOr (oneOf [
          bool
          int
          float
          str
          path
          (attrsOf valueType)
          (listOf valueType)
        ])
        // {
          description = "TOML value";
        };
    in
    valueType;

  python3 = tool "python3" // {
    withPackages =
      select:
      mkDerivation {
        kind = "python";
        name = "python3-env";
        packages = map (p: p.pname) (select python3.pkgs);
      } { meta.mainProgram = "python3"; };
    pkgs = lib.genAttrs [ "websockets" "zstandard" "pyflakes" ] (pname: {
      inherit pname;
    });
  };

  pkgs = {
    inherit lib system python3;
    stdenv.hostPlatform.system = system;
    callPackage = lib.callPackageWith pkgs;
    inherit writeTextFile runtimeShell;

    formats.toml = _: {
      type = tomlValue;
      generate = name: value: builtins.toFile name (toTOML value);
    };

    rustPlatform = {
      # Keeps every argument (checkFlags, nativeCheckInputs, src, ...) so that checks and
      # the build-sandbox rehearsal (.ci/nix-sandbox) read what Nix would be given.
      buildRustPackage =
        args:
        mkDerivation {
          kind = "cargo-package";
          name = "${args.pname}-${args.version}";
          src = "${args.src}";
        } args;
      rustLibSrc = tool "rust-lib-src";
    };

    writeShellScriptBin =
      name: text:
      writeTextFile {
        inherit name;
        executable = true;
        destination = "/bin/${name}";
        text = "#!${runtimeShell}\n${text}";
        meta.mainProgram = name;
      };

    # The same preamble as nixpkgs' writeShellApplication; its shellcheck step is what
    # .ci/nix-check's `bash -n` of the text stands in for.
    writeShellApplication =
      {
        name,
        text,
        runtimeInputs ? [ ],
      }:
      writeTextFile {
        inherit name;
        executable = true;
        destination = "/bin/${name}";
        text = ''
          #!${runtimeShell}
          set -o errexit
          set -o nounset
          set -o pipefail
        ''
        + lib.optionalString (runtimeInputs != [ ]) ''

          export PATH="${lib.makeBinPath runtimeInputs}:$PATH"
        ''
        + ''

          ${text}
        '';
        meta.mainProgram = name;
      };

    runCommand =
      name: env: buildCommand:
      mkDerivation {
        kind = "runCommand";
        inherit name buildCommand;
        nativeBuildInputs = map toString (env.nativeBuildInputs or [ ]);
      } env;

    mkShell = attrs: mkDerivation {
      kind = "shell";
      name = "nix-shell";
    } attrs;

    # The arguments are kept, so that checks evaluate the nodes and the test script.
    testers.runNixOSTest =
      args:
      mkDerivation {
        kind = "nixos-test";
        name = "vm-test-run-${args.name}";
      } { testArgs = args; };

    jetrelay = pkgs.callPackage (root + "/nix/package.nix") { };
  }
  // lib.genAttrs [
    "bash"
    "clippy"
    "coreutils"
    "curl"
    "findutils"
    "gnugrep"
    "gnused"
    "haproxy"
    "iproute2"
    "jq"
    "nixfmt"
    "nixfmt-tree"
    "openssl"
    "rust-analyzer"
    "rustfmt"
    "socat"
    "systemd"
    "util-linux"
  ] tool;
in
pkgs
