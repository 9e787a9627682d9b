# Pieces shared by the VM tests. The scenarios' logic and assertions live in
# jetrelay-mock and jetrelay-swarm (--expect-*); the Python here only starts
# units, waits, and reads exit codes.
{ pkgs, jetrelay }:

let
  inherit (pkgs) lib;
in
rec {
  # jetrelay-swarm regenerates every event from the mock's seed and
  # byte-compares, so both sides must use the same one.
  seed = 7;
  # Events per second from the mock. What crosses the test network is
  # bounded by the driver's user-space VDE switch (one process for every
  # VM's traffic; hundreds of Mbit/s at best): a mock event is ~560 bytes
  # framed, so 10 ev/s to 500 clients on another node is ~2.8 MB/s
  # (~23 Mbit/s). Thousands of clients run on the relay's own node, over
  # loopback. Load at scale is the twins' and the benchmark's job; these
  # tests are about the deployment.
  rate = 10;
  mockPort = 6010;

  # Every client of a node shares one address, so the relays' per-IP
  # connection limits (64 connections, 10/s) would turn the test clients
  # away: the test networks and loopback are exempt.
  exemptNets = [
    "192.168.1.0/24"
    "2001:db8:1::/64"
    "127.0.0.0/8"
    "::1/128"
  ];

  swarm = lib.getExe' jetrelay "jetrelay-swarm";

  # 512 MiB, 1 core: the mock needs a few MiB and a few % of a core.
  upstreamNode = _: {
    virtualisation = {
      memorySize = 512;
      cores = 1;
    };
    networking.firewall.allowedTCPPorts = [ mockPort ];
    environment.systemPackages = [
      pkgs.curl
      pkgs.jq
    ];
    systemd.services.jetrelay-mock = {
      description = "jetrelay-mock upstream simulator";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      serviceConfig = {
        ExecStart = lib.escapeShellArgs [
          (lib.getExe' jetrelay "jetrelay-mock")
          "--listen"
          "[::]:${toString mockPort}"
          "--rate"
          (toString rate)
          "--seed"
          (toString seed)
        ];
        DynamicUser = true;
        Restart = "on-failure";
      };
    };
  };

  # The relay under the module, 1 GiB and 2 cores (what a few thousand
  # clients and a swarm next to it need). Everything the relay reads comes
  # from services.jetrelay.settings; the twins (tests/vm_twins.rs) run the
  # relay with the TOML file the module renders from it.
  relayNode =
    {
      upstreams,
      memorySize ? 1024,
    }:
    _: {
      services.jetrelay = {
        enable = true;
        openFirewall = true;
        settings = {
          upstream = upstreams;
          # The VMs have two cores.
          workers = 2;
          # The VM disk is 1 GiB; a few minutes at 10 ev/s is well under 1 MiB.
          max_disk = "256MiB";
          allow_ip = exemptNets;
        };
      };
      environment.systemPackages = [
        pkgs.curl
        jetrelay
      ];
      virtualisation = {
        inherit memorySize;
        cores = 2;
      };
    };

  # 768 MiB, 2 cores: a swarm of a few hundred clients verifying every event.
  clientNode = _: {
    environment.systemPackages = [
      jetrelay
      pkgs.openssl
    ];
    # Thousands of connections to a single relay address each need their
    # own source port.
    boot.kernel.sysctl."net.ipv4.ip_local_port_range" = "1024 65000";
    virtualisation = {
      memorySize = 768;
      cores = 2;
    };
  };

  pythonHelpers = ''
    import json


    def swarm_start(machine, name, args):
        """Run jetrelay-swarm in the background as the transient unit `name`.

        A transient unit gets its own descriptor limit, survives the test
        driver's shell, and keeps its exit status for swarm_wait.
        """
        machine.succeed(
            f"systemd-run --unit={name} --property=LimitNOFILE=65536 "
            "--property=RemainAfterExit=yes "
            f"--property=StandardOutput=file:/tmp/{name}.json "
            f"--property=StandardError=file:/tmp/{name}.log "
            f"${swarm} --json {args}"
        )


    def swarm_wait(machine, name, timeout=600):
        """Wait for swarm `name` to exit and fail the test unless it succeeded."""
        machine.wait_until_succeeds(
            f"systemctl show -P SubState {name} | grep -Ex 'exited|failed'",
            timeout=timeout,
        )
        report = machine.succeed(f"cat /tmp/{name}.json /tmp/{name}.log")
        print(report)
        result = machine.succeed(f"systemctl show -P Result {name}").strip()
        assert result == "success", f"jetrelay-swarm {name}: {result}\n{report}"


    def swarm_run(machine, name, args, timeout=600):
        swarm_start(machine, name, args)
        swarm_wait(machine, name, timeout)


    def wait_mock(machine):
        machine.wait_for_unit("jetrelay-mock.service")
        machine.wait_for_open_port(${toString mockPort})


    def mock_stats(machine):
        return json.loads(machine.succeed("curl -sf http://localhost:${toString mockPort}/stats"))


    def wait_subscribers(machine, count):
        machine.wait_until_succeeds(
            f"curl -sf http://localhost:${toString mockPort}/stats | jq -e '.subscribers >= {count}'"
        )


    def wait_relay(machine):
        # Type=notify: active means the listeners are bound.
        machine.wait_for_unit("jetrelay.service")
        machine.wait_until_succeeds("curl -sf http://127.0.0.1:6009/readyz")


    def established(machine, port):
        out = machine.succeed(f"ss -Htn state established '( sport = :{port} )' | wc -l")
        return int(out.strip())


    def wait_established(machine, port, count, timeout=300):
        machine.wait_until_succeeds(
            f"test $(ss -Htn state established '( sport = :{port} )' | wc -l) -ge {count}",
            timeout=timeout,
        )


    def main_pid(machine, unit):
        return machine.succeed(f"systemctl show -P MainPID {unit}").strip()
  '';
}
