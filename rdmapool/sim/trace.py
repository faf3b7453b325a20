"""Request traces: the Mooncake format and rdmapool's own JSONL.

Mooncake (`../shared/traces`): one JSON object per line, `{"timestamp": ms, "input_length": tokens,
"output_length": tokens, "hash_ids": [int, ...]}`, where hash_ids are chained hashes of 512-token blocks.

rdmapool JSONL: a header line `{"format": "rdmapool-trace", "version": 1, "block_tokens": N}`, then one
request per line `{"t": seconds, "keys": [key, ...], "tokens": input tokens, "output_tokens": n,
"tenant": "name"}`; keys are strings or integers, a chain's blocks in order (chained like hash_ids);
output_tokens and tenant are optional. Requests must be in time order in both formats.

A request's blocks hold `block_tokens` tokens each except the last, which holds the remainder."""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path

from rdmapool.errors import UsageError

MOONCAKE_BLOCK_TOKENS = 512
FORMAT_NAME = "rdmapool-trace"


@dataclass(frozen=True, slots=True)
class Request:
    time: float  # seconds since the trace's start
    keys: tuple[Hashable, ...]
    tokens: int  # input tokens
    output_tokens: int = 0
    tenant: str = ""


@dataclass(frozen=True)
class Trace:
    requests: tuple[Request, ...]
    block_tokens: int
    source: str = ""

    def unique_blocks(self) -> int:
        return len({k for r in self.requests for k in r.keys})

    def block_accesses(self) -> int:
        return sum(len(r.keys) for r in self.requests)

    def span(self, start: float, end: float) -> Trace:
        """The requests whose time falls in [start, end) as fractions of the trace's duration."""
        if not 0.0 <= start < end <= 1.0:
            raise UsageError(f"span must satisfy 0 <= start < end <= 1, got {start}:{end}")
        if not self.requests:
            return self
        t0, t1 = self.requests[0].time, self.requests[-1].time
        lo, hi = t0 + start * (t1 - t0), t0 + end * (t1 - t0)
        reqs = tuple(r for r in self.requests if lo <= r.time < hi or (end == 1.0 and r.time == t1))
        return Trace(reqs, self.block_tokens, f"{self.source}[{start}:{end}]")


def block_tokens_of(request: Request, block_tokens: int) -> list[int]:
    n = len(request.keys)
    if n == 0:
        return []
    last = min(block_tokens, max(1, request.tokens - block_tokens * (n - 1)))
    return [block_tokens] * (n - 1) + [last]


def _mooncake(obj: dict, lineno: int) -> Request:
    try:
        keys = tuple(obj["hash_ids"])
        return Request(float(obj["timestamp"]) / 1000.0, keys, int(obj["input_length"]),
                       int(obj.get("output_length", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"line {lineno}: not a Mooncake trace record ({exc!r})") from None


def _ours(obj: dict, lineno: int) -> Request:
    try:
        keys = tuple(obj["keys"])
        if not all(isinstance(k, str | int) for k in keys):
            raise TypeError("keys must be strings or integers")
        return Request(float(obj["t"]), keys, int(obj["tokens"]), int(obj.get("output_tokens", 0)),
                       str(obj.get("tenant", "")))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"line {lineno}: not an rdmapool trace record ({exc!r})") from None


def parse_lines(lines: Iterable[str], source: str = "") -> Trace:
    requests: list[Request] = []
    block_tokens = MOONCAKE_BLOCK_TOKENS
    parse = None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{source}: line {lineno}: not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{source}: line {lineno}: expected a JSON object")
        if parse is None:
            if obj.get("format") == FORMAT_NAME:
                if obj.get("version") != 1:
                    raise UsageError(f"{source}: unsupported {FORMAT_NAME} version {obj.get('version')!r}")
                block_tokens = int(obj.get("block_tokens", 0))
                if block_tokens < 1:
                    raise UsageError(f"{source}: header needs block_tokens >= 1")
                parse = _ours
                continue
            parse = _mooncake if "hash_ids" in obj else _ours
        req = parse(obj, lineno)
        if requests and req.time < requests[-1].time:
            raise UsageError(f"{source}: line {lineno}: requests are not in time order")
        requests.append(req)
    return Trace(tuple(requests), block_tokens, source)


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no trace file at {path}")
    with path.open() as f:
        return parse_lines(f, str(path))


def dump_trace(trace: Trace, path: str | Path) -> None:
    """Write `trace` in rdmapool's JSONL format."""
    with Path(path).open("w") as f:
        f.write(json.dumps({"format": FORMAT_NAME, "version": 1, "block_tokens": trace.block_tokens}) + "\n")
        for r in trace.requests:
            rec = {"t": r.time, "keys": list(r.keys), "tokens": r.tokens}
            if r.output_tokens:
                rec["output_tokens"] = r.output_tokens
            if r.tenant:
                rec["tenant"] = r.tenant
            f.write(json.dumps(rec) + "\n")


def shipped_traces_dir() -> Path:
    """The shipped traces: $RDMAPOOL_TRACES, else `../shared/traces` beside the repository root."""
    import os

    env = os.environ.get("RDMAPOOL_TRACES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "traces"
