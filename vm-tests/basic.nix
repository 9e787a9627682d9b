# One relay following a simulated upstream, 5,000 clients on a third node:
# live fan-out, cursor replay, and a relay restart that clients ride over.
{
  pkgs,
  jetrelay,
  module,
}:

let
  common = import ./common.nix { inherit pkgs jetrelay; };
  inherit (common) seed rate;
  clients = 5000;
  # Four swarm processes keep each one near 1,250 sockets.
  processes = 4;
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
            "--clients ${toString clients} --processes ${toString processes} "
            "--seed ${toString seed} --duration 40s "
            "--expect-in-order --expect-min-events ${toString (20 * rate)}",
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
            "--clients ${toString clients} --processes ${toString processes} "
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
