#!/usr/bin/env python3
"""Sends statsd lines over UDP at a fixed rate for a bounded time, then
prints how many it sent. Used by scripts/bench-statsd.sh.

    statsd-flood.py HOST:PORT LINES_PER_S SECONDS [NAMES]

Lines go 50 to a packet; names cycle through NAMES distinct metrics
(counters, timers and gauges, a third each).
"""
import socket
import sys
import time

host, port = sys.argv[1].rsplit(":", 1)
rate = int(sys.argv[2])
seconds = float(sys.argv[3])
names = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
per_packet = 50
kinds = ["c", "ms", "g"]
lines = [
    f"bench.m{i}:{i % 97 + 1}|{kinds[i % 3]}".encode() for i in range(names)
]
packets = [
    b"\n".join(lines[(j + k) % names] for k in range(per_packet))
    for j in range(0, names, per_packet)
]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
addr = (host, int(port))
start = time.monotonic()
sent = 0
i = 0
while True:
    now = time.monotonic() - start
    if now >= seconds:
        break
    # Keep to the rate: send what is due by now, then yield briefly.
    due = int(now * rate)
    while sent < due:
        sock.sendto(packets[i % len(packets)], addr)
        sent += per_packet
        i += 1
    time.sleep(0.001)
print(sent)
