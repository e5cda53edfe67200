"""RL-KD in the runtime (tests/dist/methods_job.py, two teachers): the delayed REINFORCE of
``methods.multi_teacher.RLKD`` is the same at data-parallel size 1 and 2. Each sequence draws its
actions from its own tokens and each microbatch slot covers the same global positions at either
size, so the losses, the policy terms and the trained policy weights agree; the policy loss is 0 at
the first step (no earlier selection) and not after. Cost: three rank processes (~55 CPU-s)."""

from __future__ import annotations

import math

import pytest

from tests.dist.test_runtime_methods_checkpoint import WEIGHT_ATOL, run

pytestmark = [pytest.mark.dist, pytest.mark.slow]

METHODS = [{"name": "rl_kd", "warmup": 0.0}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl_kd")
    return {dp: run(tmp, f"dp{dp}", tp=1, pp=1, dp=dp, steps=3, methods=METHODS) for dp in (1, 2)}


def test_rl_kd_is_the_same_at_dp1_and_dp2(runs):
    one, two = runs[1]["records"], runs[2]["records"]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
        for name in ("rl_kd/policy", "rl_kd/selected", "rl_kd/reward", "rl_kd/soft"):
            # the policy loss scales a small reward difference: float32 sums differ ~1e-7
            assert math.isclose(a["terms"][name], b["terms"][name], rel_tol=1e-5, abs_tol=1e-6), (
                name, a["terms"][name], b["terms"][name],
            )  # fmt: skip
    assert one[0]["terms"]["rl_kd/policy"] == 0.0  # nothing selected before the first step
    assert all(r["terms"]["rl_kd/policy"] != 0.0 for r in one[1:])
    modules = runs[1]["modules"]
    assert sorted(modules) == sorted(runs[2]["modules"]) and modules
    for key, value in modules.items():
        assert math.isclose(value, runs[2]["modules"][key], rel_tol=1e-4, abs_tol=WEIGHT_ATOL), key


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """DP1 stopped after step 2 (a checkpoint), then resumed for step 3 at the same layout."""
    tmp = tmp_path_factory.mktemp("rl_kd_resume")
    out = str(tmp / "run")
    first = run(tmp, "part1", tp=1, pp=1, dp=1, steps=3, methods=METHODS, stop_after=2, out_dir=out)
    second = run(tmp, "part2", tp=1, pp=1, dp=1, steps=3, methods=METHODS, out_dir=out)
    return first, second


def test_rl_kd_resumed_at_the_same_layout_equals_uninterrupted(runs, resumed):
    """The kept selections and baselines travel in the checkpoint: the resumed step 3 trains the
    policy on step 2's selection exactly as the uninterrupted run does (without them its policy
    term would be 0 and the policy weights would differ)."""
    first, second = resumed
    assert first["status"] == "preempted" and [r["step"] for r in first["records"]] == [1, 2]
    assert [r["step"] for r in second["records"]] == [3]
    expected = runs[1]["records"][2]
    got = second["records"][0]
    assert got["terms"]["rl_kd/policy"] != 0.0
    assert got["loss"] == expected["loss"]
    assert got["terms"] == expected["terms"]
    assert second["modules"] == runs[1]["modules"]
