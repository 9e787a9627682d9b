# Two relays following one upstream behind HAProxy, and a third relay
# (edge) following the first two in turn. Stopping relay1 moves its clients
# through HAProxy to relay2 and edge's upstream to relay2; nobody sees a gap.
#
# Resources: 6 VMs (upstream and lb 512 MiB / 1 core each; relay1, relay2,
# edge and clients 768 MiB / 2 cores each: 4 GiB, 10 vCPUs), an estimated 4 minutes
# with KVM. Across the test network: 250 clients x 10 ev/s x ~560 B, part of it
# twice (relay -> lb -> clients): under 3 MB/s.
#
# Twin: tests/vm_twins.rs twin_fleet_* runs the HAProxy configuration below,
# as this file renders it, against relays configured by the module.
{
  pkgs,
  jetrelay,
  module,
}:

let
  common = import ./common.nix { inherit pkgs jetrelay; };
  inherit (common) seed rate;

  mockUrl = "ws://upstream:${toString common.mockPort}/subscribe";

  # Behind the load balancer a relay takes connections on a trusted
  # listener, where HAProxy's PROXY v2 header carries the client's real
  # address; /readyz on the metrics listener drives HAProxy's health check.
  fleetRelay = {
    imports = [
      (common.relayNode {
        upstreams = [ mockUrl ];
        memorySize = 768;
      })
    ];
    services.jetrelay.settings = {
      trusted_listen = "[::]:6011";
      # The load balancer's network may claim client addresses (default: loopback only).
      trusted_allow_ip = common.exemptNets;
      metrics_listen = "[::]:6009";
      # Behind a load balancer a client's next connection may reach the
      # other relay, where its seq names another event (seqs are
      # instance-local): without the cursor field clients resume by
      # time_us, which both relays share.
      v1_cursor_field = false;
    };
    networking.firewall.allowedTCPPorts = [
      6009
      6011
    ];
  };

  viaLb = 200;
  chained = 50;
in
pkgs.testers.runNixOSTest {
  name = "jetrelay-fleet";

  defaults.imports = [ module ];

  nodes = {
    upstream = common.upstreamNode;
    relay1 = fleetRelay;
    # relay2 starts from the script once edge has appended an event: its
    # history must begin after edge's. A follower whose history begins after
    # its next upstream's appends, at failover, the older events it never had
    # (after its newer ones, so out of order for its clients); with boot
    # order left to chance the chain assertion would be a race.
    relay2 = {
      imports = [ fleetRelay ];
      systemd.services.jetrelay.wantedBy = pkgs.lib.mkForce [ ];
    };

    # A relay is a valid Jetstream upstream; the list fails over in turn.
    edge = common.relayNode {
      upstreams = [
        "ws://relay1:6008/subscribe"
        "ws://relay2:6008/subscribe"
      ];
      memorySize = 768;
    };

    lb = {
      virtualisation = {
        memorySize = 512;
        cores = 1;
      };
      networking.firewall.allowedTCPPorts = [ 8080 ];
      environment.systemPackages = [ pkgs.socat ];
      services.haproxy = {
        enable = true;
        # The module's global section already opens the stats socket at
        # /run/haproxy/haproxy.sock.
        config = ''
          defaults
            mode tcp
            timeout connect 2s
            # WebSocket streams are long-lived; the relays ping every 30s.
            timeout client 1h
            timeout server 1h
            # A refused connection to a stopped relay is retried on the other.
            retries 3
            option redispatch

          frontend jetstream
            bind :::8080 v4v6
            default_backend relays

          backend relays
            balance roundrobin
            # No `ver`: HAProxy probes with HTTP/1.0, which the metrics
            # listener answers like HTTP/1.1.
            option httpchk
            http-check send meth GET uri /readyz
            http-check expect status 200
            default-server check port 6009 inter 500ms fall 2 rise 2 send-proxy-v2 on-marked-down shutdown-sessions
            server relay1 relay1:6011
            server relay2 relay2:6011
        '';
      };
    };

    clients = common.clientNode;
  };

  testScript = ''
    ${common.pythonHelpers}

    def backends_up():
        stats = lb.succeed("echo 'show stat' | socat stdio /run/haproxy/haproxy.sock")
        return {
            row.split(",")[1]
            for row in stats.splitlines()
            if row.startswith("relays,relay") and row.split(",")[17] == "UP"
        }


    start_all()
    wait_mock(upstream)
    for relay in (relay1, edge):
        wait_relay(relay)
    edge.wait_until_succeeds(
        "curl -sf http://127.0.0.1:6009/metrics | grep -qE '^jetrelay_upstream_events_appended_total [1-9]'"
    )
    relay2.wait_for_unit("multi-user.target")
    relay2.succeed("systemctl start jetrelay.service")
    wait_relay(relay2)
    wait_subscribers(upstream, 2)
    lb.wait_for_unit("haproxy.service")
    lb.wait_for_open_port(8080)
    lb.wait_until_succeeds(
        "echo 'show stat' | socat stdio /run/haproxy/haproxy.sock | grep -E '^relays,relay[12],' | grep -c ',UP,' | grep -x 2"
    )

    with subtest("failover through HAProxy, and a relay chain that fails over upstream"):
        swarm_start(
            clients,
            "via-lb",
            "--url ws://lb:8080/subscribe --clients ${toString viaLb} --reconnect "
            "--seed ${toString seed} --duration 60s "
            "--expect-in-order --expect-min-events ${toString (40 * rate)}",
        )
        swarm_start(
            clients,
            "chain",
            "--url ws://edge:6008/subscribe --clients ${toString chained} "
            "--seed ${toString seed} --duration 60s "
            "--expect-in-order --expect-min-events ${toString (40 * rate)}",
        )
        # Round robin put half of the load-balanced clients on each relay.
        wait_established(relay1, 6011, ${toString (viaLb / 2)})
        wait_established(relay2, 6011, ${toString (viaLb / 2)})
        relay1.sleep(10)

        relay1.succeed("systemctl stop jetrelay.service")
        lb.wait_until_succeeds(
            "echo 'show stat' | socat stdio /run/haproxy/haproxy.sock | grep -E '^relays,relay1,' | grep -v ',UP,'"
        )
        assert backends_up() == {"relay2"}, backends_up()
        # relay1's clients came back through HAProxy with their cursor.
        wait_established(relay2, 6011, ${toString viaLb})

        swarm_wait(clients, "via-lb")
        swarm_wait(clients, "chain")
  '';
}
