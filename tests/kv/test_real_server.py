"""The KV layer against real memory-server processes (tcp and shm on loopback): KV bytes survive the round trip
bit for bit, a decode engine answers as the baseline does, and tenants and model fingerprints never share."""

from __future__ import annotations

import pytest
import torch

from rdmapool.client import PoolClient
from rdmapool.config import ClientConfig
from rdmapool.kv import kernels
from rdmapool.kv.hf import HFEngine, cache_pairs
from rdmapool.kv.layouts import Layout, paged_kv
from rdmapool.kv.models import ModelSpec, fingerprint, load_model
from tests.support import procs

CHUNK = 16


@pytest.fixture(scope="module")
def micro():
    spec = ModelSpec("llama", "micro", seed=5)
    return load_model(spec), *fingerprint(spec, "cpu", torch.float32)


def client(server: procs.ServerProc, transport: str, tenant: str = "a") -> PoolClient:
    return PoolClient([server.address], ClientConfig(token=procs.TOKENS[tenant], staging_bytes=4 << 20),
                      transport_name=transport)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_kv_bytes_identical_after_server_round_trip(micro, transport: str) -> None:
    model, mid, rev = micro
    prompt = torch.randint(0, 512, (1, 3 * CHUNK + 5), generator=torch.Generator().manual_seed(0))
    writer_engine = HFEngine(model, mid, rev, None, chunk_tokens=CHUNK)
    _, cache = writer_engine._forward(prompt, None, torch.arange(prompt.shape[1])[None])
    pairs = [(k.contiguous(), v.contiguous()) for k, v in cache_pairs(cache)]
    kv = paged_kv(Layout.HF, pairs)
    slots = torch.arange(3 * CHUNK)
    blocks = kernels.gather(kv, slots, kv.empty_blocks(3, CHUNK), CHUNK)
    keys = [bytes([i]) * 16 for i in range(3)]
    payload = [blocks[i].contiguous().view(torch.uint8).reshape(-1).numpy() for i in range(3)]
    with procs.running(transport, "16MiB") as srv, client(srv, transport) as a, client(srv, transport) as a2:
        a.put(keys, payload)
        back = torch.zeros(3, payload[0].size, dtype=torch.uint8)
        got = a2.get(keys, [back[i].numpy() for i in range(3)])
        assert got == [payload[0].size] * 3
    assert torch.equal(back, torch.stack([torch.from_numpy(p) for p in payload]))
    # and scattered into a fresh cache, every layer's K and V equal the original at those positions
    fresh = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in pairs]
    kernels.scatter(paged_kv(Layout.HF, fresh), slots, back.view(torch.float32).view(blocks.shape), CHUNK)
    for (k, v), (fk, fv) in zip(pairs, fresh, strict=True):
        assert torch.equal(k[:, :, : 3 * CHUNK], fk[:, :, : 3 * CHUNK])
        assert torch.equal(v[:, :, : 3 * CHUNK], fv[:, :, : 3 * CHUNK])


def test_engines_share_kv_through_a_server_and_tenants_do_not(micro) -> None:
    model, mid, rev = micro
    prompt = torch.randint(0, 512, (4 * CHUNK + 3,), generator=torch.Generator().manual_seed(1)).tolist()
    baseline = HFEngine(model, mid, rev, None, chunk_tokens=CHUNK).run_batch([prompt], 12)
    with procs.running("tcp", "16MiB") as srv, client(srv, "tcp") as a1, client(srv, "tcp") as a2, \
            client(srv, "tcp", "b") as b:
        HFEngine(model, mid, rev, a1, tenant="a", chunk_tokens=CHUNK).run_batch([prompt], 0)
        # paired: same tenant and model hit every full chunk, and answer as the baseline does ...
        hit = HFEngine(model, mid, rev, a2, tenant="a", chunk_tokens=CHUNK).run_batch([prompt], 12)
        assert hit.cached_tokens == [4 * CHUNK] and hit.bytes_read > 0
        assert hit.outputs == baseline.outputs
        # ... tenant b, even naming tenant a's namespace, never does (the server scopes by the auth token) ...
        assert HFEngine(model, mid, rev, b, tenant="a", chunk_tokens=CHUNK).run_batch([prompt], 1).cached_tokens == [0]
        # ... nor does tenant a with another weights revision of the same model id
        other = HFEngine(model, mid, "another-revision", a2, tenant="a", chunk_tokens=CHUNK)
        assert other.run_batch([prompt], 1).cached_tokens == [0]


