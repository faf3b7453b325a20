"""`Etcd` over etcd's HTTP/JSON gateway (`/v3/...`), using etcd3gw for the unary calls.

Theory of operation
-------------------
Unary calls (range, put, delete, txn, lease grant/keep-alive/revoke) go through one `etcd3gw.Etcd3Client` per
endpoint, each with a request timeout. Calls stick to one endpoint; when it refuses or fails, the call moves to
the next. Idempotent calls (reads, keep-alive, revoke, and txns whose compares make a retry harmless) also move
on a timeout; a plain put that timed out is reported as `EtcdUnavailable`, since it may or may not have applied.

Watches do not use etcd3gw's watcher, which (2.7) has no read timeout (a silent member hangs it forever),
ignores a cancellation by compaction (the stream just stops), and assumes one JSON document per HTTP chunk
(values over one chunk break it). Ours reads the stream line by line with a read timeout, asks for progress
notifications and for a leader (`hasleader` metadata: a member cut off from the quorum cancels the watch), and
turns every end into an exception the mirror handles.

Fork safety: HTTP sessions are re-created in a child process (the pid is checked on every call), so a forked
engine worker never shares a socket with its parent. See docs/decisions.md (cluster: etcd client).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import requests
from etcd3gw import exceptions as gwexc
from etcd3gw.client import Etcd3Client

from rdmapool.cluster.etcd import (
    Compare,
    Delete,
    Etcd,
    EtcdUnavailable,
    Event,
    Get,
    KeyValue,
    LeaseNotFound,
    Op,
    Put,
    TxnResult,
    WatchBatch,
    WatchCompacted,
    WatchStream,
    prefix_end,
)
from rdmapool.errors import UsageError

_TARGET = {"create": "CREATE", "mod": "MOD", "version": "VERSION", "value": "VALUE", "lease": "LEASE"}
_FIELD = {"create": "create_revision", "mod": "mod_revision", "version": "version", "lease": "lease"}
_RESULT = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}
_RETRYABLE = ("no leader", "leader changed", "timed out", "unavailable", "too many requests", "not capable")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


def _kv(raw: dict) -> KeyValue:
    return KeyValue(
        key=_unb64(raw.get("key")), value=_unb64(raw.get("value")),
        create_revision=int(raw.get("create_revision", 0)), mod_revision=int(raw.get("mod_revision", 0)),
        version=int(raw.get("version", 0)), lease=int(raw.get("lease", 0)),
    )


def _rev(resp: dict) -> int:
    return int(resp.get("header", {}).get("revision", 0))


def parse_endpoints(spec: str | Sequence[str]) -> list[str]:
    """'http://a:2379,http://b:2379' or 'a:2379' or a list -> normalised base URLs."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        item = item.strip().rstrip("/")
        if not item:
            continue
        if "://" not in item:
            item = "http://" + item
        if not item.startswith("http://"):
            raise UsageError(f"etcd endpoint {item!r}: only http:// is supported")
        out.append(item)
    if not out:
        raise UsageError("no etcd endpoints given")
    return out


