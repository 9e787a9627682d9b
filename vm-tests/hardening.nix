# The relay under the module's sandbox: io_uring still works, the sandbox is
# really in force, the kernel tuning is applied, and systemd-analyze
# security rates the unit at most 2.5.
#
# Resources: 2 VMs (upstream 512 MiB / 1 core, relay 1 GiB / 2 cores:
# 1.5 GiB, 3 vCPUs), an estimated 2 minutes with KVM; the swarm runs on the relay
# node, so the test network carries only the upstream's 10 ev/s.
#
# What keeps the score from going lower, each a deliberate choice:
# - PrivateNetwork=no, AF_INET/AF_INET6 allowed: it is a network server.
# - no IPAddressDeny=/IPAddressAllow=: clients and upstreams are anywhere.
# - no RootDirectory=/RootImage=: it runs from the host's /nix/store,
#   already read-only under ProtectSystem=strict.
# - DeviceAllow=char-rtc r, which ProtectClock=yes adds by itself.
# Everything else the assessment looks at scores 0 (exposure ~1.1 "OK").
#
# Twin: tests/vm_twins.rs twin_hardening_* runs the relay under the same
# seccomp groups, capability drop and NoNewPrivileges without systemd, and
# .ci/nix-check scores the rendered unit with systemd-analyze --offline.
{
  pkgs,
  jetrelay,
  module,
}:

let
  common = import ./common.nix { inherit pkgs jetrelay; };
  inherit (common) seed rate;
  maxExposure = "2.5";
in
pkgs.testers.runNixOSTest {
  name = "jetrelay-hardening";

  defaults.imports = [ module ];

  nodes = {
    upstream = common.upstreamNode;
    # The swarm runs on the relay node itself, against 127.0.0.1. The heavy
    # kernel tuning is asked for here, to see every key of it applied.
    relay = {
      imports = [
        (common.relayNode {
          upstreams = [ "ws://upstream:${toString common.mockPort}/subscribe" ];
        })
      ];
      services.jetrelay.kernelTuning = "many-clients";
    };
  };

  testScript = ''
    import re

    ${common.pythonHelpers}

    start_all()
    wait_mock(upstream)
    wait_relay(relay)
    wait_subscribers(upstream, 1)

    with subtest("io_uring fan-out works inside the sandbox"):
        swarm_run(
            relay,
            "sandboxed",
            "--url ws://127.0.0.1:6008/subscribe --clients 50 "
            "--seed ${toString seed} --duration 20s "
            "--expect-in-order --expect-min-events ${toString (10 * rate)}",
        )

    with subtest("the sandbox is in force on the running process"):
        pid = main_pid(relay, "jetrelay.service")
        status = relay.succeed(f"cat /proc/{pid}/status")
        assert re.search(r"^Seccomp:\s+2$", status, re.M), status
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        assert re.search(r"^CapEff:\s+0+$", status, re.M), status
        assert re.search(r"^CapBnd:\s+0+$", status, re.M), status
        limits = relay.succeed(f"cat /proc/{pid}/limits")
        assert re.search(r"^Max open files\s+1048576\s+1048576", limits, re.M), limits
        # PrivateUsers: the process sees a one-UID user namespace.
        uid_map = relay.succeed(f"cat /proc/{pid}/uid_map").split("\n")
        assert len([line for line in uid_map if line.strip()]) == 2, uid_map
        # The module's static system user (see nixos/README.md on why not
        # DynamicUser=), with a system UID.
        uid = int(relay.succeed(f"stat -c %u /proc/{pid}").strip())
        assert uid == int(relay.succeed("id -u jetrelay").strip()), uid
        assert 0 < uid < 1000, uid

    with subtest("the module's kernel settings are applied"):
        def sysctl(key):
            return relay.succeed(f"sysctl -n {key}").strip()

        assert sysctl("kernel.io_uring_disabled") == "0"
        assert int(sysctl("fs.nr_open")) >= 1048576
        assert sysctl("net.core.somaxconn") == "65535"
        assert sysctl("net.ipv4.tcp_max_syn_backlog") == "65535"
        assert sysctl("net.ipv4.tcp_notsent_lowat") == "131072"
        assert sysctl("net.ipv4.tcp_wmem").split() == ["4096", "16384", "1048576"]
        assert sysctl("net.ipv4.tcp_rmem").split() == ["4096", "16384", "6291456"]
        assert int(sysctl("net.netfilter.nf_conntrack_max")) >= 262144

    with subtest("systemd-analyze security rates the relay at most ${maxExposure}"):
        report = relay.succeed("systemd-analyze security --no-pager jetrelay.service")
        print(report)
        match = re.search(r"Overall exposure level for jetrelay\.service: (\d+\.\d+)", report)
        assert match, "no overall exposure level in the report"
        exposure = float(match.group(1))
        assert exposure <= ${maxExposure}, f"exposure {exposure} > ${maxExposure}"
  '';
}
