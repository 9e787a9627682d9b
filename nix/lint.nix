# Cheap source checks for `nix flake check`, sharing the package's
# filtered source and vendored dependencies.
{
  jetrelay,
  clippy,
  rustfmt,
  runCommand,
}:

{
  # Same derivation as the package with the build and install phases
  # replaced, so the vendored crates and the cargo configuration written by
  # cargoSetupHook are reused as they are.
  clippy = jetrelay.overrideAttrs (old: {
    pname = "jetrelay-clippy";
    nativeBuildInputs = old.nativeBuildInputs or [ ] ++ [ clippy ];
    buildPhase = ''
      runHook preBuild
      cargo clippy --offline --all-targets -- -D warnings
      runHook postBuild
    '';
    doCheck = false;
    installPhase = ''
      runHook preInstall
      touch "$out"
      runHook postInstall
    '';
    dontFixup = true;
  });

  # rustfmt directly on the crate roots rather than `cargo fmt`: cargo
  # would resolve the dependency graph first, which needs the vendored
  # sources; rustfmt follows `mod` declarations on its own.
  fmt =
    runCommand "jetrelay-fmt"
      {
        nativeBuildInputs = [ rustfmt ];
        inherit (jetrelay) src;
      }
      ''
        cd "$src"
        # Crate roots plus anything cargo discovers as a target; files
        # reached through `mod` are checked by following the roots.
        roots=$(find src/lib.rs src/main.rs src/bin tests benches examples \
          -maxdepth 2 -name '*.rs' 2>/dev/null | sort || true)
        rustfmt --check --edition 2024 $roots
        touch "$out"
      '';
}
