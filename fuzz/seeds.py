#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into fuzz/corpus/<target>/.

The seeds are the project's own examples: the payloads of the README and
the tests, the shipped broker.toml, the agent.toml of the agent's tests.
scripts/fuzz.sh --cmin minimises each corpus afterwards. Seeds are named
seed-<n>; re-running this script only rewrites them.
"""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def zigzag(n):
    return (n << 1) ^ (n >> 63)


def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload


def packed(num, values, enc):
    return field(num, 2, b"".join(enc(v) for v in values))


def series_def(sid, name, labels=()):
    body = field(1, 0, sid) + field(2, 2, name.encode())
    for k, v in labels:
        body += field(3, 2, field(1, 2, k.encode()) + field(2, 2, v.encode()))
    return field(3, 2, body)


def points(sid, ts, ints=None, doubles=None, floats=None):
    deltas, prev = [], 0
    for t in ts:
        deltas.append(t - prev)
        prev = t
    body = field(1, 0, sid) + packed(2, deltas, lambda d: varint(zigzag(d)))
    if doubles is not None:
        body += packed(3, doubles, lambda v: struct.pack("<d", v))
    if ints is not None:
        d, prev = [], 0
        for v in ints:
            d.append(v - prev)
            prev = v
        body += packed(4, d, lambda x: varint(zigzag(x)))
    if floats is not None:
        body += packed(5, floats, lambda v: struct.pack("<f", v))
    return field(4, 2, body)


def gap(session, a, b, samples, t0, t1):
    body = (field(1, 2, session) + field(2, 0, a) + field(3, 0, b) + field(4, 0, samples)
            + field(5, 0, t0) + field(6, 0, t1))
    return field(5, 2, body)


def batch(seq, *parts, settled=0, session=bytes(range(1, 17))):
    out = field(1, 2, session) + field(2, 0, seq) + b"".join(parts)
    if settled:
        out += field(6, 0, settled)
    return out


T = 1_699_999_990_000  # just before the harness's fixed now
S = bytes(range(1, 17))
PROTO = [
    # The first byte picks the limits in the harness: keep both parities.
    batch(1, series_def(1, "cpu.usage_pct"), points(1, [T, T + 1000], doubles=[12.5, 13.25])),
    batch(7, series_def(1, "mem.used_bytes", [("host", "kiosk-1")]),
          series_def(2, "proc.rss", [("name", "nginx")]),
          points(1, [T, T + 1000, T + 2000], ints=[1 << 30, (1 << 30) + 4096, 1 << 31]),
          points(2, [T], floats=[1.5]), settled=6),
    batch(10, points(3, [T + 5], doubles=[0.0]), gap(S, 3, 5, 900, T - 9000, T - 3000), settled=2),
    batch(2, gap(bytes(16), 1, 1, 0, 0, 0)),
    b"",
]
# An unknown fixed32 field first (key 0x7d, odd): the harness then applies
# its small limits; prost skips the field.
PROTO += [b"\x7d\0\0\0\0" + p for p in PROTO[:3]] + [
    b"\x7d\0\0\0\0" + batch(3, series_def(1, "a"), points(1, [T] * 9, ints=list(range(9)))),
]

JSON = [
    b'{"series":"temp","value":21.5}',
    b'{"samples":[{"series":"temp","ts":1700000000000,"value":21.5},'
    b'{"series":"rh","labels":{"room":"lab"},"value":40}]}',
    b'{"series":"queue.depth","value":3}',
    b'{"series":"x","value":-0.0,"ts":1699999999999}',
]

STATSD = [
    b"gorets:1|c\ngorets:1|c|@0.1\nglork:320|ms\nglork:320|ms|@0.1",
    b"gaugor:333|g\ngaugor:-10|g\ngaugor:+4|g\nuniques:765|s",
    b"hist:1.5|h\ndist:2|d\npage.views:1|c|#env:prod,region:eu-1\nx:1|c|@0.5|#urgent",
    b"my metric/x:1|c\r\n\n  \nb:2|g\n\xffbad\n",
]

AGENT = [
    b'# agent\ndevice = "kiosk-1"  # trailing comment\nspool_max_bytes = 1_048_576\n'
    b'watch = ["nginx", "ssh d"]\nwatch_pid = [12, 34,]\nname = "a \\"b\\""\n',
    b'device = "kiosk-1"\nbroker = "10.0.0.5:1883"\nbatch_max_wait = "5s"\n'
    b'watch = ["nginx", "sshd"]\nspool_max_bytes = 1048576\n',
    b'device = "ok"\ninterval = "fast"\nbogus = 1\nspool_max_bytes = 5\n',
    b'device = "d1"\nusername = "d1"\npassword = "d1-secret-pw"\nevents_udp = "127.0.0.1:8126"\n'
    b'statsd = "127.0.0.1:8125"\nstatsd_flush = "10s"\nevents_queue = 100\nack_timeout = "2s"\n',
]

with open(os.path.join(ROOT, "broker.toml"), "rb") as f:
    # Without its comment lines: the same keys, a third of the size, so
    # the corpus derived from it stays small.
    SHIPPED = b"".join(l for l in f.readlines() if not l.lstrip().startswith(b"#"))
BROKER = [
    SHIPPED,
    SHIPPED + b'\n[v4.1.connections.auth]\nd1 = "d1-secret"\nd2 = "d2-secret"\n'
    b'viewer = "viewer-secret"\n\n[access]\nobservers = ["viewer"]\n',
    b'[v4.1]\nname = "v4-1"\nlisten = "127.0.0.1:0"\nnext_connection_delay_ms = 0\n'
    b'[v4.1.connections]\nconnection_timeout_ms = 5000\nmax_payload_size = 1024\n'
    b'max_inflight_count = 10\n[router]\nmax_connections = 10\nmax_segment_size = 1024\n'
    b'max_segment_count = 1\nmax_outgoing_packet_count = 10\n',
]

WS = [
    b'{"subscribe":{"devices":["d1"],"series":["cpu.usage_pct"],"status":true,"events":true,"since":5}}',
    b'{"subscribe":{"devices":null,"series":null,"status":false,"events":false,"since":null}}',
    b'{"subscribe":{}}',
    b'{"subscribe":{"devices":["bad id"]}}',
]

TARGETS = {
    "proto_batch": PROTO,
    "json_samples": JSON,
    "statsd": STATSD,
    "agent_toml": AGENT,
    "broker_toml": BROKER,
    "ws_subscribe": WS,
}

if __name__ == "__main__":
    base = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus")
    for name, seeds in TARGETS.items():
        d = os.path.join(base, name)
        os.makedirs(d, exist_ok=True)
        for i, s in enumerate(seeds):
            with open(os.path.join(d, f"seed-{i}"), "wb") as f:
                f.write(s)
        print(f"{name}: {len(seeds)} seeds in {d}")
