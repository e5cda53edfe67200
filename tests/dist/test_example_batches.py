"""Example-aware batches (data.mode padded / packed) through the real runtime on gloo: the same
examples in the same order and the same losses at DP=1 and DP=2 (up to the reduction order), a
resumed run bit-identical to the uninterrupted one; packed rows give every example the logits it
has when run alone (teacher with rotary, student with learned absolute positions), and
per-example pooling of the packed batch equals pooling of each example run alone."""

from __future__ import annotations

import json

import pytest

from tests.dist._torchrun import REPO, torchrun

pytestmark = pytest.mark.dist

STEPS = 4


def run(tmp_path, name, nproc, **spec):
    spec = {"modes": ["padded", "packed"], "steps": STEPS, "out_dir": str(tmp_path / name), **spec}
    spec["result"] = str(tmp_path / f"{name}.json")
    path = tmp_path / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    torchrun(REPO / "tests/dist/examples_job.py", nproc, str(path))
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_dp_and_resume_invariance_and_isolation(tmp_path):
    one = run(tmp_path, "dp1", 1, isolation=True)
    # DP2: uninterrupted, and steps 0-1, save, a fresh runtime in the same process resumes
    two = run(tmp_path, "dp2", 2, runs=["full", "resumed"], stop_after=2)
    iso = one["isolation"]
    for who in ("teacher", "student"):
        assert iso[who] < 1e-5, iso  # each packed example = the example alone
        assert iso[f"{who}_pool"] < 1e-5, iso
        assert iso[f"{who}_without_mask"] > 1e-3, iso  # the mask matters: rows do hold several
    for mode in ("padded", "packed"):
        a, full, resumed = one[mode]["full"], two[mode]["full"], two[mode]["resumed"]
        for r in (a, full, resumed):
            assert r["steps"] == list(range(1, STEPS + 1)), r["steps"]
            assert {"glmd/kl", "pkd/patience", "lm/ce"} <= r["terms"][0].keys()
        # Resume: the resumed run equals the uninterrupted one at the same DP size exactly (the
        # same rows, the same weights and optimizer state after the checkpoint)
        assert resumed == full, mode
        # DP size: the same store examples, in the same order, at every step
        assert a["seen"] == full["seen"]
        # ... and the same losses up to the gradient reduction order: DP1 adds the 4 microbatch
        # gradients one after another into one buffer, DP2 adds 2 per rank and the all-reduce
        # adds the two sums, so the weights after the first update (step 2; step 1 has lr 0 in
        # warm-up) differ in the last bit or two (seen: max 9.3e-9 on weights ~0.07). Terms
        # computed as small differences of large fp32 numbers amplify that: PKD's T^2 KL at
        # T=10 (~0.01, a difference of log-sum-exps ~4.8, times 100) moved by up to 2.4e-6 at
        # step 3 (on random [64, 120] logits, a relative perturbation of 1e-7 moves its fp32
        # value by ~2e-6 and its exact value by ~5e-10). Hence rel 1e-5 as tests/dist/test_resume_matrix.py
        # with an absolute floor of 1e-5; a wrong example or mask moves terms by ~1e-2.
        assert a["losses"] == pytest.approx(full["losses"], rel=1e-5)
        for ta, tb in zip(a["terms"], full["terms"], strict=True):
            assert ta.keys() == tb.keys()
            for k in ta:
                assert ta[k] == pytest.approx(tb[k], rel=1e-5, abs=1e-5), k
    # 10 examples, 4 rows per step: padded reads 16 rows = epoch 0 (10) + 6 of epoch 1
    rows = [r for step in one["padded"]["full"]["seen"] for r in step]
    first = {x for r in rows[:10] for x in r if x >= 0}
    assert first == set(range(10))


def _contrastive_examples_rank():
    import torch
    import torch.distributed as dist

    from methods.forward_methods import LRCBERT, LRCBERTParams

    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(rank)
    s, b = 6, 2
    student = torch.randn(s, b, 4, generator=gen, dtype=torch.float64)
    teacher = torch.randn(s, b, 6, generator=gen, dtype=torch.float64)
    # rank 0: 3 examples, rank 1: 4 (a packed microbatch's count varies); s-major ids
    rows = [[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, 2, 2]]
    if rank == 1:
        rows = [[0, 0, 1, 1, 1, -1], [2, 2, 3, 3, 3, 3]]
    ids = torch.tensor(rows).t().reshape(-1)
    mask = (ids >= 0).double()
    torch.manual_seed(0)
    projection = torch.nn.Linear(4, 6).double()
    loss = LRCBERT(LRCBERTParams(tau=0.5)).contrastive(
        student, teacher, mask, projection, dist.group.WORLD, ids
    )
    return float(loss.detach()), student, teacher, rows


def test_lrc_bert_contrastive_per_example_with_unequal_counts_over_dp():
    """Per-example vectors (means over each example's tokens) are the samples; negatives come
    from every example on every dp rank, though the ranks hold different numbers."""
    import torch

    from tests.distributed import run_on_ranks

    results = run_on_ranks(_contrastive_examples_rank, 2)

    def means(x, rows):
        out = []
        for r, row in enumerate(rows):
            for e in sorted(set(row) - {-1}):
                out.append(x[[i for i, v in enumerate(row) if v == e], r].mean(0))
        return torch.stack(out)

    teachers = torch.cat([means(t, rows) for _, _, t, rows in results])
    torch.manual_seed(0)
    projection = torch.nn.Linear(4, 6).double()
    offset = 0
    for value, student, _, rows in results:
        z = projection(means(student, rows))
        sims = torch.nn.functional.cosine_similarity(z[:, None], teachers[None], dim=-1) / 0.5
        n = z.shape[0]
        reference = -torch.log_softmax(sims, -1)[torch.arange(n), torch.arange(n) + offset].mean()
        assert abs(value - float(reference.detach())) < 1e-10
        offset += n
    assert offset == 7
