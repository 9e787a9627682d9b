# The TLS sidecar in front of the relay: wss clients get the same stream as
# ws clients, the sidecar holds no capability but CAP_NET_BIND_SERVICE, and
# a replaced certificate is served after `systemctl reload jetrelay-tls`
# without dropping connections.
#
# Resources: 3 VMs (upstream 512 MiB / 1 core, relay 1 GiB / 2 cores,
# client 768 MiB / 2 cores: 2.3 GiB, 5 vCPUs), an estimated 3 minutes with KVM.
# Across the test network: 200 clients x 10 ev/s x ~560 B = 1.1 MB/s.
{
  pkgs,
  jetrelay,
  module,
}:

let
  common = import ./common.nix { inherit pkgs jetrelay; };
  inherit (common) seed rate;

  # A test CA and two generations of the relay's certificate (serials
  # 0x1001 and 0x1002), made at build time.
  certs =
    pkgs.runCommand "jetrelay-test-certs"
      {
        nativeBuildInputs = [ pkgs.openssl ];
      }
      ''
        mkdir "$out"
        cd "$out"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
          -days 3650 -subj "/CN=jetrelay test CA" \
          -addext "basicConstraints=critical,CA:TRUE" \
          -addext "keyUsage=critical,keyCertSign,cRLSign" \
          -keyout ca.key -out ca.crt
        printf '%s\n' \
          "subjectAltName=DNS:relay" \
          "basicConstraints=critical,CA:FALSE" \
          "keyUsage=critical,digitalSignature" \
          "extendedKeyUsage=serverAuth" > server.ext
        for generation in 1 2; do
          openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -subj "/CN=relay generation $generation" \
            -keyout "server$generation.key" -out "server$generation.csr"
          openssl x509 -req -in "server$generation.csr" -CA ca.crt -CAkey ca.key \
            -set_serial "$((0x1000 + generation))" -days 3650 -extfile server.ext \
            -out "server$generation.crt"
        done
        rm ./*.csr server.ext
      '';

  certDir = "/var/lib/jetrelay-test-certs";
in
pkgs.testers.runNixOSTest {
  name = "jetrelay-tls";

  defaults.imports = [ module ];

  nodes = {
    upstream = common.upstreamNode;

    relay = {
      imports = [
        (common.relayNode {
          upstreams = [ "ws://upstream:${toString common.mockPort}/subscribe" ];
        })
      ];

      services.jetrelay.tls = {
        enable = true;
        certFile = "${certDir}/cert.pem";
        keyFile = "${certDir}/key.pem";
        openFirewall = true;
        # The test client opens 150 connections from one address (per-IP limits: 64, 10/s).
        settings.allow_ip = common.exemptNets;
      };

      # Outside the store and owned root:jetrelay-tls 0640, as the keyFile
      # option asks; rotating means replacing these two files.
      systemd.services.jetrelay-test-certs = {
        wantedBy = [ "multi-user.target" ];
        requiredBy = [ "jetrelay-tls.service" ];
        before = [ "jetrelay-tls.service" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
        };
        script = ''
          install -d -m 0750 -g jetrelay-tls ${certDir}
          install -m 0640 -g jetrelay-tls ${certs}/server1.crt ${certDir}/cert.pem
          install -m 0640 -g jetrelay-tls ${certs}/server1.key ${certDir}/key.pem
        '';
      };
    };

    client = {
      imports = [ common.clientNode ];
      security.pki.certificateFiles = [ "${certs}/ca.crt" ];
    };
  };

  testScript = ''
    ${common.pythonHelpers}

    def served(field):
        """`serial=...` or `subject=...` of the certificate relay:443 serves."""
        return client.succeed(
            "openssl s_client -connect relay:443 -servername relay -verify_return_error "
            "-CAfile /etc/ssl/certs/ca-certificates.crt </dev/null 2>/dev/null "
            f"| openssl x509 -noout -{field}"
        ).strip()


    start_all()
    wait_mock(upstream)
    wait_relay(relay)
    relay.wait_for_unit("jetrelay-tls.service")
    relay.wait_for_open_port(443)
    wait_subscribers(upstream, 1)

    with subtest("privileges: the sidecar holds CAP_NET_BIND_SERVICE only, the relay nothing"):
        sidecar = relay.succeed(f"grep ^CapEff: /proc/{main_pid(relay, 'jetrelay-tls.service')}/status")
        assert sidecar.split()[1] == "0000000000000400", sidecar
        relay_caps = relay.succeed(f"grep ^CapEff: /proc/{main_pid(relay, 'jetrelay.service')}/status")
        assert relay_caps.split()[1] == "0000000000000000", relay_caps

    with subtest("the trusted socket is open to the shared group only"):
        relay.succeed("stat -c '%a %G' /run/jetrelay | grep -x '750 jetrelay'")
        # The relay makes its socket 0660 itself (connect(2) needs write permission).
        relay.succeed("stat -c '%a %G' /run/jetrelay/trusted.sock | grep -x '660 jetrelay'")

    with subtest("wss clients receive the same byte-exact stream as ws clients"):
        common_args = "--clients 100 --seed ${toString seed} --duration 30s --expect-in-order --expect-min-events ${toString (20 * rate)}"
        swarm_start(client, "ws", f"--url ws://relay:6008/subscribe {common_args}")
        swarm_start(client, "wss", f"--url wss://relay/subscribe --ca-file ${certs}/ca.crt {common_args}")
        swarm_wait(client, "ws")
        swarm_wait(client, "wss")

    with subtest("a rotated certificate is served after a reload, connections survive"):
        assert served("serial") == "serial=1001", served("serial")
        assert "relay generation 1" in served("subject")
        # Connected before the reload and still in order after it.
        swarm_start(
            client,
            "across-reload",
            "--url wss://relay/subscribe --ca-file ${certs}/ca.crt --clients 50 "
            "--seed ${toString seed} --duration 30s "
            "--expect-in-order --expect-min-events ${toString (20 * rate)}",
        )
        wait_established(relay, 443, 50)
        sidecar_pid = main_pid(relay, "jetrelay-tls.service")
        relay.succeed(
            "install -m 0640 -g jetrelay-tls ${certs}/server2.key ${certDir}/key.pem.new",
            "install -m 0640 -g jetrelay-tls ${certs}/server2.crt ${certDir}/cert.pem.new",
            "mv ${certDir}/key.pem.new ${certDir}/key.pem",
            "mv ${certDir}/cert.pem.new ${certDir}/cert.pem",
            "systemctl reload jetrelay-tls.service",
        )
        client.wait_until_succeeds(
            "openssl s_client -connect relay:443 -servername relay -verify_return_error "
            "-CAfile /etc/ssl/certs/ca-certificates.crt </dev/null 2>/dev/null "
            "| openssl x509 -noout -serial | grep -x serial=1002"
        )
        assert "relay generation 2" in served("subject")
        swarm_wait(client, "across-reload")
        # A reload, not a restart: the same process serves the new pair.
        assert main_pid(relay, "jetrelay-tls.service") == sidecar_pid
  '';
}
