#!/usr/bin/env python3
"""Drives a subscribeEvents server with the real v2 client: PyPI `atproto` (module
`atproto_jetstream`), an implementation nobody here wrote.

Usage: atproto_jetstream_client.py HOST:PORT OUT_DIR SCENARIOS_JSON

SCENARIOS_JSON is a list of {"name", "params", "compress", "count", "drop_after"}: each runs a
JetstreamClient(base_uri="ws://HOST:PORT/xrpc", params=..., compress=...) until it has
delivered `count` messages (events and #info), asking the server to drop every connection
(GET /drop, the mock's fault endpoint; or, with "drop_file", by creating that file, which the
test driving a relay watches for and then kills and restarts the relay) once `drop_after` were
delivered, so the library must reconnect and resume by seq on its own. Scenarios run one after
another.

Written to OUT_DIR/<name>.jsonl, one line per delivered message:
  {"raw": the frame's JSON text (decompressed when it came compressed), "binary": bool,
   "model": the library's model as a dict (aliases, None fields left out)}
Printed on stdout, one JSON summary: per scenario the delivered count, how many redelivered
frames the library dropped, how many times it connected, whether it ended up compressed, its
cursor, and the error it stopped with (class name and message) if any.
Exit status 0 unless the script itself failed; the Rust test judges the contents.
"""

import json
import os
import sys
import threading
import time
import urllib.request

from atproto_client.models.utils import get_model_as_dict
from atproto_jetstream import JetstreamClient

# Bound on one scenario, so the script always ends.
SCENARIO_DEADLINE_S = 40.0


class RecordingClient(JetstreamClient):
    """Records every frame as the library decodes it. `_decode_frame` and `_before_connect` are
    the library's own hooks (private API of atproto 0.0.73): the harness needs the raw bytes,
    which the public callback never sees."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connects = 0
        self.duplicates = 0
        self.last_raw = None

    def _before_connect(self):
        self.connects += 1
        super()._before_connect()

    def _decode_frame(self, raw_frame):
        binary = isinstance(raw_frame, (bytes, bytearray))
        text = raw_frame
        if binary and self._compression is not None and self._compression.dictionary_id is not None:
            text = self._compression.decompress(bytes(raw_frame))
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        message = super()._decode_frame(raw_frame)
        if message is None:
            self.duplicates += 1
        self.last_raw = (text, binary)
        return message


def run(base, host, out_dir, scenario):
    name = scenario["name"]
    client = RecordingClient(
        params=scenario.get("params") or None,
        base_uri=f"ws://{host}/xrpc",
        recv_timeout=10,
        compress=scenario.get("compress", True),
    )
    delivered = []
    dropped = {"done": False}
    count = scenario["count"]
    drop_after = scenario.get("drop_after")

    def on_message(message):
        text, binary = client.last_raw
        delivered.append(
            {
                "raw": text,
                "binary": binary,
                "model": get_model_as_dict(message),
            }
        )
        if drop_after is not None and not dropped["done"] and len(delivered) >= drop_after:
            dropped["done"] = True
            if scenario.get("drop_file"):
                # The Rust test watches for this file and kills the server (a relay has no
                # /drop endpoint): the library must reconnect once it is back.
                with open(scenario["drop_file"], "w", encoding="utf-8") as f:
                    f.write(str(client.cursor))
            else:
                urllib.request.urlopen(f"{base}/drop", timeout=5).read()
        if len(delivered) >= count:
            client.stop()

    timer = threading.Timer(SCENARIO_DEADLINE_S, client.stop)
    timer.start()
    error = None
    started = time.monotonic()
    try:
        client.start(on_message)
    except Exception as e:  # noqa: BLE001 - reported to the Rust test
        error = {"class": type(e).__name__, "message": str(e)}
    finally:
        timer.cancel()
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
        for d in delivered:
            f.write(json.dumps(d, ensure_ascii=False))
            f.write("\n")
    return {
        "delivered": len(delivered),
        "duplicates_dropped": client.duplicates,
        "connects": client.connects,
        "compressed": client.compressed,
        "cursor": client.cursor,
        "dropped": dropped["done"],
        "error": error,
        "seconds": round(time.monotonic() - started, 2),
    }


def main():
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    host, out_dir, scenarios = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    base = f"http://{host}"
    summary = {s["name"]: run(base, host, out_dir, s) for s in scenarios}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
