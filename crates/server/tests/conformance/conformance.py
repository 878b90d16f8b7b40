#!/usr/bin/python3
"""MQTT conformance probe (3.1.1 and 5.0).

Usage:
  /usr/bin/python3 conformance.py --host 127.0.0.1 --port 1883 --version 311|5 [--case NAME ...]
  /usr/bin/python3 conformance.py --list

Prints one JSON line per case: {"case", "version", "ok", "detail"}; exit status 1 if
any case failed. Every case uses fresh client ids and a fresh topic prefix
(conf/<random>/...), every wait has a deadline, and every case runs under a
per-case timeout so a hanging or crashed broker cannot stall the run.

Most cases use paho-mqtt 1.6 (Debian's /usr/bin/python3); cases that need
control paho does not give (no PUBACK, raw flags, packet sizes, topic aliases
sent by the server, abrupt socket close) use the small raw client below.

`connection_limit` is not in the default set (it may break the broker): run it
explicitly against a broker started with a small [router] max_connections:
  conformance.py ... --case connection_limit --max-connections 5
"""

import argparse
import json
import queue
import random
import socket
import string
import struct
import sys
import threading
import time
import traceback

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

CASE_TIMEOUT = 12.0  # hard per-case limit (seconds)


class CaseFail(Exception):
    pass


def rnd(n=8):
    return "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(n))


class Ctx:
    def __init__(self, host, port, version, args):
        self.host, self.port, self.version, self.args = host, port, version, args
        self.run = rnd(6)
        self.cleanup = []  # callables run after the case

    @property
    def v5(self):
        return self.version == 5

    def cid(self, tag="c"):
        return "conf-%s-%s-%s" % (tag, self.run, rnd(6))

    def prefix(self, case):
        return "conf/%s/%s" % (rnd(10), case)


# --------------------------------------------------------------------------
# Raw MQTT client (3.1.1 and 5.0)
# --------------------------------------------------------------------------

PROPS = {
    0x01: ("PayloadFormatIndicator", "byte"),
    0x02: ("MessageExpiryInterval", "u32"),
    0x03: ("ContentType", "str"),
    0x08: ("ResponseTopic", "str"),
    0x09: ("CorrelationData", "bin"),
    0x0B: ("SubscriptionIdentifier", "varint"),
    0x11: ("SessionExpiryInterval", "u32"),
    0x12: ("AssignedClientIdentifier", "str"),
    0x13: ("ServerKeepAlive", "u16"),
    0x15: ("AuthenticationMethod", "str"),
    0x16: ("AuthenticationData", "bin"),
    0x17: ("RequestProblemInformation", "byte"),
    0x18: ("WillDelayInterval", "u32"),
    0x19: ("RequestResponseInformation", "byte"),
    0x1A: ("ResponseInformation", "str"),
    0x1C: ("ServerReference", "str"),
    0x1F: ("ReasonString", "str"),
    0x21: ("ReceiveMaximum", "u16"),
    0x22: ("TopicAliasMaximum", "u16"),
    0x23: ("TopicAlias", "u16"),
    0x24: ("MaximumQoS", "byte"),
    0x25: ("RetainAvailable", "byte"),
    0x26: ("UserProperty", "pair"),
    0x27: ("MaximumPacketSize", "u32"),
    0x28: ("WildcardSubscriptionAvailable", "byte"),
    0x29: ("SubscriptionIdentifierAvailable", "byte"),
    0x2A: ("SharedSubscriptionAvailable", "byte"),
}
PROP_IDS = {name: (pid, typ) for pid, (name, typ) in PROPS.items()}
MULTI = {"UserProperty", "SubscriptionIdentifier"}


def enc_varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            b |= 0x80
        out.append(b)
        if not n:
            return bytes(out)


def dec_varint(buf, i):
    mult, val = 1, 0
    for _ in range(4):
        b = buf[i]
        i += 1
        val += (b & 0x7F) * mult
        if not b & 0x80:
            return val, i
        mult *= 128
    raise ValueError("bad varint")


def enc_str(s):
    if isinstance(s, str):
        s = s.encode()
    return struct.pack("!H", len(s)) + s


def dec_str(buf, i, raw=False):
    (n,) = struct.unpack_from("!H", buf, i)
    v = bytes(buf[i + 2:i + 2 + n])
    return (v if raw else v.decode("utf-8", "replace")), i + 2 + n


def enc_props(props):
    out = bytearray()
    for name, val in (props or {}).items():
        pid, typ = PROP_IDS[name]
        vals = val if name in MULTI else [val]
        for v in vals:
            out.append(pid)
            if typ == "byte":
                out.append(v)
            elif typ == "u16":
                out += struct.pack("!H", v)
            elif typ == "u32":
                out += struct.pack("!I", v)
            elif typ == "varint":
                out += enc_varint(v)
            elif typ in ("str", "bin"):
                out += enc_str(v)
            elif typ == "pair":
                out += enc_str(v[0]) + enc_str(v[1])
    return enc_varint(len(out)) + bytes(out)


def dec_props(buf, i):
    n, i = dec_varint(buf, i)
    end = i + n
    props = {}
    while i < end:
        pid = buf[i]
        i += 1
        name, typ = PROPS.get(pid, ("0x%02x" % pid, None))
        if typ == "byte":
            v = buf[i]
            i += 1
        elif typ == "u16":
            (v,) = struct.unpack_from("!H", buf, i)
            i += 2
        elif typ == "u32":
            (v,) = struct.unpack_from("!I", buf, i)
            i += 4
        elif typ == "varint":
            v, i = dec_varint(buf, i)
        elif typ == "str":
            v, i = dec_str(buf, i)
        elif typ == "bin":
            v, i = dec_str(buf, i, raw=True)
        elif typ == "pair":
            k, i = dec_str(buf, i)
            vv, i = dec_str(buf, i)
            v = (k, vv)
        else:
            raise ValueError("unknown property 0x%02x" % pid)
        if name in MULTI:
            props.setdefault(name, []).append(v)
        else:
            props[name] = v
    return props, end


TYPES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
         7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
         12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH"}


