"""Resume matrix: a checkpoint saved at each of TP1PP1, TP2PP1, TP1PP2, TP2PP2 and DP2 continues at
its own layout and at TP1PP1 with the losses of the UNINTERRUPTED TP1PP1 run (an independent
reference: it never saved or loaded anything), for glmd + tinybert (learned projection, layer map
[1, 3]) + lm. Also: after a resume, ``metrics.jsonl`` holds each step once, the resumed run's.

Five torchrun launches (tests/dist/resume_job.py): each layout runs 4 steps uninterrupted, saving
at step 2, then resumes from its own step-2 checkpoint in a fresh runtime; the TP1PP1 launch also
resumes from every other layout's checkpoint.

Tolerance: relative 1e-5 on every loss and term (fp32; layouts differ in reduction order only, a
few ulps per step, while a wrongly restored weight or optimizer state moves the losses by >1e-3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.dist._torchrun import REPO, torchrun

pytestmark = pytest.mark.dist

STEPS, SAVE_AT = 4, 2
RTOL, ATOL = 1e-5, 1e-7
LAYOUTS = {
    "tp1pp1": (1, 1, 1),
    "tp2pp1": (2, 1, 1),
    "tp1pp2": (1, 2, 1),
    "tp2pp2": (2, 2, 1),
    "dp2": (1, 1, 2),
}
CELLS = [(saved, saved) for saved in LAYOUTS] + [(saved, "tp1pp1") for saved in LAYOUTS if saved != "tp1pp1"]


def _launch(tmp: Path, layout: str, resume_from: list) -> dict:
    tp, pp, dp = LAYOUTS[layout]
    spec = {
        "tp": tp, "pp": pp, "dp": dp, "steps": STEPS, "save_every": SAVE_AT, "full": True,
        "out_dir": str(tmp / layout), "result": str(tmp / f"{layout}.json"), "resume_from": resume_from,
    }  # fmt: skip
    path = tmp / f"{layout}.spec.json"
    path.write_text(json.dumps(spec))
    torchrun(REPO / "tests/dist/resume_job.py", tp * pp * dp, str(path))
    return json.loads((tmp / f"{layout}.json").read_text())


def _saved(tmp: Path, layout: str) -> list:
    full = tmp / layout / "full"
    return [str(full / "checkpoints" / f"step_{SAVE_AT:07d}"), str(full / "metrics.jsonl")]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("resume")
    results = {}
    for layout in LAYOUTS:
        if layout != "tp1pp1":
            results[layout] = _launch(tmp, layout, [["own", *_saved(tmp, layout)]])
    others = [[f"from_{layout}", *_saved(tmp, layout)] for layout in LAYOUTS if layout != "tp1pp1"]
    results["tp1pp1"] = _launch(tmp, "tp1pp1", [["own", *_saved(tmp, "tp1pp1")], *others])
    return results


def _resumed(matrix: dict, saved: str, continued: str) -> dict:
    if saved == continued:
        return matrix[continued]["own"]
    return matrix[continued][f"from_{saved}"]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.parametrize(("saved", "continued"), CELLS, ids=[f"{s}-to-{c}" for s, c in CELLS])
def test_resume_equals_uninterrupted_tp1pp1(matrix, saved, continued):
    reference = {r["step"]: r for r in matrix["tp1pp1"]["full"]}
    assert sorted(reference) == list(range(1, STEPS + 1))
    resumed = _resumed(matrix, saved, continued)["records"]
    assert [r["step"] for r in resumed] == list(range(SAVE_AT + 1, STEPS + 1))
    worst = 0.0
    for record in resumed:
        ref = reference[record["step"]]
        assert set(record["terms"]) == set(ref["terms"]) >= {"glmd/kl", "tinybert/hidden", "tinybert/attention", "lm/ce"}
        worst = max(worst, _rel(record["loss"], ref["loss"]))
        assert math.isclose(record["loss"], ref["loss"], rel_tol=RTOL), (record["step"], record["loss"], ref["loss"])
        for name, value in ref["terms"].items():
            assert math.isclose(record["terms"][name], value, rel_tol=RTOL, abs_tol=ATOL), (name, record, ref)
    print(f"resume {saved} -> {continued}: max relative loss difference {worst:.2e}")


def test_every_layout_uninterrupted_matches_tp1pp1(matrix):
    """The saving runs themselves (steps 1-4 at each layout) agree with the reference."""
    reference = matrix["tp1pp1"]["full"]
    for layout, result in matrix.items():
        assert [r["step"] for r in result["full"]] == [r["step"] for r in reference]
        for ours, ref in zip(result["full"], reference, strict=True):
            assert math.isclose(ours["loss"], ref["loss"], rel_tol=RTOL), (layout, ours, ref)


@pytest.mark.parametrize(("saved", "continued"), [("tp1pp2", "tp1pp2"), ("tp2pp2", "tp1pp1")])
def test_metrics_hold_each_step_once_after_resume(matrix, saved, continued):
    """The resumed folder started with the saving run's metrics.jsonl (steps 1-4); steps 3-4 are
    re-run, so the file must hold steps 1-4 once each, steps 3-4 as the resumed run logged them."""
    resumed = _resumed(matrix, saved, continued)
    logged = resumed["logged"]
    assert [step for step, _ in logged] == list(range(1, STEPS + 1))
    assert [loss for _, loss in logged[SAVE_AT:]] == [r["loss"] for r in resumed["records"]]
    saving_run = matrix[saved]["full"]
    assert [loss for _, loss in logged[:SAVE_AT]] == [r["loss"] for r in saving_run[:SAVE_AT]]
