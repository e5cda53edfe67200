"""Example-aware batches (data.mode padded / packed) through the real runtime on gloo: the same
examples in the same order and the same losses at DP=1 and DP=2 and after a resume; packed rows
give every example the logits it has when run alone (teacher with rotary, student with learned
absolute positions), and per-example pooling of the packed batch equals pooling of each example
run alone."""

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
    two = run(tmp_path, "dp2", 2, stop_after=2)  # steps 0-1, save, a fresh runtime resumes
    iso = one["isolation"]
    for who in ("teacher", "student"):
        assert iso[who] < 1e-5, iso  # each packed example = the example alone
        assert iso[f"{who}_pool"] < 1e-5, iso
        assert iso[f"{who}_without_mask"] > 1e-3, iso  # the mask matters: rows do hold several
    for mode in ("padded", "packed"):
        a, b = one[mode], two[mode]
        assert b["steps"] == list(range(1, STEPS + 1)), b["steps"]
        # the same store examples, in the same order, at every step (the resumed run re-reads
        # nothing before its checkpoint and continues with the same rows)
        assert a["seen"] == b["seen"]
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
        for ta, tb in zip(a["terms"], b["terms"], strict=True):
            assert ta.keys() == tb.keys() and {"glmd/kl", "pkd/patience", "lm/ce"} <= ta.keys()
            for k in ta:
                assert ta[k] == pytest.approx(tb[k], rel=1e-5), k
    # 10 examples, 4 rows per step: padded reads 16 rows = epoch 0 (10) + 6 of epoch 1
    rows = [r for step in one["padded"]["seen"] for r in step]
    first = {x for r in rows[:10] for x in r if x >= 0}
    assert first == set(range(10))