class Raw:
    """Minimal MQTT client over a plain socket; a reader thread collects packets."""

    def __init__(self, ctx, timeout=5.0):
        self.ctx = ctx
        self.v5 = ctx.v5
        self.sock = socket.create_connection((ctx.host, ctx.port), timeout=timeout)
        self.sock.settimeout(0.5)
        self.cv = threading.Condition()
        self.packets = []
        self.taken = set()
        self.closed = threading.Event()
        self.close_reason = None
        self.closed_at = None
        self._stop = False
        self._pid = 0
        self.t = threading.Thread(target=self._reader, daemon=True)
        self.t.start()
        ctx.cleanup.append(self.close)

    # ---- io
    def _reader(self):
        buf = bytearray()
        deadline = time.time() + 120  # reader never outlives a run by much
        try:
            while not self._stop and time.time() < deadline:
                try:
                    d = self.sock.recv(65536)
                except socket.timeout:
                    continue
                if not d:
                    self.close_reason = "EOF (server closed socket)"
                    break
                buf += d
                while True:
                    pkt, used = self._try_parse(buf)
                    if pkt is None:
                        break
                    del buf[:used]
                    with self.cv:
                        self.packets.append(pkt)
                        self.cv.notify_all()
        except OSError as e:
            self.close_reason = "socket error: %s" % e
        except Exception as e:  # parse error
            self.close_reason = "parse error: %r" % e
        finally:
            self.closed_at = time.time()
            self.closed.set()
            with self.cv:
                self.cv.notify_all()

    def _try_parse(self, buf):
        if len(buf) < 2:
            return None, 0
        try:
            rl, i = dec_varint(buf, 1)
        except IndexError:
            return None, 0
        if len(buf) < i + rl:
            return None, 0
        pkt = self._parse(buf[0], bytes(buf[i:i + rl]))
        pkt["size"] = i + rl
        pkt["t"] = time.time()
        return pkt, i + rl

    def _parse(self, h, body):
        typ = TYPES.get(h >> 4, "?%d" % (h >> 4))
        p = {"type": typ, "flags": h & 0x0F}
        i = 0
        if typ == "CONNACK":
            p["session_present"] = body[0] & 1
            p["rc"] = body[1]
            if self.v5 and len(body) > 2:
                p["props"], _ = dec_props(body, 2)
        elif typ == "PUBLISH":
            p["dup"] = (h >> 3) & 1
            p["qos"] = (h >> 1) & 3
            p["retain"] = h & 1
            p["topic"], i = dec_str(body, 0)
            if p["qos"]:
                (p["pid"],) = struct.unpack_from("!H", body, i)
                i += 2
            p["props"] = {}
            if self.v5:
                p["props"], i = dec_props(body, i)
            p["payload"] = body[i:]
        elif typ in ("PUBACK", "PUBREC", "PUBREL", "PUBCOMP"):
            (p["pid"],) = struct.unpack_from("!H", body, 0)
            p["rc"] = body[2] if len(body) > 2 else 0
        elif typ in ("SUBACK", "UNSUBACK"):
            (p["pid"],) = struct.unpack_from("!H", body, 0)
            i = 2
            if self.v5:
                p["props"], i = dec_props(body, i)
            p["codes"] = list(body[i:])
        elif typ == "DISCONNECT":
            p["rc"] = body[0] if body else 0
            if self.v5 and len(body) > 1:
                p["props"], _ = dec_props(body, 1)
        return p

    def send(self, data):
        self.sock.sendall(data)

    def packet(self, h, body):
        self.send(bytes([h]) + enc_varint(len(body)) + body)

    def next_pid(self):
        self._pid = self._pid % 65535 + 1
        return self._pid

    # ---- waiting
    def wait(self, pred, timeout):
        """First not-yet-taken packet matching pred, or None after timeout."""
        end = time.time() + timeout
        with self.cv:
            while True:
                for idx, p in enumerate(self.packets):
                    if idx not in self.taken and pred(p):
                        self.taken.add(idx)
                        return p
                left = end - time.time()
                if left <= 0 or self.closed.is_set():
                    # closed: one last scan done above
                    return None
                self.cv.wait(left)

    def wait_type(self, typ, timeout, **kw):
        return self.wait(lambda p: p["type"] == typ and all(p.get(k) == v for k, v in kw.items()), timeout)

    def all(self, typ=None):
        with self.cv:
            return [p for p in self.packets if typ is None or p["type"] == typ]

    # ---- packets
    def connect(self, client_id, clean=True, keepalive=30, will=None, props=None, wait=5.0):
        flags = 0x02 if clean else 0
        payload = enc_str(client_id)
        if will:
            flags |= 0x04 | (will.get("qos", 0) << 3) | (0x20 if will.get("retain") else 0)
            if self.v5:
                payload += enc_props(will.get("props"))
            payload += enc_str(will["topic"]) + enc_str(will.get("payload", b""))
        if self.v5:
            vh = enc_str("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive) + enc_props(props)
        else:
            vh = enc_str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
        self.packet(0x10, vh + payload)
        if wait:
            return self.wait_type("CONNACK", wait)
        return None

    def publish(self, topic, payload=b"", qos=0, retain=False, pid=None, props=None, dup=False):
        if isinstance(payload, str):
            payload = payload.encode()
        h = 0x30 | (8 if dup else 0) | (qos << 1) | (1 if retain else 0)
        body = enc_str(topic)
        if qos:
            pid = pid or self.next_pid()
            body += struct.pack("!H", pid)
        if self.v5:
            body += enc_props(props)
        self.packet(h, body + payload)
        return pid

    def puback(self, pid):
        self.packet(0x40, struct.pack("!H", pid))

    def subscribe(self, filters, props=None, wait=5.0):
        """filters: list of (topic, qos) or (topic, qos, {nl, rap, rh})."""
        pid = self.next_pid()
        body = struct.pack("!H", pid)
        if self.v5:
            body += enc_props(props)
        for f in filters:
            topic, qos = f[0], f[1]
            o = f[2] if len(f) > 2 else {}
            opt = qos | (4 if o.get("nl") else 0) | (8 if o.get("rap") else 0) | (o.get("rh", 0) << 4)
            body += enc_str(topic) + bytes([opt])
        self.packet(0x82, body)
        if wait:
            ack = self.wait_type("SUBACK", wait, pid=pid)
            if ack is None:
                raise CaseFail("no SUBACK for %s (%s)" % ([f[0] for f in filters], self.close_reason or "timeout"))
            return ack
        return None

    def ping(self, wait=3.0):
        self.send(b"\xc0\x00")
        return self.wait_type("PINGRESP", wait)

    def disconnect(self, rc=0, props=None):
        try:
            if self.v5 and (rc or props):
                self.packet(0xE0, bytes([rc]) + enc_props(props))
            else:
                self.send(b"\xe0\x00")
        except OSError:
            pass
        self.close()

    def close(self, rst=False):
        """Close the socket (no DISCONNECT). rst=True sends a TCP RST."""
        if self._stop:
            return
        self._stop = True
        try:
            if rst:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        self.t.join(2)


def raw_connected(ctx, tag="r", client_id=None, clean=True, keepalive=30, will=None, props=None):
    c = Raw(ctx)
    cid = client_id if client_id is not None else ctx.cid(tag)
    ack = c.connect(cid, clean=clean, keepalive=keepalive, will=will, props=props)
    if ack is None:
        raise CaseFail("%s: no CONNACK (%s)" % (cid, c.close_reason or "timeout"))
    if ack["rc"] != 0:
        raise CaseFail("%s: CONNACK rc=0x%02x" % (cid, ack["rc"]))
    c.cid = cid
    c.connack = ack
    return c


# --------------------------------------------------------------------------
# paho wrapper
# --------------------------------------------------------------------------

class Msg:
    def __init__(self, m):
        self.topic = m.topic
        self.payload = m.payload
        self.qos = m.qos
        self.retain = int(bool(m.retain))
        self.dup = int(bool(m.dup))
        self.props = getattr(m, "properties", None)
        self.t = time.time()

    def prop(self, name, default=None):
        return getattr(self.props, name, default) if self.props is not None else default

    def __repr__(self):
        return "%s q%d r%d %r" % (self.topic, self.qos, self.retain, self.payload[:40])


class Paho:
    def __init__(self, ctx, tag="p", client_id=None, clean=True, keepalive=30, will=None,
                 props=None, connect=True, timeout=5.0):
        self.ctx = ctx
        self.v5 = ctx.v5
        self.cid = client_id if client_id is not None else ctx.cid(tag)
        self.clean, self.keepalive, self.props = clean, keepalive, props
        if self.v5:
            self.c = mqtt.Client(client_id=self.cid, protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        else:
            self.c = mqtt.Client(client_id=self.cid, clean_session=clean, protocol=mqtt.MQTTv311,
                                 reconnect_on_failure=False)
        self.msgs = queue.Queue()
        self.cv = threading.Condition()
        self.acks = {}  # mid -> result
        self.connack = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnect_rc = None
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_ack
        self.c.on_unsubscribe = self._on_unsub
        self.c.on_publish = self._on_pub
        self.c.on_disconnect = self._on_disconnect
        if will:
            self.c.will_set(will["topic"], will.get("payload"), will.get("qos", 0), will.get("retain", False),
                            will.get("props"))
        self._started = False
        ctx.cleanup.append(self.close)
        if connect:
            self.connect(timeout)

    def _on_connect(self, c, u, flags, rc, props=None):
        self.connack = {"session_present": flags.get("session present", 0),
                        "rc": rc.value if hasattr(rc, "value") else rc, "props": props}
        self.connected.set()

    def _on_message(self, c, u, m):
        self.msgs.put(Msg(m))

    def _on_ack(self, c, u, mid, granted, props=None):
        with self.cv:
            self.acks[mid] = granted
            self.cv.notify_all()

    def _on_unsub(self, c, u, mid, *rest):
        with self.cv:
            self.acks[mid] = rest
            self.cv.notify_all()

    def _on_pub(self, c, u, mid):
        with self.cv:
            self.acks[mid] = True
            self.cv.notify_all()

    def _on_disconnect(self, c, u, rc, *rest):
        self.disconnect_rc = rc.value if hasattr(rc, "value") else rc
        self.disconnected.set()

    def connect(self, timeout=5.0):
        kw = {}
        if self.v5:
            kw["clean_start"] = self.clean
            if self.props is not None:
                kw["properties"] = self.props
        self.c.connect(self.ctx.host, self.ctx.port, self.keepalive, **kw)
        self.c.loop_start()
        self._started = True
        if not self.connected.wait(timeout):
            raise CaseFail("%s: no CONNACK within %.0fs" % (self.cid, timeout))
        if self.connack["rc"] != 0:
            raise CaseFail("%s: CONNACK rc=%s" % (self.cid, self.connack["rc"]))
        return self.connack

    def _wait_mid(self, mid, timeout, what):
        end = time.time() + timeout
        with self.cv:
            while mid not in self.acks:
                left = end - time.time()
                if left <= 0:
                    raise CaseFail("%s: no %s for mid %s" % (self.cid, what, mid))
                self.cv.wait(left)
            return self.acks.pop(mid)

    def sub(self, topic, qos=0, no_local=False, rap=False, sub_id=None, timeout=5.0):
        if self.v5:
            props = None
            if sub_id is not None:
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = sub_id
            rc, mid = self.c.subscribe(topic, options=SubscribeOptions(qos=qos, noLocal=no_local,
                                                                        retainAsPublished=rap),
                                       properties=props)
        else:
            rc, mid = self.c.subscribe(topic, qos)
        if rc != 0:
            raise CaseFail("subscribe rc=%s" % rc)
        return self._wait_mid(mid, timeout, "SUBACK")

    def unsub(self, topic, timeout=5.0):
        rc, mid = self.c.unsubscribe(topic)
        return self._wait_mid(mid, timeout, "UNSUBACK")

    def pub(self, topic, payload, qos=0, retain=False, props=None, timeout=5.0):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != 0:
            raise CaseFail("%s: publish rc=%s" % (self.cid, info.rc))
        self._wait_mid(info.mid, timeout, "PUBACK" if qos else "publish-sent")

    def recv(self, timeout):
        try:
            return self.msgs.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def collect(self, duration, until=None):
        """Messages arriving within `duration` s (stop early once until(list) is true)."""
        out = []
        end = time.time() + duration
        while True:
            left = end - time.time()
            if left <= 0:
                return out
            m = self.recv(left)
            if m is None:
                return out
            out.append(m)
            if until and until(out):
                return out

    def close(self):
        if not self._started:
            return
        self._started = False
        try:
            self.c.disconnect()
        except Exception:
            pass
        try:
            self.c.loop_stop()
        except Exception:
            pass


def props(ptype, **kw):
    p = Properties(ptype)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------

CASES = []


def case(*versions, default=True):
    def deco(fn):
        fn.versions = versions or (311, 5)
        fn.default = default
        CASES.append(fn)
        return fn
    return deco


def check(cond, msg):
    if not cond:
        raise CaseFail(msg)


@case()
def keepalive_zero(ctx):
    c = Raw(ctx)
    ack = c.connect(ctx.cid("ka0"), keepalive=0, wait=3)
    check(ack is not None, "no CONNACK for keepalive=0 (%s)" % (c.close_reason or "timeout"))
    check(ack["rc"] == 0, "CONNACK rc=0x%02x" % ack["rc"])
    check(c.ping() is not None, "no PINGRESP after CONNACK")
    return "CONNACK rc=0, PINGRESP ok"


@case()
def empty_client_id(ctx):
    c = Raw(ctx)
    ack = c.connect("", clean=True, wait=3)
    check(ack is not None, "no CONNACK (%s)" % (c.close_reason or "timeout"))
    check(ack["rc"] == 0, "CONNACK rc=0x%02x" % ack["rc"])
    detail = "CONNACK rc=0"
    if ctx.v5:
        aci = ack.get("props", {}).get("AssignedClientIdentifier")
        check(aci, "CONNACK lacks Assigned Client Identifier; props=%s" % ack.get("props"))
        detail += ", AssignedClientIdentifier=%s" % aci
    check(c.ping() is not None, "no PINGRESP")
    # 3.1.1: empty id with clean_session=0 must be refused with rc 2
    c2 = Raw(ctx)
    ack2 = c2.connect("", clean=False, wait=3)
    if ctx.v5:
        detail += "; clean_start=0 + empty id -> %s" % (
            "CONNACK rc=0x%02x" % ack2["rc"] if ack2 else c2.close_reason)
    else:
        check(ack2 is not None and ack2["rc"] == 2,
              "clean_session=0 + empty id: expected CONNACK rc=2, got %s" % (ack2 or c2.close_reason))
        detail += "; clean_session=0 + empty id -> rc=2"
    return detail


@case()
def qos_min(ctx):
    T = ctx.prefix("qos")
    s = Paho(ctx, "sub")
    s.sub(T + "/q1", 1)
    s.sub(T + "/q0", 0)
    p = Paho(ctx, "pub")
    res = {}
    for name, topic, qos, want in (("pub0->sub1", T + "/q1", 0, 0), ("pub1->sub0", T + "/q0", 1, 0),
                                   ("pub1->sub1", T + "/q1", 1, 1)):
        p.pub(topic, name, qos=qos)
        m = s.recv(3)
        res[name] = (m.qos if m else None, want)
    bad = {k: v for k, v in res.items() if v[0] != v[1]}
    detail = ", ".join("%s delivered at QoS %s (want %s)" % (k, v[0], v[1]) for k, v in res.items())
    check(not bad, detail)
    return detail


@case()
def retained(ctx):
    T = ctx.prefix("ret") + "/r"
    p = Paho(ctx, "pub")
    try:
        p.pub(T, "v1", qos=1, retain=True)
        s1 = Paho(ctx, "s1")
        s1.sub(T, 1)
        m = s1.recv(3)
        check(m is not None, "subscriber 1 got no retained message")
        check(m.payload == b"v1" and m.retain == 1, "subscriber 1 got %r retain=%d" % (m.payload, m.retain))
        p.pub(T, "v2", qos=1, retain=True)
        s2 = Paho(ctx, "s2")
        s2.sub(T, 1)
        ms = s2.collect(1.0)
        check(len(ms) == 1 and ms[0].payload == b"v2" and ms[0].retain == 1,
              "after replace, subscriber 2 got %s (want one v2 retain=1)" % ms)
        p.pub(T, b"", qos=1, retain=True)
        s3 = Paho(ctx, "s3")
        s3.sub(T, 1)
        ms = s3.collect(1.0)
        check(not ms, "after clearing, subscriber 3 still got %s" % ms)
    finally:
        try:
            p.pub(T, b"", qos=1, retain=True)
        except Exception:
            pass
    return "v1 retained (retain=1), replaced by v2, cleared by empty payload"


@case()
def invalid_topic_names(ctx):
    """A PUBLISH to a topic with + or # or NUL is a protocol error: the
    connection ends (MQTT 5: DISCONNECT 0x90) and nobody receives it."""
    T = ctx.prefix("badtopic")
    obs = Paho(ctx, "obs")
    obs.sub(T + "/#", 0)
    notes = []
    for bad in (T + "/a/+", T + "/#", T + "/nul\x00"):
        c = raw_connected(ctx, "bt")
        c.publish(bad, b"never", qos=1)
        c.closed.wait(3)
        disc = c.all("DISCONNECT")
        check(c.closed.is_set(), "%r: connection still open" % bad)
        if ctx.v5:
            check(disc and disc[0]["rc"] == 0x90, "%r: DISCONNECT %s (want 0x90)" % (bad, disc))
        notes.append("%r closed%s" % (bad, " with 0x90" if disc else ""))
    got = obs.collect(1.0)
    check(not got, "delivered: %s" % got)
    return "; ".join(notes)


@case(311)
def wrong_protocol_version(ctx):
    """An MQTT 5 CONNECT on the 3.1.1 listener gets CONNACK rc 1 (§3.1.2.2)."""
    sock = socket.create_connection((ctx.host, ctx.port), timeout=5)
    try:
        vh = enc_str("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 30) + b"\x00"
        body = vh + enc_str(ctx.cid("ver"))
        sock.sendall(bytes([0x10]) + enc_varint(len(body)) + body)
        data = b""
        while len(data) < 4:
            chunk = sock.recv(16)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    check(data[:4] == b"\x20\x02\x00\x01",
          "MQTT 5 CONNECT on the 3.1.1 listener -> %r (want CONNACK rc 1)" % data)
    return "CONNACK rc=1 (unacceptable protocol version)"


@case()
def will_abnormal(ctx):
    T = ctx.prefix("will")
    obs = Paho(ctx, "obs")
    obs.sub(T + "/#", 1)
    a = raw_connected(ctx, "wa", will={"topic": T + "/a", "payload": b"will-a", "qos": 1})
    a.close()  # socket closed without DISCONNECT
    m = obs.recv(3)
    notes = []
    ok = True
    if m is None or m.payload != b"will-a":
        ok = False
        notes.append("abrupt close: will NOT delivered (got %s)" % m)
    else:
        notes.append("abrupt close: will delivered")
    b = raw_connected(ctx, "wb", will={"topic": T + "/b", "payload": b"will-b", "qos": 1})
    b.disconnect()
    ms = obs.collect(1.0)
    if ms:
        ok = False
        notes.append("normal DISCONNECT: will delivered anyway %s" % ms)
    else:
        notes.append("normal DISCONNECT: no will")
    check(ok, "; ".join(notes))
    return "; ".join(notes)


@case()
def will_reconnect_race(ctx):
    """Session takeover and abrupt drop + immediate reconnect: whose will is published?"""
    T = ctx.prefix("wrace")
    obs = Paho(ctx, "obs")
    obs.sub(T + "/#", 1)
    notes, ok = [], True

    def got(ms, payload):
        return [m for m in ms if m.payload == payload]

    # (a) takeover: A1 connected, A2 connects with the same id (clean)
    cid = ctx.cid("wr")
    a1 = raw_connected(ctx, client_id=cid, will={"topic": T + "/a", "payload": b"A1"})
    a2 = raw_connected(ctx, client_id=cid, will={"topic": T + "/a", "payload": b"A2"})
    ms = obs.collect(1.0, until=lambda l: len(l) >= 2)
    a1.closed.wait(1.0)
    a1_disc = a1.all("DISCONNECT")
    alive = a2.ping(2) is not None
    s = "takeover(clean): A1 will %s, A2 will %s while A2 connected; old socket %s%s; A2 %s" % (
        "delivered" if got(ms, b"A1") else "NOT delivered",
        "DELIVERED" if got(ms, b"A2") else "not delivered",
        "closed" if a1.closed.is_set() else "still open",
        (" with DISCONNECT rc=0x%02x" % a1_disc[0]["rc"]) if a1_disc else " (no DISCONNECT sent)",
        "alive" if alive else "dead")
    if not got(ms, b"A1") or got(ms, b"A2"):
        ok = False
    a2.close(rst=True)
    ms2 = obs.collect(1.0)
    s += "; A2 then dropped abruptly -> %s" % ("will %s published" % [m.payload.decode() for m in ms2]
                                              if ms2 else "NO will published")
    if [m.payload for m in ms2] != [b"A2"]:
        ok = False
    notes.append(s)

    # (b) abrupt drop (TCP RST) and immediate reconnect with the same id and a will;
    # the new TCP connection is opened beforehand so CONNECT follows the drop at once.
    outcomes = []
    for _ in range(ctx.args.will_race_rounds):
        cid = ctx.cid("wr")
        b1 = raw_connected(ctx, client_id=cid, will={"topic": T + "/b", "payload": b"B1"})
        b2 = Raw(ctx)
        b1.close(rst=True)
        a = b2.connect(cid, will={"topic": T + "/b", "payload": b"B2"})
        if a is None or a["rc"] != 0:
            outcomes.append("reconnect refused (%s)" % (a or b2.close_reason))
            ok = False
            continue
        # B1's will arrives; then a short look for a wrong B2 will.
        ms = obs.collect(2.0, until=lambda l: len(l) >= 1)
        ms += obs.collect(0.2)
        o = "+".join(m.payload.decode() for m in ms) or "none"
        # The new connection must survive the old one's late disconnect
        # (the broker reuses connection ids).
        if b2.ping(2) is None:
            o += " (new connection dropped)"
        outcomes.append(o)
        if o != "B1":
            ok = False
        b2.disconnect()
    # (b2) takeover racing the old socket's close: the new CONNECT goes out,
    # then the old socket is reset at once; the new connection must stay.
    for _ in range(ctx.args.will_race_rounds):
        cid = ctx.cid("wt")
        t1 = raw_connected(ctx, client_id=cid)
        t2 = Raw(ctx)
        t2.connect(cid, wait=False)
        t1.close(rst=True)
        a = t2.wait_type("CONNACK", 5)
        if a is None or a["rc"] != 0 or t2.ping(2) is None:
            outcomes.append("takeover racing a reset: new connection %s" % (
                "refused" if a is None or a["rc"] != 0 else "dropped"))
        t2.disconnect()
    bad = [o for o in outcomes if o != "B1"]
    notes.append("drop+reconnect x%d, wills published while the new connection is up: %d wrong %s (want B1 each time)"
                 % (len(outcomes), len(bad), bad[:5]))

    # (c) takeover where the new connection is a persistent session (clean=0)
    cid = ctx.cid("wr")
    sp = {"SessionExpiryInterval": 60} if ctx.v5 else None
    c1 = raw_connected(ctx, client_id=cid, clean=False, props=sp, will={"topic": T + "/c", "payload": b"C1"})
    c2 = raw_connected(ctx, client_id=cid, clean=False, props=sp)
    ms = obs.collect(1.5)
    s = "takeover(clean=0, new conn without will): C1 will %s" % (
        "delivered" if got(ms, b"C1") else "NOT delivered")
    if not got(ms, b"C1"):
        ok = False
    c2.disconnect()
    notes.append(s)
    check(ok, "; ".join(notes))
    return "; ".join(notes)


@case()
def dollar_topics(ctx):
    r = rnd(8)
    s = Paho(ctx, "sub")
    s.sub("#", 0)
    s.sub("+/x", 0)
    p = Paho(ctx, "pub")
    p.pub("$conf%s/x" % r, "dollar", qos=1)
    p.pub("conf%s/x" % r, "control", qos=1)
    ms = [m for m in s.collect(1.5) if r in m.topic]
    dollar = [m for m in ms if m.topic.startswith("$")]
    control = [m for m in ms if not m.topic.startswith("$")]
    check(control, "control message conf%s/x not received via #/+/x: %s" % (r, ms))
    check(not dollar, "$-topic delivered to #/+ subscriber: %s" % dollar)
    return "control delivered %dx (# and +/x), $conf%s/x not delivered" % (len(control), r)


@case()
def unsubscribe(ctx):
    T = ctx.prefix("unsub") + "/u"
    s = Paho(ctx, "sub")
    s.sub(T, 1)
    p = Paho(ctx, "pub")
    p.pub(T, "before", qos=1)
    m = s.recv(3)
    check(m is not None and m.payload == b"before", "message before UNSUBSCRIBE not received")
    s.unsub(T)
    p.pub(T, "after", qos=1)
    ms = s.collect(1.0)
    check(not ms, "after UNSUBSCRIBE still received %s" % ms)
    return "delivered before, nothing after UNSUBACK"


@case()
def overlapping_subscriptions(ctx):
    T = ctx.prefix("ovl")
    s = Paho(ctx, "sub")
    s.sub(T + "/a/#", 0)
    s.sub(T + "/a/b", 1)
    p = Paho(ctx, "pub")
    p.pub(T + "/a/b", "x", qos=1)
    ms = s.collect(1.5)
    qos = sorted(m.qos for m in ms)
    detail = "%d deliveries, QoS %s" % (len(ms), qos)
    check(len(ms) in (1, 2), detail)
    if len(ms) == 1:
        check(qos == [1], detail + " (single copy must use max QoS 1)")
    return detail


@case()
def persistent_session(ctx):
    T = ctx.prefix("pers") + "/p"
    cid = ctx.cid("pers")
    sp = props(PacketTypes.CONNECT, SessionExpiryInterval=300) if ctx.v5 else None
    c = Paho(ctx, client_id=cid, clean=False, props=sp)
    c.sub(T, 1)
    c.close()
    time.sleep(0.3)
    p = Paho(ctx, "pub")
    for i in range(3):
        p.pub(T, "m%d" % i, qos=1)
    c2 = Paho(ctx, client_id=cid, clean=False, props=sp)
    sp_flag = c2.connack["session_present"]
    ms = c2.collect(3, until=lambda l: len(l) >= 3)
    got = [m.payload.decode() for m in ms]
    detail = "session present=%d, received %s" % (sp_flag, got)
    check(sp_flag == 1 and got == ["m0", "m1", "m2"], detail)
    # leave no persistent session behind
    c2.close()
    Paho(ctx, client_id=cid, clean=True).close()
    return detail


@case()
def redeliver_unacked(ctx):
    T = ctx.prefix("redeliver") + "/d"
    cid = ctx.cid("rd")
    sp = {"SessionExpiryInterval": 300} if ctx.v5 else None
    c = raw_connected(ctx, client_id=cid, clean=False, props=sp)
    c.subscribe([(T, 1)])
    p = Paho(ctx, "pub")
    p.pub(T, "unacked", qos=1)
    m = c.wait_type("PUBLISH", 3)
    check(m is not None, "subscriber did not receive the QoS1 PUBLISH")
    c.disconnect()  # no PUBACK
    time.sleep(0.3)
    c2 = raw_connected(ctx, client_id=cid, clean=False, props=sp)
    m2 = c2.wait_type("PUBLISH", 3)
    detail = "first: qos=%d pid=%s dup=%d; reconnect session present=%d; " % (
        m["qos"], m.get("pid"), m["dup"], c2.connack["session_present"])
    if m2 is None:
        detail += "NOT redelivered"
    else:
        detail += "redelivered payload=%r qos=%d pid=%s dup=%d" % (m2["payload"], m2["qos"], m2.get("pid"), m2["dup"])
        c2.puback(m2["pid"])
    c2.disconnect()
    # clean up the persistent session
    raw_connected(ctx, client_id=cid, clean=True).disconnect()
    check(m2 is not None and m2["payload"] == b"unacked" and m2["dup"] == 1 and m2["qos"] == 1, detail)
    return detail


@case(5)
def session_expiry(ctx):
    T = ctx.prefix("sexp") + "/s"
    cid = ctx.cid("sexp")
    c = raw_connected(ctx, client_id=cid, clean=False, props={"SessionExpiryInterval": 2})
    c.subscribe([(T, 1)])
    c.disconnect()
    time.sleep(3.0)  # the point of the test
    c2 = raw_connected(ctx, client_id=cid, clean=False, props={"SessionExpiryInterval": 2})
    spf = c2.connack["session_present"]
    c2.disconnect()
    raw_connected(ctx, client_id=cid, clean=True).disconnect()
    check(spf == 0, "session present=1 after the 2 s session expiry elapsed (3 s)")
    return "session present=0 after expiry"


@case(5)
def message_expiry(ctx):
    T = ctx.prefix("mexp")
    cid = ctx.cid("mexp")
    sp = props(PacketTypes.CONNECT, SessionExpiryInterval=300)
    c = Paho(ctx, client_id=cid, clean=False, props=sp)
    c.sub(T + "/q", 1)
    c.close()
    time.sleep(0.3)
    p = Paho(ctx, "pub")
    p.pub(T + "/q", "expiring", qos=1, props=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    p.pub(T + "/q", "lasting", qos=1)
    p.pub(T + "/r", "retained-expiring", qos=1, retain=True,
          props=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    try:
        time.sleep(2.0)
        c2 = Paho(ctx, client_id=cid, clean=False, props=sp)
        ms = c2.collect(1.5, until=lambda l: any(m.payload == b"lasting" for m in l) and len(l) >= 1 and
                        l[-1].payload == b"lasting")
        got = [m.payload.decode() for m in ms]
        s = Paho(ctx, "rsub")
        s.sub(T + "/r", 1)
        rs = s.collect(1.0)
        notes = ["offline queue after 2 s: %s" % got, "retained after 2 s: %s" % [m.payload.decode() for m in rs]]
        ok = "expiring" not in got and "lasting" in got and not rs
        c2.close()
        Paho(ctx, client_id=cid, clean=True).close()
    finally:
        p.pub(T + "/r", b"", qos=1, retain=True)
    check(ok, "; ".join(notes) + " (want ['lasting'] and [])")
    return "; ".join(notes)


@case(5)
def topic_alias_client_to_server(ctx):
    T = ctx.prefix("tac") + "/t"
    s = Paho(ctx, "sub")
    s.sub(T, 0)
    p = Paho(ctx, "pub")
    tam = getattr(p.connack["props"], "TopicAliasMaximum", None)
    p.pub(T, "with-topic", qos=1, props=props(PacketTypes.PUBLISH, TopicAlias=1))
    p.pub("", "alias-only", qos=1, props=props(PacketTypes.PUBLISH, TopicAlias=1))
    ms = s.collect(2, until=lambda l: len(l) >= 2)
    got = [(m.topic, m.payload.decode(), m.prop("TopicAlias")) for m in ms]
    detail = "server TopicAliasMaximum=%s; subscriber got %s" % (tam, got)
    check([(t, pl) for t, pl, _ in got] == [(T, "with-topic"), (T, "alias-only")], detail)
    check(not p.disconnected.is_set(), detail + "; publisher was disconnected")
    return detail


@case(5)
def topic_alias_server_to_client(ctx):
    T = ctx.prefix("tas")
    MAX = 10
    c = raw_connected(ctx, "tas", props={"TopicAliasMaximum": MAX})
    c.subscribe([(T + "/x", 0), (T + "/w/#", 0)])
    p = Paho(ctx, "pub")
    aliases = {}
    rows, ok = [], True
    for topic, payload in ((T + "/x", "1"), (T + "/x", "2"), (T + "/w/one", "3"), (T + "/w/two", "4"),
                           (T + "/w/one", "5")):
        p.pub(topic, payload, qos=0)
        m = c.wait_type("PUBLISH", 3)
        if m is None:
            rows.append("%s: not received" % payload)
            ok = False
            continue
        alias = m["props"].get("TopicAlias")
        if alias is not None and alias > MAX:
            ok = False
        if m["topic"]:
            if alias is not None:
                aliases[alias] = m["topic"]
            resolved = m["topic"]
        else:
            resolved = aliases.get(alias, "<unknown alias %s>" % alias)
        if resolved != topic:
            ok = False
        rows.append("%s sent on %s -> wire topic=%r alias=%s resolved=%s%s" % (
            payload, topic[len(T):], m["topic"][len(T):] if m["topic"] else "", alias,
            resolved[len(T):] if resolved.startswith(T) else resolved, "" if resolved == topic else " WRONG"))
    check(ok, "; ".join(rows))
    return "; ".join(rows)


@case(5)
def maximum_packet_size(ctx):
    T = ctx.prefix("mps") + "/m"
    notes, ok = [], True
    c = raw_connected(ctx, "mps", props={"MaximumPacketSize": 100})
    smax = c.connack.get("props", {}).get("MaximumPacketSize")
    c.subscribe([(T, 0)])
    p = Paho(ctx, "pub")
    p.pub(T, b"B" * 500, qos=1)
    p.pub(T, b"small", qos=1)
    small = c.wait(lambda q: q["type"] == "PUBLISH" and q["payload"] == b"small", 3)
    big = [q for q in c.all() if q["size"] > 100]
    if big:
        ok = False
        notes.append("client max 100: broker sent %d packet(s) of %s bytes" % (len(big), [q["size"] for q in big]))
    else:
        notes.append("client max 100: no oversize packet")
    notes.append("small message after it %s" % ("received" if small else "NOT received (%s)" % c.close_reason))
    if not small:
        ok = False
    # part 2: client sends a packet larger than the broker's limit
    limit = smax or ctx.args.max_payload
    big_c = raw_connected(ctx, "mps2")
    try:
        big_c.publish(T + "/big", b"Z" * (limit + 1024), qos=1)
    except OSError as e:
        notes.append("send error %s" % e)
    ack = big_c.wait(lambda q: q["type"] in ("PUBACK", "DISCONNECT"), 4)
    big_c.closed.wait(2)
    if ack and ack["type"] == "DISCONNECT":
        notes.append("oversize publish (%d B, server MaximumPacketSize=%s): DISCONNECT rc=0x%02x" % (
            limit + 1024, smax, ack["rc"]))
        if ack["rc"] != 0x95:
            ok = False
    elif ack:
        notes.append("oversize publish (%d B): accepted, PUBACK rc=%s" % (limit + 1024, ack.get("rc")))
    else:
        notes.append("oversize publish (%d B, server MaximumPacketSize=%s): no DISCONNECT, socket %s" % (
            limit + 1024, smax, ("closed: " + str(big_c.close_reason)) if big_c.closed.is_set() else "open"))
        if not (big_c.closed.is_set() and smax):
            ok = False  # limit enforced although never advertised, and no reason code
    check(ok, "; ".join(notes))
    return "; ".join(notes)


@case(5)
def no_local(ctx):
    T = ctx.prefix("nolocal") + "/n"
    c = Paho(ctx, "nl")
    c.sub(T, 1, no_local=True)
    c.pub(T, "own", qos=1)
    o = Paho(ctx, "other")
    o.pub(T, "other", qos=1)
    ms = c.collect(1.5, until=lambda l: any(m.payload == b"other" for m in l) and len(l) >= 2)
    got = [m.payload.decode() for m in ms]
    check("own" not in got and "other" in got, "received %s (want only 'other')" % got)
    return "received %s" % got


@case(5)
def retain_as_published(ctx):
    T = ctx.prefix("rap") + "/r"
    s1 = Paho(ctx, "rap1")
    s1.sub(T, 1, rap=True)
    s2 = Paho(ctx, "rap0")
    s2.sub(T, 1, rap=False)
    p = Paho(ctx, "pub")
    try:
        p.pub(T, "live-retained", qos=1, retain=True)
        m1, m2 = s1.recv(3), s2.recv(3)
    finally:
        p.pub(T, b"", qos=1, retain=True)
    check(m1 is not None and m2 is not None, "not delivered: rap=1 %s, rap=0 %s" % (m1, m2))
    detail = "rap=1 -> retain=%d (want 1); rap=0 -> retain=%d (want 0)" % (m1.retain, m2.retain)
    check(m1.retain == 1 and m2.retain == 0, detail)
    return detail


@case(5)
def subscription_identifier(ctx):
    T = ctx.prefix("subid") + "/s"
    s = Paho(ctx, "sub")
    s.sub(T, 1, sub_id=7)
    p = Paho(ctx, "pub")
    p.pub(T, "x", qos=1)
    m = s.recv(3)
    check(m is not None, "not delivered")
    ids = m.prop("SubscriptionIdentifier")
    check(ids == [7], "SubscriptionIdentifier=%s (want [7])" % ids)
    return "SubscriptionIdentifier=[7]"


def _forward_case(ctx, name, pp, checks):
    T = ctx.prefix(name) + "/f"
    s = Paho(ctx, "sub")
    s.sub(T, 1)
    p = Paho(ctx, "pub")
    p.pub(T, "x", qos=1, props=pp)
    m = s.recv(3)
    check(m is not None, "not delivered")
    bad = []
    for k, want in checks.items():
        got = m.prop(k)
        if got != want:
            bad.append("%s=%r (want %r)" % (k, got, want))
    check(not bad, "; ".join(bad))
    return "forwarded: " + ", ".join("%s=%r" % kv for kv in checks.items())


@case(5)
def user_properties(ctx):
    up = [("k1", "v1"), ("k2", "v2"), ("k1", "v3")]
    return _forward_case(ctx, "up", props(PacketTypes.PUBLISH, UserProperty=up), {"UserProperty": up})


@case(5)
def payload_format_indicator(ctx):
    return _forward_case(ctx, "pfi", props(PacketTypes.PUBLISH, PayloadFormatIndicator=1, ContentType="text/plain"),
                         {"PayloadFormatIndicator": 1, "ContentType": "text/plain"})


@case(5)
def response_topic_correlation_data(ctx):
    rt = "conf/%s/reply" % rnd()
    return _forward_case(ctx, "rtcd", props(PacketTypes.PUBLISH, ResponseTopic=rt, CorrelationData=b"\x01\x02corr"),
                         {"ResponseTopic": rt, "CorrelationData": b"\x01\x02corr"})


@case(5)
def receive_maximum(ctx):
    T = ctx.prefix("rmax") + "/r"
    c = raw_connected(ctx, "rm", props={"ReceiveMaximum": 2})
    c.subscribe([(T, 1)])
    p = Paho(ctx, "pub")
    for i in range(6):
        p.pub(T, "m%d" % i, qos=1)
    time.sleep(1.5)
    pubs = c.all("PUBLISH")
    n1 = len(pubs)
    for q in pubs:
        c.puback(q["pid"])
    time.sleep(1.0)
    n2 = len(c.all("PUBLISH"))
    detail = "unacked QoS1 PUBLISHes in flight: %d (Receive Maximum 2); after acking: %d of 6" % (n1, n2)
    check(n1 <= 2, detail)
    return detail


@case(5)
def server_keepalive(ctx):
    c = raw_connected(ctx, "ska", keepalive=2)
    ska = c.connack.get("props", {}).get("ServerKeepAlive")
    eff = ska if ska is not None else 2
    t0 = time.time()
    c.closed.wait(eff * 1.5 + 2.5)
    dt = time.time() - t0
    detail = "CONNACK ServerKeepAlive=%s; client keepalive 2 s, idle -> %s" % (
        ska, "server closed after %.1f s" % dt if c.closed.is_set() else "still open after %.1f s" % dt)
    check(c.closed.is_set() and dt <= eff * 1.5 + 1.0, detail)
    return detail


@case()
def keepalive_timeout(ctx):
    """Server closes a silent client after 1.5 x keepalive."""
    c = raw_connected(ctx, "kat", keepalive=2)
    t0 = time.time()
    c.closed.wait(6)
    dt = time.time() - t0
    detail = "keepalive 2 s, silent client: %s" % (
        "closed after %.1f s" % dt if c.closed.is_set() else "still open after %.1f s" % dt)
    check(c.closed.is_set() and 2.0 <= dt <= 4.5, detail)
    return detail


@case(5)
def shared_subscription(ctx):
    T = ctx.prefix("share") + "/s"
    g = "g" + rnd(6)
    a = Paho(ctx, "sa")
    a.sub("$share/%s/%s" % (g, T), 1)
    b = Paho(ctx, "sb")
    b.sub("$share/%s/%s" % (g, T), 1)
    p = Paho(ctx, "pub")
    N = 10
    for i in range(N):
        p.pub(T, "m%d" % i, qos=1)
    time.sleep(1.5)
    ga = [m.payload.decode() for m in a.collect(0.1)]
    gb = [m.payload.decode() for m in b.collect(0.1)]
    allm = ga + gb
    missing = [x for x in ("m%d" % i for i in range(N)) if x not in allm]
    dups = sorted({x for x in allm if allm.count(x) > 1})
    detail = "A got %d, B got %d, missing %s, duplicated %s" % (len(ga), len(gb), missing, dups)
    check(not missing and not dups, detail)
    return detail


@case(5)
def shared_subscription_two_filters(ctx):
    """Same share name used with two different topic filters (a separate shared subscription each)."""
    T = ctx.prefix("share2")
    g = "g" + rnd(6)
    a = Paho(ctx, "sa")
    a.sub("$share/%s/%s/x" % (g, T), 1)
    b = Paho(ctx, "sb")
    b.sub("$share/%s/%s/y" % (g, T), 1)
    p = Paho(ctx, "pub")
    for i in range(4):
        p.pub(T + "/x", "x%d" % i, qos=1)
        p.pub(T + "/y", "y%d" % i, qos=1)
    time.sleep(1.5)
    ga = sorted(m.payload.decode() for m in a.collect(0.1))
    gb = sorted(m.payload.decode() for m in b.collect(0.1))
    detail = "A ($share/%s/../x) got %s; B ($share/%s/../y) got %s" % (g, ga, g, gb)
    check(ga == ["x0", "x1", "x2", "x3"] and gb == ["y0", "y1", "y2", "y3"], detail)
    return detail


@case(311, 5, default=False)
def connection_limit(ctx):
    """Open clients until one is refused (needs --max-connections N, broker with a small limit)."""
    N = ctx.args.max_connections
    held, notes = [], []
    refused = None
    for i in range(N + 3):
        c = Raw(ctx)
        cid = ctx.cid("lim%d" % i)
        ack = c.connect(cid, wait=3)
        if ack is None or ack["rc"] != 0:
            refused = (i, cid, c, ack)
            break
        c.cid = cid
        held.append(c)
    if refused is None:
        raise CaseFail("opened %d clients, none refused (limit %d)" % (len(held), N))
    i, rcid, rc_conn, ack = refused
    held_before = list(held)
    rc_conn.closed.wait(2)
    how = ("CONNACK rc=0x%02x" % ack["rc"]) if ack else (
        "no CONNACK, socket %s" % (rc_conn.close_reason if rc_conn.closed.is_set() else "left open"))
    notes.append("client #%d refused (after %d accepted here): %s" % (i + 1, len(held), how))
    alive = sum(1 for c in held if c.ping(2) is not None)
    notes.append("%d/%d existing clients still answer PINGREQ" % (alive, len(held)))
    held.pop(0).disconnect()

    def attempt(cid, want_ok):
        """CONNECT as cid; retried (deadline 5 s) until the answer is the one
        wanted, since the broker frees a slot a moment after a DISCONNECT."""
        end = time.time() + 5
        while True:
            c = Raw(ctx)
            a = c.connect(cid, wait=3)
            if a is not None and a["rc"] == 0:
                held.append(c)
                if want_ok:
                    return "CONNACK rc=0x00"
            elif not want_ok:
                if a is None:
                    c.closed.wait(1)
                    return "no CONNACK (%s)" % (c.close_reason or "open")
                return "CONNACK rc=0x%02x" % a["rc"]
            if time.time() > end:
                return ("CONNACK rc=0x%02x" % a["rc"]) if a else "no CONNACK"
            if a is not None and a["rc"] == 0:
                held.pop().disconnect()
            time.sleep(0.1)

    refused_codes = (3,) if not ctx.v5 else (0x97, 0x9F, 0x89)
    again = attempt(rcid, True)
    notes.append("after freeing a slot, same id as the refused one -> %s" % again)
    full = attempt(ctx.cid("lim-fresh"), False)
    notes.append("then a fresh id (still at the limit) -> %s" % full)
    for c in held:
        c.disconnect()
    held.clear()
    freed = attempt(ctx.cid("lim-fresh2"), True)
    notes.append("after all disconnect, a fresh id -> %s" % freed)
    for c in held:
        c.disconnect()
    ok = (ack is not None and ack["rc"] in refused_codes
          and again == "CONNACK rc=0x00" and freed == "CONNACK rc=0x00"
          and any(("rc=0x%02x" % c) in full for c in refused_codes)
          and "%d/%d" % (len(held_before), len(held_before)) in notes[1])
    check(ok, "; ".join(notes))
    return "; ".join(notes)


@case(311, 5, default=False)
def stale_will_handler(ctx):
    """DESTRUCTIVE: a CONNECT the router refuses, retried with the same client id.
    (a) CONNECT then immediate TCP RST, same id again; (b) client id containing '/', twice.
    After each, a fresh client must still get CONNACK."""
    notes, ok = [], True

    def fresh():
        c = Raw(ctx)
        a = c.connect(ctx.cid("fresh"), wait=3)
        c.closed.wait(0.2)
        r = "CONNACK rc=0x%02x" % a["rc"] if a else "no CONNACK (%s)" % (c.close_reason or "timeout")
        c.disconnect()
        return a is not None and a["rc"] == 0, r

    def attempt(cid, rst=False):
        c = Raw(ctx)
        if rst:
            c.connect(cid, wait=0)
            c.close(rst=True)
            time.sleep(0.3)
            return "sent CONNECT + RST"
        a = c.connect(cid, wait=3)
        c.closed.wait(0.5)
        r = "CONNACK rc=0x%02x" % a["rc"] if a else "no CONNACK (%s)" % (c.close_reason or "timeout")
        c.disconnect()
        return r

    cid = ctx.cid("rst")
    notes.append("(a) %s; same id again -> %s" % (attempt(cid, rst=True), attempt(cid)))
    good, r = fresh()
    notes.append("fresh id -> %s" % r)
    ok &= good
    bad = "conf/bad/%s" % rnd(6)
    notes.append("(b) id %r -> %s; again -> %s" % (bad, attempt(bad), attempt(bad)))
    good, r = fresh()
    notes.append("fresh id -> %s" % r)
    ok &= good
    check(ok, "; ".join(notes))
    return "; ".join(notes)


# --------------------------------------------------------------------------

def run_case(fn, ctx):
    res = {}

    def target():
        try:
            res["detail"] = fn(ctx) or ""
            res["ok"] = True
        except CaseFail as e:
            res["ok"], res["detail"] = False, str(e)
        except Exception as e:
            res["ok"], res["detail"] = False, "error: %s: %s | %s" % (
                type(e).__name__, e, traceback.format_exc(limit=3).replace("\n", " | "))
    t = threading.Thread(target=target, daemon=True)
    limit = 40.0 if not fn.default else CASE_TIMEOUT
    if fn.__name__ == "will_reconnect_race":
        limit += 2.5 * ctx.args.will_race_rounds
    t.start()
    t.join(limit)
    if t.is_alive():
        res = {"ok": False, "detail": "case timed out after %.0f s" % limit}
    for f in reversed(ctx.cleanup):
        try:
            f()
        except Exception:
            pass
    return res


def main():
    ap = argparse.ArgumentParser(description="MQTT conformance probe")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--version", choices=["311", "5"], default="311")
    ap.add_argument("--case", action="append", default=[], help="case name (repeatable); default: all")
    ap.add_argument("--list", action="store_true", help="list cases and exit")
    ap.add_argument("--max-payload", type=int, default=1048576,
                    help="broker's max payload, used when CONNACK has no Maximum Packet Size")
    ap.add_argument("--max-connections", type=int, default=5, help="for connection_limit")
    ap.add_argument("--will-race-rounds", type=int, default=3,
                    help="drop+reconnect rounds of will_reconnect_race")
    args = ap.parse_args()
    version = int(args.version)
    if args.list:
        for fn in CASES:
            print("%-34s versions=%s%s" % (fn.__name__, ",".join(map(str, fn.versions)),
                                            "" if fn.default else " (explicit only)"))
        return 0
    by_name = {fn.__name__: fn for fn in CASES}
    if args.case:
        unknown = [n for n in args.case if n not in by_name]
        if unknown:
            ap.error("unknown case(s): %s" % unknown)
        sel = [by_name[n] for n in args.case]
        na = [fn.__name__ for fn in sel if version not in fn.versions]
        if na:
            ap.error("case(s) %s do not apply to version %s" % (na, version))
    else:
        sel = [fn for fn in CASES if fn.default and version in fn.versions]
    failed = 0
    for fn in sel:
        ctx = Ctx(args.host, args.port, version, args)
        r = run_case(fn, ctx)
        failed += not r["ok"]
        print(json.dumps({"case": fn.__name__, "version": args.version, "ok": r["ok"], "detail": r["detail"]}),
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
