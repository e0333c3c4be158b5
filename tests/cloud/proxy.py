"""Fault-injecting HTTP proxy of the vmpool cloud test bed (stdlib only).

One listening port per service (``nova``, ``keystone``), each forwarding to
its upstream on 127.0.0.1; the Host header is kept, so the links Nova and
Keystone put in their answers point back at the proxy.  A JSON control port:

    GET    /health
    GET    /faults            list rules
    POST   /faults            add {service, method, path_regex, action,
                                   status, delay, times, message,
                                   headers} -> {"id": N}
    DELETE /faults            clear all rules
    GET    /counts            {"nova GET /v2.1/servers/{id}": 3, ...}
    DELETE /counts            reset the counters

``service`` and ``method`` may be ``*``.  ``path_regex`` is re.search()ed on
the request path without its query string.  Actions:

    status   answer ``status`` (default 500) without forwarding, with Nova's
             fault body ({"overLimit": {"code": 429, "message": ...}}) and
             ``headers`` (e.g. {"Retry-After": "30"}): ``message`` is its text
    reset    close the client connection with a TCP RST, nothing forwarded
    delay    sleep ``delay`` seconds, then forward
    swallow  answer 204 (or ``status`` if it is 2xx) without forwarding: a
             DELETE that "succeeds" but never happens

``times``: how many requests the rule applies to (None: forever).  The newest
matching rule wins.  Every request is counted, faulted or not, by
``"<service> <METHOD> <path>"`` with ids (uuids, 32-hex ids, numbers)
replaced by ``{id}``.

    python proxy.py --control-port C --service nova:LISTEN:UPSTREAM_PORT \
        --service keystone:LISTEN:UPSTREAM_PORT
"""

import argparse
import collections
import http.client
import json
import re
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
ACTIONS = ("status", "reset", "delay", "swallow", "hide")
# nova.api.openstack.wsgi.Fault's names for the body of an error answer
FAULT_NAMES = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    409: "conflictingRequest",
    413: "overLimit",
    415: "badMediaType",
    429: "overLimit",
    501: "notImplemented",
    503: "serviceUnavailable",
}

_ID_RE = re.compile(
    r"^(?:[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{32}|[0-9]+)$"
)


def normalize(path):
    path = path.split("?", 1)[0]
    return "/".join("{id}" if _ID_RE.match(seg) else seg for seg in path.split("/"))


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.rules = []
        self.next_id = 1
        self.counts: collections.Counter[str] = collections.Counter()

    def add_rule(self, r):
        service = r.get("service", "*")
        method = (r.get("method") or "*").upper()
        action = r["action"]
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}")
        rx = r.get("path_regex") or ""
        re.compile(rx)
        times = r.get("times")
        rule = {
            "service": service,
            "method": method,
            "path_regex": rx,
            "action": action,
            "status": int(r.get("status") or 500),
            "delay": float(r.get("delay") or 0),
            "hide_regex": r.get("hide_regex") or "",
            "message": r.get("message") or "fault injected by the bed proxy",
            "headers": {str(k): str(v) for k, v in (r.get("headers") or {}).items()},
            "times": None if times is None else int(times),
            "hits": 0,
        }
        with self.lock:
            rule["id"] = self.next_id
            self.next_id += 1
            self.rules.append(rule)
        return rule

    def match(self, service, method, path):
        path = path.split("?", 1)[0]
        with self.lock:
            for rule in reversed(self.rules):
                if rule["service"] not in ("*", service):
                    continue
                if rule["method"] not in ("*", method):
                    continue
                if not re.search(rule["path_regex"], path):
                    continue
                rule["hits"] += 1
                if rule["times"] is not None:
                    rule["times"] -= 1
                    if rule["times"] <= 0:
                        self.rules.remove(rule)
                return dict(rule)
        return None

    def count(self, service, method, path):
        with self.lock:
            self.counts[f"{service} {method} {normalize(path)}"] += 1