def test_direct_shm_reads_match_and_validate(micro) -> None:
    """The shm direct path (copy from the server's mapping into the destination tensor) returns the bytes `get`
    returns, validates each block (a wrong generation is a miss), and serves an engine like the staging path."""
    from rdmapool.kv import direct

    model, mid, rev = micro
    payload = [torch.randint(0, 255, (4096,), dtype=torch.uint8).numpy() for _ in range(3)]
    keys = [bytes([i + 1]) * 16 for i in range(3)]
    with procs.running("shm", "16MiB") as srv, client(srv, "shm") as a, client(srv, "shm") as b:
        a.put(keys, payload)
        found = b.lookup_prefix(keys)
        assert direct.supported(b) and len(found) == 3
        out = torch.zeros(3, 4096, dtype=torch.uint8)
        assert direct.read_direct(b, list(found.refs), out) == 3
        assert all(torch.equal(out[i], torch.from_numpy(payload[i])) for i in range(3))
        ref = found.refs[1]
        bad = ref._replace(hit=ref.hit._replace(generation=ref.hit.generation + 1))
        assert direct.read_direct(b, [found.refs[0], bad, found.refs[2]], torch.zeros(3, 4096, dtype=torch.uint8)) == 1
        # an engine reading through the direct path answers as the baseline does
        prompt = torch.randint(0, 512, (3 * CHUNK + 3,), generator=torch.Generator().manual_seed(4)).tolist()
        HFEngine(model, mid, rev, a, tenant="a", chunk_tokens=CHUNK).run_batch([prompt], 0)
        eng = HFEngine(model, mid, rev, b, tenant="a", chunk_tokens=CHUNK, direct="on")
        got = eng.run_batch([prompt], 8)
        assert got.cached_tokens == [3 * CHUNK]
        assert got.outputs == HFEngine(model, mid, rev, None, chunk_tokens=CHUNK).run_batch([prompt], 8).outputs
    assert not direct.supported(object())


def test_chain_hints_reach_the_servers_policy(micro) -> None:
    """Puts carry (parent, depth, tokens) for the eviction policy when the client takes hints."""
    from rdmapool.kv.keys import chunk_keys
    from rdmapool.kv.pool import PoolConnector

    class Recorder:
        def __init__(self, inner):
            self.inner, self.hints = inner, []

        def put(self, keys, buffers, hints=None):
            self.hints += hints
            return self.inner.put(keys, buffers, hints=hints)

        def lookup_prefix(self, keys):
            return self.inner.lookup_prefix(keys)

        def get(self, keys, into):
            return self.inner.get(keys, into)

        def delete(self, keys):
            return self.inner.delete(keys)

    model, mid, rev = micro
    eng = HFEngine(model, mid, rev, None, chunk_tokens=CHUNK)
    keys = chunk_keys(eng.ns, list(range(1, 3 * CHUNK + 1)))
    with procs.running("tcp", "16MiB") as srv, client(srv, "tcp") as a:
        rec = Recorder(a)
        conn = PoolConnector(rec, 64)
        staging = conn.staging("write", 2)
        assert conn.write(keys[1:3], staging, parent=keys[0], tokens=CHUNK)
        assert a.lookup_prefix([k.raw for k in keys[1:3]]).refs
    assert [(h.parent, h.depth, h.tokens) for h in rec.hints] == [
        (keys[0].raw, 1, CHUNK), (keys[1].raw, 2, CHUNK)]