class GatewayEtcd(Etcd):
    def __init__(self, endpoints: str | Sequence[str], timeout: float = 2.0, retry_s: float | None = None) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.timeout = timeout
        #: how long a call keeps cycling through endpoints that refuse or have no leader (default: 1.5 s,
        #: about an election); timeouts count against it too
        self.retry_s = 1.5 if retry_s is None else retry_s
        self._lock = threading.Lock()
        self._current = 0
        self._pid = -1
        self._clients: list[Etcd3Client] = []
        self._closed = False

    # -- plumbing -----------------------------------------------------------------------------------------
    def _client_list(self) -> list[Etcd3Client]:
        with self._lock:
            if self._pid != os.getpid():  # new process (fork): never reuse the parent's sockets
                self._clients = []
                for url in self.endpoints:
                    host, port = url[len("http://"):].rsplit(":", 1)
                    self._clients.append(Etcd3Client(host=host, port=int(port), timeout=self.timeout,
                                                     api_path="/v3/", session=requests.Session()))
                self._pid = os.getpid()
            return self._clients

    def _call(self, path: str, payload: dict, idempotent: bool = True) -> dict:
        """Try the endpoints in turn, and again for up to `retry_s` while every one refuses or has no leader
        (an election after a member died takes about one election timeout)."""
        if self._closed:
            raise UsageError("etcd client is closed")
        clients = self._client_list()
        n = len(clients)
        deadline = time.monotonic() + self.retry_s
        last: Exception | None = None
        while True:
            start = self._current
            for i in range(n):
                idx = (start + i) % n
                c = clients[idx]
                try:
                    resp = c.post(c.get_url(path), data=json.dumps(payload))
                except gwexc.ConnectionTimeoutError as exc:
                    last = exc
                    if not idempotent:
                        raise EtcdUnavailable(
                            f"etcd {self.endpoints[idx]} timed out on {path}; outcome unknown") from exc
                except gwexc.ConnectionFailedError as exc:  # refused, reset, or 503 (no leader)
                    last = exc
                except gwexc.Etcd3Exception as exc:
                    text = str(exc.detail_text if exc.detail_text is not None else exc)
                    if "lease not found" in text:
                        raise LeaseNotFound(text) from exc
                    if not any(t in text.lower() for t in _RETRYABLE):
                        raise EtcdUnavailable(f"etcd {self.endpoints[idx]} {path}: {text}") from exc
                    last = exc
                else:
                    self._current = idx
                    return resp
            if time.monotonic() >= deadline:
                raise EtcdUnavailable(f"no etcd endpoint of {self.endpoints} answered {path}: {_why(last)}")
            time.sleep(0.05)

    # -- KV -----------------------------------------------------------------------------------------------
    def get(self, key: bytes) -> tuple[KeyValue | None, int]:
        r = self._call("/kv/range", {"key": _b64(key)})
        kvs = r.get("kvs") or []
        return (_kv(kvs[0]) if kvs else None), _rev(r)

    def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        r = self._call("/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)), "sort_order": 1,
                                     "sort_target": 0})
        return [_kv(x) for x in r.get("kvs") or []], _rev(r)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        payload: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            payload["lease"] = str(lease)
        return _rev(self._call("/kv/put", payload, idempotent=True))  # same bytes twice = same state

    def delete(self, key: bytes, prefix: bool = False) -> int:
        payload = {"key": _b64(key)}
        if prefix:
            payload["range_end"] = _b64(prefix_end(key))
        return _rev(self._call("/kv/deleterange", payload))

    def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        body = {"compare": [self._compare(c) for c in compare],
                "success": [self._op(o) for o in success], "failure": [self._op(o) for o in failure]}
        # Retrying a txn is harmless when it compares revisions: a duplicate fails its compare, and callers
        # re-read after a failed txn (they may find their own write).
        r = self._call("/kv/txn", body, idempotent=bool(compare))
        ok = bool(r.get("succeeded", False))
        ops = success if ok else failure
        results: list[list[KeyValue] | None] = []
        for op, resp in zip(ops, r.get("responses") or [{}] * len(ops), strict=False):
            if isinstance(op, Get):
                results.append([_kv(x) for x in resp.get("response_range", {}).get("kvs") or []])
            else:
                results.append(None)
        return TxnResult(ok, _rev(r), tuple(results))

    @staticmethod
    def _compare(c: Compare) -> dict:
        out: dict[str, Any] = {"key": _b64(c.key), "target": _TARGET[c.target], "result": _RESULT[c.op]}
        if c.target == "value":
            if not isinstance(c.value, bytes):
                raise UsageError("a value compare needs bytes")
            out["value"] = _b64(c.value)
        else:
            out[_FIELD[c.target]] = str(int(c.value))
        return out

    @staticmethod
    def _op(o: Op) -> dict:
        if isinstance(o, Put):
            p: dict[str, Any] = {"key": _b64(o.key), "value": _b64(o.value)}
            if o.lease:
                p["lease"] = str(o.lease)
            return {"request_put": p}
        if isinstance(o, Delete):
            d = {"key": _b64(o.key)}
            if o.prefix:
                d["range_end"] = _b64(prefix_end(o.key))
            return {"request_delete_range": d}
        if isinstance(o, Get):
            g = {"key": _b64(o.key)}
            if o.prefix:
                g["range_end"] = _b64(prefix_end(o.key))
            return {"request_range": g}
        raise UsageError(f"unknown txn op {o!r}")

    # -- leases -------------------------------------------------------------------------------------------
    def lease_grant(self, ttl: int) -> int:
        if ttl < 1:
            raise UsageError(f"lease TTL must be >= 1 s, got {ttl}")
        return int(self._call("/lease/grant", {"TTL": str(ttl), "ID": "0"}, idempotent=False)["ID"])

    def lease_keepalive(self, lease_id: int) -> int:
        r = self._call("/lease/keepalive", {"ID": str(lease_id)})
        return int(r.get("result", {}).get("TTL", 0))

    def lease_revoke(self, lease_id: int) -> None:
        with contextlib.suppress(LeaseNotFound):
            self._call("/lease/revoke", {"ID": str(lease_id)})

    # -- watch --------------------------------------------------------------------------------------------
    def watch_prefix(self, prefix: bytes, start_revision: int, idle_timeout: float) -> WatchStream:
        if self._closed:
            raise UsageError("etcd client is closed")
        return _GatewayWatch(self.endpoints, self._current, prefix, start_revision, idle_timeout, self.timeout)

    def close(self) -> None:
        with self._lock:
            for c in self._clients:
                c.session.close()
            self._clients = []
            self._pid = -1
            self._closed = True


