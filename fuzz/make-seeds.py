#!/usr/bin/env python3
"""Writes the committed seed corpora (fuzz/seeds/<target>/) from the real sample events and the
inputs the unit tests use. Re-run after changing an input format; the files are small."""
import hashlib, json, os, shutil, struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEEDS = os.path.join(HERE, "seeds")
SAMPLE = [l.encode() for l in open(os.path.join(ROOT, "assets/jetstream-v1-sample.jsonl")).read().splitlines()]
MASK = bytes([0x37, 0xFA, 0x21, 0x3D])


def put(target, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)


def masked(opcode, payload, fin=True, mask=MASK):
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n <= 125:
        head = bytes([b0, 0x80 | n])
    elif n <= 0xFFFF:
        head = bytes([b0, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, 0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


shutil.rmtree(SEEDS, ignore_errors=True)

UPDATES = [
    b'{"type":"options_update","payload":{"wantedCollections":["app.bsky.feed.post","app.bsky.graph.*"],"wantedDids":["did:plc:b","did:plc:a"],"maxMessageSizeBytes":5000}}',
    b'{"type":"options_update","payload":{"wantedDids":["did:plc:a"]}}',
    b'{"type":"options_update","payload":{}}',
    b'{"type":"options_update","payload":null}',
    b'{"payload":{"wantedCollections":null,"wantedDids":[],"maxMessageSizeBytes":null},"type":"options_update","extra":1}',
    b'{"type":"options_update","payload":{"maxMessageSizeBytes":99999999999}}',
    b'{"Type":"options_update","PAYLOAD":{"WantedCollections":["app.bsky.feed.like"],"wanteddids":["did:plc:a"]}}',
    b'{"type":"options_update","payload":{"wantedCollections":["app.bsky.graph.fo*"]}}',
    b'{"type":"options_update","payload":{"maxMessageSizeBytes":1.5}}',
    b'{"type":"hello"}',
]

# frame_decoder: [max selector][split count][sizes][client stream]
streams = [
    masked(1, b"hello"),
    masked(1, b"hel", fin=False) + masked(9, b"ping") + masked(0, b"lo"),
    masked(2, bytes(range(200))) + masked(10, b"") + masked(8, struct.pack(">H", 1000) + b"bye"),
    masked(1, "h\u00e9llo \u2603".encode()[:3], fin=False) + masked(0, "h\u00e9llo \u2603".encode()[3:]),
    masked(1, UPDATES[0]),
    masked(1, b"x" * 70000),
    bytes([0x81, 0x05]) + b"hello",  # unmasked
    masked(8, b"\x03"),
]
for i, s in enumerate(streams):
    put("frame_decoder", bytes([3, 3, 1, 7, 64]) + s)
    put("frame_decoder", bytes([i * 4 + 1, 0]) + s)

# frame_roundtrip: arbitrary-structured; any bytes decode to some plan.
for s in streams[:4]:
    put("frame_roundtrip", s)

# http_upgrade: the handshake tests' requests.
def upgrade(path="/subscribe?wantedCollections=app.bsky.feed.post", extra=b""):
    return (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: relay.example\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n")
for r in [
    upgrade(),
    upgrade(extra=b"Socket-Encoding: zstd\r\n"),
    upgrade("http://relay.example/subscribe?cursor=1783175888085434&compress=true"),
    b"GET / HTTP/1.0\r\n\r\n",
    b"POST /subscribe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n\r\n",
    upgrade(extra=b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"),
]:
    put("http_upgrade", r)

# subscribe_query: [socket-encoding selector][query]
for q in [
    "wantedCollections=app.bsky.feed.post&wantedCollections=app.bsky.graph.*",
    "wantedDids=did:plc:wq4aajammjtxdomz3e23667t&wantedDids=did%3Aplc%3Aa&cursor=1783175888085434",
    "compress=true&requireHello=true&maxMessageSizeBytes=600",
    "cursor=+5&maxMessageSizeBytes=99999999999&wantedCollections=app.bsky.*",
    "cursor=x&wantedCollections=bad",
    "a=1&b=x%2Fy&c=&d&e=%zz",
    "wantedCollections=app.bsky.feed.post&wantedCollections=app.bsky.feed.*&wantedCollections=chat.bsky.actor.declaration",
]:
    put("subscribe_query", b"\x00" + q.encode())
    put("subscribe_query", b"\x01" + q.encode())

for u in UPDATES:
    put("options_update", u)

# proxy_v2: [mode][bytes]
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
put("proxy_v2", b"\x00" + SIG + bytes([0x21, 0x11, 0, 12, 192, 0, 2, 7, 198, 51, 100, 1, 0xC8, 0x22, 1, 0xBB]) + b"GET / HTTP/1.1\r\n")
put("proxy_v2", b"\x00" + SIG + bytes([0x21, 0x21, 0, 36 + 7]) + bytes(range(36)) + bytes([1, 0, 4]) + b"h2/1")
put("proxy_v2", b"\x00" + SIG + bytes([0x20, 0x00, 0, 0]))
put("proxy_v2", b"\x00" + SIG + bytes([0x21, 0x31, 0, 216]) + bytes(216))
put("proxy_v2", b"\x00PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n")
put("proxy_v2", b"\x01" + bytes(range(64)))

# upstream_event: the real events, and the shapes the tests refuse.
for line in SAMPLE:
    put("upstream_event", line)
for bad in [
    b'{"did":"did:plc:a","time_us":1,"kind":"commit","commit":{"rev":"r","operation":"create","collection":"c","rkey":"k"},"time_us":2}',
    b'{"did":"did:plc:a","time_us":1.5,"kind":"identity","identity":{"seq":1}}',
    b'{"did":"did:plc:a","time_us":1,"kind":"account","account":{"seq":18446744073709551615}}',
    b'{"did":"x","time_us":1,"kind":"other"}',
]:
    put("upstream_event", bad)

# recovery: arbitrary-structured plans; a few byte strings to start from.
for i in range(4):
    put("recovery", hashlib.sha256(bytes([i])).digest() * (i + 1))

# config_toml: the documented settings.
for t in [
    b'listen = "[::]:6008"\nretention = "72h"\nmax_disk = "200GiB"\nmax_clients = 100000\nmetrics_listen = "127.0.0.1:6009"\n',
    b'upstream = ["wss://jetstream1.us-east.bsky.network/subscribe"]\ndemo = true\ndemo_rate = 500\nworkers = 2\n',
    b'trusted_listen = "unix:/run/jetrelay/trusted.sock"\nallow_ip = ["10.0.0.0/8", "::1"]\nconn_rate_per_ip = 2.5\n',
    b'max_lag = "30s"\nthin_linger = "80ms"\nthin_linger_load = 0.1\nfanout_duty = 0.5\nping_interval = "30s"\nmax_inbound_rate = "2MiB"\n',
    b'otlp_endpoint = "http://127.0.0.1:4318"\nhandshake_timeout = "10s"\nrewind = "5s"\n',
    b'retention = "0s"\n',
]:
    put("config_toml", t)

# subscribe_events_query: [socket-encoding selector][query] (the v2 parser's unit tests).
V2_DICT = 20260811
for q in [
    "",
    "kinds=commit&kinds=identity&collections=app.bsky.feed.post&collections=app.bsky.graph.*&dids=did:plc:bbb&dids=did:plc:aaa&maxMessageSizeBytes=4096&zstdDictionary=%d&cursor=17" % V2_DICT,
    "kinds=sync&dids=did:plc:wq4aajammjtxdomz3e23667t&cursor=1783175888085434",
    "kinds=identity&collections=app.bsky.feed.post",
    "zstdDictionary=1612007021&wantedDids=did:plc:a",
    "compress=true&requireHello=true&wantedCollections=app.bsky.feed.post",
    "maxMessageSizeBytes=4294967295&kinds=commit&kinds=commit&cursor=-5",
    "collections=app.*&dids=did%3Aplc%3Aa&a=%zz",
]:
    put("subscribe_events_query", b"\x00" + q.encode())
    put("subscribe_events_query", b"\x01" + q.encode())


# v2_frame: [mode][bytes]; mode 0 v2 frames, 1 v1 events, 2 frames to compress, 3 raw binary.
def rfc3339(us):
    import datetime
    t = datetime.datetime(1970, 1, 1) + datetime.timedelta(microseconds=us)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + "%06dZ" % t.microsecond


def v2_frame(line, seq, witnessed=1783175889000001):
    v = json.loads(line)
    kind = v["kind"]
    payload = {"did": v["did"], "seq": seq, "time": rfc3339(v["time_us"]), "witnessedAt": rfc3339(witnessed)}
    if kind == "commit":
        payload.update(v["commit"])
    else:
        payload[kind] = v[kind]
    body = {"$type": "network.bsky.jetstream.subscribeEvents#" + kind}
    body.update(sorted(payload.items()))
    return json.dumps({"$type": "message", "payload": body}, separators=(",", ":"), ensure_ascii=False).encode()


picked = [SAMPLE[0], SAMPLE[5]] + [l for l in SAMPLE if b'"delete"' in l or b'"update"' in l][:2] + [
    l for l in SAMPLE if b'"kind":"identity"' in l or b'"kind":"account"' in l]
for i, line in enumerate(picked):
    put("v2_frame", b"\x00" + v2_frame(line, 12345 + i))
    put("v2_frame", b"\x01" + line)
put("v2_frame", b"\x02" + v2_frame(picked[0], 7))
put("v2_frame", b"\x02" + v2_frame(picked[-1], 8))
for frame in [
    b'{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#sync","did":"did:plc:a","seq":3,"sync":{"blocks":{"$bytes":"AA"},"did":"did:plc:a","rev":"r","seq":1,"time":"2026-07-04T14:38:07.877Z"},"time":"2026-07-04T14:38:08.000000Z"}}',
    b'{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#info","message":"m","name":"OutdatedCursor"}}',
    b'{"$type":"error","error":"ConsumerTooSlow","message":"bye"}',
    b'{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#label"}}',
]:
    put("v2_frame", b"\x00" + frame)
    put("v2_frame", b"\x02" + frame)
# A zstd frame header (magic, dictionary-id flag) and garbage.
put("v2_frame", b"\x03" + bytes([0x28, 0xB5, 0x2F, 0xFD, 0x23]) + struct.pack("<I", V2_DICT) + bytes(range(40)))
put("v2_frame", b"\x03" + b"not zstd")
