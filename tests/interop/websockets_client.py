#!/usr/bin/env python3
"""Drives a jetrelay with Python's `websockets` client (an independent implementation).

Usage: websockets_client.py BASE_URL DICTIONARY OUT_DIR COUNT

BASE_URL is ws://HOST:PORT/subscribe of a relay holding a complete, finished stream of COUNT
events. Received events are written to OUT_DIR (one JSON per line, exactly as received or as
decoded) for the Rust test to compare byte-exact with its own reference; this script checks
the protocol-level facts itself and prints one JSON summary on stdout. Exit status 0 = every
check here passed; otherwise a message on stderr says which.
"""

import json
import os
import sys
import time

import websockets
import zstandard
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

# How long a finished stream must stay silent before a reader decides it has everything.
QUIET_S = 1.5
# Bound on any single wait, so the script always ends.
WAIT_S = 15.0


def fail(msg):
    print(f"interop failure: {msg}", file=sys.stderr)
    sys.exit(1)


def open_ws(url, headers=None):
    # Keepalive pings off (the ping check is explicit); the default permessage-deflate offer is
    # left on, so the relay must decline it properly.
    return connect(
        url,
        additional_headers=headers,
        max_size=None,
        ping_interval=None,
        open_timeout=WAIT_S,
        close_timeout=5,
    )


def read_n(ws, n, want_type, what):
    out = []
    while len(out) < n:
        try:
            m = ws.recv(timeout=WAIT_S)
        except TimeoutError:
            fail(f"{what}: only {len(out)} of {n} messages")
        if not isinstance(m, want_type):
            fail(f"{what}: message {len(out)} is {type(m).__name__}, expected {want_type.__name__}")
        out.append(m)
    return out


def read_until_quiet(ws, want_type, what):
    out = []
    while True:
        try:
            m = ws.recv(timeout=QUIET_S)
        except TimeoutError:
            return out
        if not isinstance(m, want_type):
            fail(f"{what}: message {len(out)} is {type(m).__name__}")
        out.append(m)


def write_lines(out_dir, name, events):
    with open(os.path.join(out_dir, name), "wb") as f:
        for e in events:
            f.write(e if isinstance(e, bytes) else e.encode("utf-8"))
            f.write(b"\n")


def main():
    if len(sys.argv) != 5:
        fail(__doc__)
    base, dict_path, out_dir, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(dict_path, "rb") as f:
        dictionary = zstandard.ZstdCompressionDict(f.read())
    summary = {"websockets": websockets.__version__, "zstandard": zstandard.__version__}

    # 1. Plain stream: text frames.
    with open_ws(f"{base}?cursor=0") as ws:
        plain = read_n(ws, count, str, "plain")
    write_lines(out_dir, "plain.jsonl", plain)
    summary["plain"] = len(plain)

    # 2. Compressed stream, both ways of asking: binary frames, each a zstd frame made with the
    #    dictionary, decoded here by python-zstandard.
    for name, url, headers in [
        ("compressed", f"{base}?cursor=0&compress=true", None),
        ("header", f"{base}?cursor=0", {"Socket-Encoding": "zstd"}),
    ]:
        with open_ws(url, headers) as ws:
            frames = read_n(ws, count, bytes, name)
        decoder = zstandard.ZstdDecompressor(dict_data=dictionary)
        decoded = []
        for i, frame in enumerate(frames):
            try:
                decoded.append(decoder.decompress(frame))
            except zstandard.ZstdError as e:
                fail(f"{name}: frame {i} does not decode: {e}")
        write_lines(out_dir, f"{name}.jsonl", decoded)
        summary[name] = len(decoded)

    # 3. A filter.
    with open_ws(f"{base}?cursor=0&wantedCollections=app.bsky.graph.*") as ws:
        filtered = read_until_quiet(ws, str, "filtered")
    write_lines(out_dir, "filtered.jsonl", filtered)
    summary["filtered"] = len(filtered)

    # 4. options_update as the hello of a requireHello client: nothing before it, then its
    #    filters (not the query's) from cursor 0.
    with open_ws(f"{base}?cursor=0&requireHello=true&wantedCollections=app.bsky.feed.post") as ws:
        try:
            early = ws.recv(timeout=1.0)
            fail(f"hello: a message arrived before the hello: {early[:80]!r}")
        except TimeoutError:
            pass
        update = {
            "type": "options_update",
            "payload": {"wantedCollections": ["app.bsky.feed.repost"], "maxMessageSizeBytes": 600},
        }
        ws.send(json.dumps(update))
        hello = read_until_quiet(ws, str, "hello")
    write_lines(out_dir, "hello.jsonl", hello)
    summary["hello"] = len(hello)

    # 5. An invalid options_update: the relay closes with a reason.
    ws = open_ws(f"{base}?cursor=0")
    ws.send("{not json")
    try:
        while True:
            ws.recv(timeout=WAIT_S)
    except ConnectionClosed as e:
        if e.rcvd is None:
            fail("invalid update: connection ended without a close frame")
        summary["invalid_close"] = [e.rcvd.code, e.rcvd.reason]
    except TimeoutError:
        fail("invalid update: the relay did not close the connection")

    # 6. Ping/pong, then a client-initiated close handshake, on a live (idle) connection.
    future = int(time.time() * 1e6) + 3_600_000_000
    ws = open_ws(f"{base}?cursor={future}")
    rtts = []
    for i in range(3):
        t0 = time.monotonic()
        pong = ws.ping(f"jetrelay-interop-{i}".encode())
        if not pong.wait(WAIT_S):
            fail(f"ping {i}: no pong")
        rtts.append(round((time.monotonic() - t0) * 1000, 3))
    summary["ping_rtt_ms"] = rtts
    ws.close(1000, "bye")
    proto = ws.protocol
    if proto.close_rcvd is None:
        fail("close: the relay did not answer the client's close frame")
    summary["close_sent"] = [proto.close_sent.code, proto.close_sent.reason]
    summary["close_rcvd"] = [proto.close_rcvd.code, proto.close_rcvd.reason]
    summary["close_rcvd_then_sent"] = proto.close_rcvd_then_sent

    print(json.dumps(summary))


if __name__ == "__main__":
    main()