def test_a_dead_server_costs_hits_not_answers(micro) -> None:
    """Two servers; one is SIGKILLed between turns: its chunks become misses (recomputed), the answers stay
    those of the run without the pool, and nothing raises."""
    from rdmapool.kv.localcluster import LocalPool, close_client, connect

    model, mid, rev = micro
    prompt = torch.randint(0, 512, (8 * CHUNK + 3,), generator=torch.Generator().manual_seed(6)).tolist()
    want = HFEngine(model, mid, rev, None, chunk_tokens=CHUNK).run_batch([prompt], 8).outputs
    with LocalPool("tcp", 2, quota="16MiB") as lp:
        writer, reader = connect(lp.spec()), connect(lp.spec())
        try:
            HFEngine(model, mid, rev, writer, tenant="demo", chunk_tokens=CHUNK).run_batch([prompt], 0)
            before = HFEngine(model, mid, rev, reader, tenant="demo", chunk_tokens=CHUNK).run_batch([prompt], 8)
            assert before.cached_tokens == [8 * CHUNK] and before.outputs == want
            lp.procs[1].kill()
            lp.procs[1].wait(10)
            after = HFEngine(model, mid, rev, reader, tenant="demo", chunk_tokens=CHUNK).run_batch([prompt], 8)
            assert after.cached_tokens[0] < 8 * CHUNK  # the chain breaks at the first chunk the dead server held
            assert after.outputs == want
        finally:
            close_client(writer)
            close_client(reader)


def test_direct_read_is_a_miss_when_the_lease_ran_out_during_the_copy(micro) -> None:
    """Without a payload checksum the lease is what says the slot was not reused mid-copy: checked again after
    the copies finished (client clock, with the client's margin already in `lease_until`)."""
    from rdmapool.kv import direct

    payload = [torch.randint(0, 255, (4096,), dtype=torch.uint8).numpy() for _ in range(3)]
    keys = [bytes([i + 7]) * 16 for i in range(3)]
    with procs.running("shm", "16MiB") as srv, client(srv, "shm") as a, client(srv, "shm") as b:
        a.put(keys, payload)
        found = b.lookup_prefix(keys)
        refs = list(found.refs)
        until = min(r.lease_until for r in refs)
        real = b.clock
        try:
            # valid when the copies are queued, expired by the time they are checked
            ticks = iter([until - 1e-3, until + 1e-3])
            b.clock = lambda: next(ticks)
            read = direct.start_direct(b, refs, torch.zeros(3, 4096, dtype=torch.uint8))
            assert read.queued == 3
            assert read.finish() == 0
            assert b.counters.snapshot().get("lease_expired", 0) >= 1
            # still valid after the copies: every block is good
            ticks = iter([until - 2e-3, until - 1e-3])
            b.clock = lambda: next(ticks)
            out = torch.zeros(3, 4096, dtype=torch.uint8)
            assert direct.read_direct(b, refs, out) == 3
            # expired before the copies: nothing is even queued
            b.clock = lambda: until
            assert direct.start_direct(b, refs, torch.zeros(3, 4096, dtype=torch.uint8)).queued == 0
        finally:
            b.clock = real
        assert all(torch.equal(out[i], torch.from_numpy(payload[i])) for i in range(3))


@pytest.mark.parametrize("mode,group", [("layered", 1), ("layered", 2), ("serial", 1), ("legacy", 1)])
def test_load_modes_answer_as_the_baseline_and_read_every_full_chunk(micro, mode: str, group: int) -> None:
    """A prompt of exactly 3 chunks reads all 3 (its cache then shows all tokens but the last, which is computed),
    over the shm direct path, with every way of building the cache."""
    model, mid, rev = micro
    prompt = torch.randint(0, 512, (3 * CHUNK,), generator=torch.Generator().manual_seed(9)).tolist()
    want = HFEngine(model, mid, rev, None, chunk_tokens=CHUNK).run_batch([prompt], 6)
    with procs.running("shm", "16MiB") as srv, client(srv, "shm") as a, client(srv, "shm") as b:
        HFEngine(model, mid, rev, a, tenant="a", chunk_tokens=CHUNK).run_batch([prompt], 0)
        eng = HFEngine(model, mid, rev, b, tenant="a", chunk_tokens=CHUNK, direct="on", load_mode=mode,
                       layers_per_copy=group)
        eng.breakdown = {}
        got = eng.run_batch([prompt], 6)
    assert got.cached_tokens == [3 * CHUNK - 1]
    assert got.bytes_read == 3 * eng.chunk_bytes
    assert got.outputs == want.outputs
    assert (got.first_logits - want.first_logits).abs().max() < 1e-4
    assert {"keys", "lookup", "forward", "first_token"} <= set(eng.breakdown)
