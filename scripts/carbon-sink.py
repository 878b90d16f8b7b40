#!/usr/bin/env python3
"""A stand-in Carbon for benchmarks: accepts plaintext connections on a
free loopback port (printed first), counts the lines it reads, closes
each connection at the sender's end of stream (as Carbon does), and on
SIGTERM prints the count. Used by scripts/bench-statsd.sh."""
import selectors
import signal
import socket
import sys

lines = 0
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(64)
print(srv.getsockname()[1], flush=True)
sel = selectors.DefaultSelector()
sel.register(srv, selectors.EVENT_READ)


def stop(*_):
    print(lines, flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is srv:
            c, _ = srv.accept()
            sel.register(c, selectors.EVENT_READ)
            continue
        data = s.recv(1 << 20)
        if not data:
            sel.unregister(s)
            s.close()
            continue
        lines += data.count(b"\n")
