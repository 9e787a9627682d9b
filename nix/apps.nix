# Wrappers behind `nix run` (apps.default, apps.demo).
{
  writeShellApplication,
  jetrelay,
}:

{
  # Follows the public Jetstream (the relay's built-in upstream list) and
  # keeps its log where the XDG base directory spec puts state.
  follow = writeShellApplication {
    name = "jetrelay-follow";
    runtimeInputs = [ jetrelay ];
    text = ''
      data="''${XDG_STATE_HOME:-$HOME/.local/state}/jetrelay"
      mkdir -p "$data"
      echo "jetrelay: ws://127.0.0.1:6008/subscribe, dashboard http://127.0.0.1:6009/, log in $data" >&2
      exec jetrelay --listen 127.0.0.1:6008 --data-dir "$data" "$@"
    '';
  };

  # The embedded simulated upstream: no network needed, and the throwaway
  # log is removed when the relay exits (Ctrl-C is a graceful stop).
  demo = writeShellApplication {
    name = "jetrelay-demo";
    runtimeInputs = [ jetrelay ];
    text = ''
      data="$(mktemp -d -t jetrelay-demo.XXXXXX)"
      trap 'rm -rf "$data"' EXIT
      echo "jetrelay demo: ws://127.0.0.1:6008/subscribe, dashboard http://127.0.0.1:6009/" >&2
      jetrelay --demo --listen 127.0.0.1:6008 --data-dir "$data" "$@"
    '';
  };
}
