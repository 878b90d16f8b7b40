"""N plain MQTT clients (Debian's python3-paho-mqtt), each publishing a JSON
sample {"series":"temp","value":V} once a second on
widgetry/v1/{prefix}{i:03}/samples/json, for the fleet end-to-end test.

Commands on stdin, one per line:
  stop NAME...        disconnect these clients (they stop publishing)
  set NAME VALUE      publish VALUE for NAME from now on
Bounded: exits after --max-seconds (default 300) or at the end of stdin.

  python3 plain_clients.py --port 1883 --count 200 --prefix plain-
"""
import argparse
import sys
import threading
import time

import paho.mqtt.client as mqtt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--prefix", default="plain-")
    ap.add_argument("--value", type=float, default=20.0)
    ap.add_argument("--max-seconds", type=float, default=300)
    a = ap.parse_args()
    names = [f"{a.prefix}{i:03}" for i in range(a.count)]
    values = {n: a.value for n in names}
    clients = {}
    for n in names:
        c = mqtt.Client(client_id=f"e2e-{n}", protocol=mqtt.MQTTv311)
        c.connect("127.0.0.1", a.port, keepalive=30)
        c.loop_start()
        clients[n] = c
    lock = threading.Lock()
    done = threading.Event()

    def commands():
        for line in sys.stdin:
            parts = line.split()
            with lock:
                if parts[:1] == ["stop"]:
                    for n in parts[1:]:
                        c = clients.pop(n, None)
                        if c:
                            c.disconnect()
                            c.loop_stop()
                elif parts[:1] == ["set"] and len(parts) == 3:
                    values[parts[1]] = float(parts[2])
            print("ok", line.strip(), flush=True)
        done.set()

    threading.Thread(target=commands, daemon=True).start()
    end = time.monotonic() + a.max_seconds
    while not done.is_set() and time.monotonic() < end:
        with lock:
            for n, c in clients.items():
                c.publish(f"widgetry/v1/{n}/samples/json", '{"series":"temp","value":%s}' % values[n], qos=0)
        done.wait(1.0)  # the clients' cadence
    for c in clients.values():
        c.disconnect()
        c.loop_stop()


if __name__ == "__main__":
    main()
