# One relay following a simulated upstream: 500 clients on a third node and
# 2,000 on the relay's own node get every event; cursor replay; a relay
# restart that clients ride over with their cursor.
#
# Resources: 3 VMs (upstream 512 MiB / 1 core, relay 2 GiB / 2 cores for its
# 2,000 local clients, clients 768 MiB / 2 cores: 3.3 GiB, 5 vCPUs), an
# estimated 4 minutes with KVM.
# Across the test network: at most 500 clients x 10 ev/s x ~560 B = 2.8 MB/s.
# The 2,000 clients stay on the relay node (loopback), where nothing but the
# node's own CPU carries them.
{
  pkgs,
  jetrelay,
  module,
}:

let
  common = import ./common.nix { inherit pkgs jetrelay; };
  inherit (common) seed rate;
  # Over the test network (see common.nix for what it carries).
  clients = 500;
  # On the relay node, over loopback: thousands of sockets under the unit's
  # LimitNOFILE and the module's listen backlogs.
  local = 2000;
in
pkgs.testers.runNixOSTest {
  name = "jetrelay-basic";

  defaults.imports = [ module ];

  nodes = {
    upstream = common.upstreamNode;
    relay = common.relayNode {
      upstreams = [ "ws://upstream:${toString common.mockPort}/subscribe" ];
      memorySize = 2048;
    };
    clients = common.clientNode;
  };

  testScript = ''
    ${common.pythonHelpers}

    start_all()
    wait_mock(upstream)
    wait_relay(relay)
    wait_subscribers(upstream, 1)
    # The relay has every event after this one.
    seq_at_subscribe = mock_stats(upstream)["seq"]

    with subtest("${toString clients} clients receive every event, in order and byte-exact"):
        swarm_run(
            clients,
            "fanout",
            "--url ws://relay:6008/subscribe "
            "--clients ${toString clients} "
            "--seed ${toString seed} --duration 40s "
            "--expect-in-order --expect-min-events ${toString (20 * rate)}",
        )

    with subtest("${toString local} clients on the relay's node receive every event"):
        swarm_run(
            relay,
            "local",
            "--url ws://127.0.0.1:6008/subscribe "
            "--clients ${toString local} --processes 2 "
            "--seed ${toString seed} --duration 30s "
            "--expect-connected ${toString local} "
            "--expect-in-order --expect-min-events ${toString (15 * rate)}",
        )

    with subtest("a cursor older than the log replays all of it, then goes live"):
        backlog = mock_stats(upstream)["seq"] - seq_at_subscribe
        assert backlog > 0, "the mock produced nothing"
        # cursor=1 (1 µs after the epoch) predates every event: replay
        # must start at the relay's first event and run without a gap into
        # the live stream.
        swarm_run(
            clients,
            "replay",
            "--url 'ws://relay:6008/subscribe?cursor=1' --clients 200 "
            "--seed ${toString seed} --duration 20s "
            f"--expect-in-order --expect-min-events {backlog}",
        )

    with subtest("clients resume from their cursor across a relay restart"):
        swarm_start(
            clients,
            "restart",
            "--url ws://relay:6008/subscribe "
            "--clients ${toString clients} "
            "--seed ${toString seed} --duration 70s --reconnect "
            "--expect-in-order --expect-min-events ${toString (40 * rate)}",
        )
        wait_established(relay, 6008, ${toString clients})
        relay.sleep(5)
        relay.succeed("systemctl restart jetrelay.service")
        wait_relay(relay)
        # Every client came back (with its cursor: swarm fails on a gap).
        wait_established(relay, 6008, ${toString clients})
        swarm_wait(clients, "restart")

    with subtest("the watchdog never had to restart the relay"):
        # An explicit restart does not count; a missed WATCHDOG=1 would.
        assert relay.succeed("systemctl show -P NRestarts jetrelay.service").strip() == "0"
  '';
}