def make_proxy_handler(service, upstream_port, state):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "bed-proxy"

        def log_message(self, fmt, *args):
            pass

        def finish(self):
            try:
                super().finish()
            except OSError:
                pass

        def _read_body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else None

        def _reply(self, status, body=b"", headers=()):
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            if status not in (204, 304) and not (100 <= status < 200):
                self.send_header("Content-Length", str(len(body)))
            else:
                body = b""
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def _reset(self):
            self.close_connection = True
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            except OSError:
                pass

        def _handle(self):
            method = self.command
            body = self._read_body()
            state.count(service, method, self.path)
            rule = state.match(service, method, self.path)
            if rule is not None:
                action = rule["action"]
                if action == "reset":
                    self._reset()
                    return
                if action == "status":
                    st = rule["status"]
                    fault = {"code": st, "message": rule["message"]}
                    if "Retry-After" in rule["headers"]:  # as nova.api.openstack.wsgi.Fault adds it
                        fault["retryAfter"] = rule["headers"]["Retry-After"]
                    msg = json.dumps({FAULT_NAMES.get(st, "computeFault"): fault})
                    headers = [("Content-Type", "application/json"), *rule["headers"].items()]
                    self._reply(st, msg.encode(), headers)
                    return
                if action == "swallow":
                    st = rule["status"] if 200 <= rule["status"] < 300 else 204
                    self._reply(st, b"", [("Content-Type", "application/json")])
                    return
                if action == "delay":
                    time.sleep(rule["delay"])
            self._forward(method, body, hide=rule["hide_regex"] if rule and rule["action"] == "hide" else None)

        def _forward(self, method, body, hide=None):
            conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=600)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn.request(method, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if hide is not None:
                    data = _hide_servers(data, hide)
                out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
                self._reply(resp.status, data, out)
            except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
                msg = json.dumps({"error": {"code": 502, "message": f"bed proxy: upstream {service}: {e}"}})
                self._reply(502, msg.encode(), [("Content-Type", "application/json")])
            finally:
                conn.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle  # noqa: N815

    return Handler


def _hide_servers(data, name_regex):
    """A listing that lacks some servers (a page not fetched, a cell down): drop those named so."""
    try:
        body = json.loads(data)
    except ValueError:
        return data
    if not isinstance(body, dict) or not isinstance(body.get("servers"), list):
        return data
    body["servers"] = [s for s in body["servers"] if not re.search(name_regex, s.get("name") or "")]
    return json.dumps(body).encode()


def make_control_handler(state, services):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            pass

        def _send(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self):
            try:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else {}
                path = self.path.split("?")[0].rstrip("/")
                m = self.command
                if path == "/health":
                    return self._send(200, {"ok": True, "services": services})
                if path == "/faults":
                    if m == "GET":
                        with state.lock:
                            return self._send(200, {"faults": list(state.rules)})
                    if m == "POST":
                        return self._send(200, state.add_rule(body))
                    if m == "DELETE":
                        with state.lock:
                            state.rules.clear()
                        return self._send(200, {"faults": []})
                if path == "/counts":
                    if m == "GET":
                        with state.lock:
                            return self._send(200, dict(state.counts))
                    if m == "DELETE":
                        with state.lock:
                            state.counts.clear()
                        return self._send(200, {})
                self._send(404, {"error": "not found"})
            except (ValueError, KeyError, re.error) as e:
                self._send(400, {"error": f"{type(e).__name__}: {e}"})

        do_GET = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def serve(port, handler, name):
    srv = _Server(("127.0.0.1", port), handler)
    threading.Thread(target=srv.serve_forever, daemon=True, name=name).start()
    return srv


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--control-port", type=int, required=True)
    p.add_argument("--service", action="append", required=True, help="NAME:LISTEN_PORT:UPSTREAM_PORT")
    args = p.parse_args()
    state = State()
    services = {}
    for spec in args.service:
        name, listen, upstream = spec.split(":")
        services[name] = {"port": int(listen), "upstream_port": int(upstream)}
        serve(int(listen), make_proxy_handler(name, int(upstream), state), "proxy-" + name)
    serve(args.control_port, make_control_handler(state, services), "proxy-control")
    print(f"proxy: ready {services} control {args.control_port}", file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    while not stop.wait(3600):
        pass


if __name__ == "__main__":
    main()
