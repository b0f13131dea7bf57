"""Batched next-token choice: seeded rows' random numbers come from one batched counter-based draw.

Oracles: counting the aten ops a step's draw dispatches (independent of the code's own bookkeeping),
and the uniform distribution's own moments and bin counts."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit.generation.sampling import BatchParams, SeedStream, choose


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _params(rows, seeded_every=1):
    streams = [SeedStream(1000 + i) if i % seeded_every == 0 else None for i in range(rows)]
    return BatchParams([0.8] * rows, [0.9] * rows, [0] * rows, streams, torch.device("cpu")), streams


def test_a_steps_draw_costs_the_same_ops_for_4_or_256_seeded_rows():
    counts = []
    for rows in (4, 256):
        params, _ = _params(rows, seeded_every=2)  # seeded and unseeded rows mixed
        params.uniforms()  # warm up
        with _CountOps() as counter:
            params.uniforms()
        counts.append(counter.ops)
    assert counts[0] == counts[1], counts  # a generator per row would dispatch one draw per row


def test_a_seeded_rows_numbers_depend_on_its_seed_and_draw_count_only():
    alone, _ = _params(1)
    mixed = BatchParams([0.8] * 3, [1.0] * 3, [0] * 3, [None, SeedStream(1000), SeedStream(7)], torch.device("cpu"))
    a = [float(alone.uniforms()[0]) for _ in range(5)]
    b = [float(mixed.uniforms()[1]) for _ in range(5)]
    assert a == b and len(set(a)) == 5
    # rebuilt mid-stream (a row joined or left): the stream goes on where it was
    stream = SeedStream(1000)
    first = BatchParams([1.0], [1.0], [0], [stream], torch.device("cpu"))
    got = [float(first.uniforms()[0]) for _ in range(2)]
    second = BatchParams([1.0, 1.0], [1.0, 1.0], [0, 0], [SeedStream(5), stream], torch.device("cpu"))
    got += [float(second.uniforms()[1]) for _ in range(3)]
    assert got == a


def test_seeded_numbers_are_uniform():
    rows = 4096
    params = BatchParams([1.0] * rows, [1.0] * rows, [0] * rows, [SeedStream(s) for s in range(rows)],
                         torch.device("cpu"))
    u = torch.cat([params.uniforms() for _ in range(16)])  # 65,536 numbers
    assert u.min() >= 0 and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.histc(u, bins=64, min=0, max=1)
    chi2 = float(((counts - len(u) / 64) ** 2 / (len(u) / 64)).sum())
    assert chi2 < 120, chi2  # 63 degrees of freedom: p < 1e-5 above ~120
    assert len(set(u.tolist())) > 0.99 * len(u) - 200  # 2**24 values: a few collisions by chance


def test_seeded_sampling_follows_the_distribution():
    # Row probabilities (0.7, 0.2, 0.1): each seeded row's choice frequency over many seeds matches.
    rows = 6000
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).expand(rows, 3)
    params = BatchParams([1.0] * rows, [1.0] * rows, [0] * rows, [SeedStream(s) for s in range(rows)],
                         torch.device("cpu"))
    tokens, _ = choose(logits, params)
    freq = torch.bincount(tokens, minlength=3).float() / rows
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02), freq


def _full_sort_top_p(probs, top_p):
    """The textbook nucleus (sort the whole vocabulary), as the oracle."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p[:, None]
    out = torch.zeros_like(probs).scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.where(top_p[:, None] < 1, out, probs)


def test_top_p_without_a_full_sort_keeps_the_same_nucleus():
    from lorakit.generation.sampling import _top_p

    gen = torch.Generator().manual_seed(0)
    vocab = 5000
    # peaked rows (the nucleus is in the first 64), flat rows (it needs thousands), and top_p 1
    logits = torch.cat([torch.randn(4, vocab, generator=gen) * 8, torch.randn(4, vocab, generator=gen) * 0.1,
                        torch.randn(2, vocab, generator=gen)])
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.1, 0.9, 0.95, 0.3, 0.999, 1.0, 1.0])
    got = _top_p(probs, top_p)
    want = _full_sort_top_p(probs, top_p)
    assert torch.equal(got > 0, want > 0) and torch.allclose(got, want, atol=0, rtol=0)
    assert (got[4:8] > 0).sum(dim=-1).min() > 64  # the flat rows needed the search to grow