class _GatewayWatch(WatchStream):
    def __init__(self, endpoints: list[str], first: int, prefix: bytes, start_revision: int,
                 idle_timeout: float, connect_timeout: float) -> None:
        self._endpoints = endpoints
        self._first = first
        self._body = {"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                         "start_revision": str(max(start_revision, 0)), "progress_notify": True}}
        self._timeouts = (connect_timeout, idle_timeout)
        self._session = requests.Session()
        self._resp: requests.Response | None = None
        self._closed = threading.Event()

    def _open(self) -> requests.Response:
        last: Exception | None = None
        n = len(self._endpoints)
        for i in range(n):
            url = self._endpoints[(self._first + i) % n]
            try:
                resp = self._session.post(f"{url}/v3/watch", json=self._body, stream=True, timeout=self._timeouts,
                                          headers={"Grpc-Metadata-hasleader": "true"})
            except requests.RequestException as exc:
                last = exc
                continue
            if resp.status_code == 200:
                return resp
            last = EtcdUnavailable(f"watch on {url}: HTTP {resp.status_code} {resp.text[:200]}")
            resp.close()
        raise EtcdUnavailable(f"no etcd endpoint accepted a watch: {last}")

    def __iter__(self) -> Iterator[WatchBatch]:
        if self._closed.is_set():
            return
        self._resp = self._open()
        buf = b""
        try:
            for chunk in self._resp.iter_content(chunk_size=None):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        batch = self._parse(line)
                        if batch is not None:
                            yield batch
            raise EtcdUnavailable("watch stream ended")
        except (requests.RequestException, OSError, AttributeError) as exc:
            if self._closed.is_set():
                return
            raise EtcdUnavailable(f"watch stream broke: {exc}") from exc
        finally:
            self.close()

    @staticmethod
    def _parse(line: bytes) -> WatchBatch | None:
        msg = json.loads(line)
        if "error" in msg:
            raise EtcdUnavailable(f"watch error: {msg['error'].get('message', msg['error'])}")
        res = msg.get("result", {})
        compact = int(res.get("compact_revision", 0))
        if compact:
            raise WatchCompacted(compact)
        if res.get("canceled"):
            raise EtcdUnavailable(f"watch canceled: {res.get('cancel_reason', 'no reason given')}")
        if res.get("created"):
            return None
        events = []
        for e in res.get("events") or []:
            kind = "delete" if e.get("type") == "DELETE" else "put"
            events.append(Event(kind, _kv(e.get("kv", {}))))
        return WatchBatch(_rev(res), tuple(events))

    def close(self) -> None:
        self._closed.set()
        resp = self._resp
        if resp is not None:
            conn = getattr(resp.raw, "_connection", None)
            sock = getattr(conn, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            resp.close()
        self._session.close()


def _why(exc: Exception | None) -> str:
    """What went wrong, for a person: etcd3gw's connection errors carry no text of their own, only a cause."""
    if exc is None:
        return "no attempt finished"
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    while not text and cause is not None:  # the innermost words: requests' "Connection refused", say
        text, cause = str(cause), cause.__cause__ or cause.__context__
    return f"{type(exc).__name__}: {text or 'no detail given'}"
