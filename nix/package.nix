{
  lib,
  rustPlatform,
  openssl,
  python3,
  util-linux,
}:

let
  fs = lib.fileset;
  cargoToml = lib.importTOML ../Cargo.toml;

  # Only what cargo reads: editing the flake, the module, the VM tests or the docs must
  # not rebuild the crate. `maybeMissing` keeps the source valid while the optional
  # target directories do not exist yet.
  sourceFiles = fs.unions [
    ../Cargo.toml
    ../Cargo.lock
    ../src
    # include_bytes! of the sample events and the zstd dictionary.
    ../assets
    (fs.maybeMissing ../build.rs)
    (fs.maybeMissing ../tests)
    (fs.maybeMissing ../benches)
    (fs.maybeMissing ../examples)
    # Read by the clippy and fmt checks in nix/lint.nix, which reuse this source.
    (fs.maybeMissing ../clippy.toml)
    (fs.maybeMissing ../rustfmt.toml)
  ];
in
rustPlatform.buildRustPackage {
  pname = "jetrelay";
  inherit (cargoToml.package) version;

  src = fs.toSource {
    root = ../.;
    fileset = sourceFiles;
  };

  # Every dependency comes from crates.io, so the lock file alone pins the
  # vendored sources; no outputHashes are needed.
  cargoLock.lockFile = ../Cargo.lock;

  # The default install hook copies every [[bin]] target, so the package
  # ships jetrelay, jetrelay-tls, jetrelay-mock and jetrelay-swarm; the
  # NixOS module and the VM tests rely on all four.

  # The check phase: the unit tests, and the integration tests that exercise what this
  # build adds to the code — the four binaries together, and the tools the tests call
  # (openssl, a Python WebSocket client, prlimit): tools_cli (mock and swarm),
  # interop_python, tls_relay and tls_sidecar (the whole wss chain), metrics_endpoint.
  # The rest of the suite (relay_core, subscriptions, abuse_limits, the OTLP and browser
  # tests, the VM-test twins) is pure Rust on loopback plus load and timing tests: minutes
  # on a builder, flaky next to other builds, and run by CI on every change. .ci/nix-sandbox
  # rehearses exactly this phase the way the builder runs it (these flags, one test thread,
  # a network namespace with only loopback, no HOME, not root, a PATH of only these inputs).
  cargoTestFlags = [
    "--lib"
    "--test"
    "tools_cli"
    "--test"
    "interop_python"
    "--test"
    "tls_relay"
    "--test"
    "tls_sidecar"
    "--test"
    "metrics_endpoint"
  ];
  checkFlags = [
    # Load tests in those files: a thousand TLS connections, memory per idle connection.
    "--skip=scale_"
  ];
  # One test thread: the integration tests each start relays and client swarms, and
  # measure timing; in parallel they starve each other. (The cargo check hook passes
  # --test-threads=$NIX_BUILD_CORES unless this is set; .cargo/config.toml's
  # RUST_TEST_THREADS, which cargo test uses elsewhere, would lose to that flag.)
  dontUseCargoParallelTests = true;
  # Tools the tests that run call: `openssl s_client` and key conversion (tls_relay,
  # tls_sidecar), an independent Python WebSocket client (interop_python, tls_relay),
  # `prlimit` (tls_sidecar's descriptor-limit test).
  nativeCheckInputs = [
    openssl
    (python3.withPackages (ps: [
      ps.websockets
      ps.zstandard
    ]))
    util-linux
  ];

  # The file set, for .ci/nix-sandbox and the evaluation checks.
  passthru.sourceFiles = sourceFiles;

  meta = {
    description = "Jetstream relay that fans the Bluesky firehose out to tens of thousands of WebSocket clients with io_uring";
    longDescription = ''
      jetrelay follows an upstream Jetstream over WebSocket, appends every
      event to a log that is already framed as WebSocket frames, and fans it
      out to many clients with io_uring. The package also contains the TLS
      sidecar (jetrelay-tls), an upstream simulator (jetrelay-mock) and a
      load and verification client (jetrelay-swarm).
    '';
    homepage = cargoToml.package.repository;
    license = with lib.licenses; [
      mit
      asl20
    ];
    mainProgram = "jetrelay";
    # io_uring and splice(2): Linux only.
    platforms = lib.platforms.linux;
    maintainers = [ ];
  };
}
