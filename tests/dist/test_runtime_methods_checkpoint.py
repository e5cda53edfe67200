"""Method modules, multi-teacher and forward-changing methods in the runtime (tests/dist/methods_job.py):
the same losses and weights at TP1PP1 and TP2PP2; method modules saved under ``methods.*``,
restored on resume (bit-exact at the same layout, resharded at another); a distilled student's
checkpoint (method modules and all) loads as the next run's teacher (TAKD's chain).

Methods: ``shared_fit`` (a projection used on every pipeline stage: gradients summed over pp),
``mt_bert`` over two teachers (per-teacher projections placed on the last stage), ``lrc_bert``
(per-layer projections placed on their layer's stage, the gradient-perturbation second pass).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.dist._torchrun import REPO, torchrun

pytestmark = pytest.mark.dist

STEPS = 4
RTOL = 1e-5
METHODS = [
    {"name": "shared_fit", "weight": 0.5},
    {"name": "mt_bert", "weight": 1.0},
    {"name": "lrc_bert", "weight": 0.2, "epsilon": 0.05},
]


def run(tmp: Path, name: str, **spec) -> dict:
    spec.setdefault("out_dir", str(tmp / name))
    spec.setdefault("methods", METHODS)
    spec["result"] = str(tmp / f"{name}.json")
    path = tmp / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    torchrun(REPO / "tests/dist/methods_job.py", spec["tp"] * spec["pp"] * spec["dp"], str(path))
    return json.loads(Path(spec["result"]).read_text())


def _close(a: float, b: float, rtol: float = RTOL, atol: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


# Weight fingerprints (dot products with a fixed random tensor) that nearly cancel, such as a q/k/v
# bias's, also pass within an absolute 2e-5: see tests/dist/test_runtime_equivalence.py.
WEIGHT_ATOL = 2e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("ref"), "tp1pp1", tp=1, pp=1, dp=1, steps=STEPS)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return run(tmp_path_factory.mktemp("full"), "tp2pp2", tp=2, pp=2, dp=1, steps=STEPS)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("part")
    first = run(tmp, "part1", tp=2, pp=2, dp=1, steps=STEPS, stop_after=2, out_dir=str(tmp / "run"))
    # A copy to resume at another layout, independent of the same-layout resume.
    shutil.copytree(tmp / "run" / "checkpoints", tmp / "reshard" / "checkpoints")
    return tmp, first


def test_tp2pp2_matches_tp1pp1_with_method_modules(reference, full):
    assert len(full["records"]) == len(reference["records"]) == STEPS
    for ours, ref in zip(full["records"], reference["records"], strict=True):
        assert set(ours["terms"]) == set(ref["terms"])
        for name in ("shared_fit/mse", "mt_bert/soft", "mt_bert/hidden", "mt_bert/hard", "lrc_bert/contrastive",
                     "lrc_bert/soft", "lrc_bert/hard", "mt_bert/t1.soft"):
            assert name in ref["terms"], name
        assert _close(ours["loss"], ref["loss"]), (ours["step"], ours["loss"], ref["loss"])
        for name, value in ref["terms"].items():
            assert _close(ours["terms"][name], value), (name, ours["terms"][name], value)
    # Training moved the modules: every module of every method is in the fingerprint.
    assert {k.split("|")[0] for k in reference["modules"]} == {
        "methods.shared_fit.fit.weight", "methods.shared_fit.fit.bias",
        "methods.mt_bert.proj_t0.weight", "methods.mt_bert.proj_t0.bias",
        "methods.mt_bert.proj_t1.weight", "methods.mt_bert.proj_t1.bias",
        "methods.lrc_bert.proj_l0.weight", "methods.lrc_bert.proj_l0.bias",
        "methods.lrc_bert.proj_l1.weight", "methods.lrc_bert.proj_l1.bias",
    }  # fmt: skip
    assert set(full["modules"]) == set(reference["modules"])
    for key, value in reference["modules"].items():
        assert _close(full["modules"][key], value, 1e-4), (key, full["modules"][key], value)
    for key, value in reference["student"].items():
        assert _close(full["student"][key], value, 1e-4, WEIGHT_ATOL), (key, full["student"][key], value)


def test_checkpoint_holds_method_modules_beside_the_student(interrupted):
    from megatron.core import dist_checkpointing

    tmp, _ = interrupted
    metadata = dist_checkpointing.load_tensors_metadata(str(tmp / "run/checkpoints/step_0000002/dist"))
    modules = {k for k in metadata if k.startswith("methods.")}
    assert "methods.mt_bert.proj_t1.weight" in modules and "methods.shared_fit.fit.weight" in modules
    assert tuple(metadata["methods.mt_bert.proj_t0.weight"].global_shape) == (48, 32)  # full, not a shard
    assert any(k.startswith("model.decoder.layers.") for k in metadata)


def test_resume_restores_method_modules_exactly(full, interrupted):
    tmp, first = interrupted
    assert first["status"] == "preempted" and [r["step"] for r in first["records"]] == [1, 2]
    second = run(tmp, "part2", tp=2, pp=2, dp=1, steps=STEPS, out_dir=str(tmp / "run"))
    assert [r["step"] for r in second["records"]] == [3, 4]
    expected = {r["step"]: r for r in full["records"]}
    for record in second["records"]:
        assert record["loss"] == expected[record["step"]]["loss"], record["step"]
    assert second["modules"] == full["modules"]
    assert second["student"] == full["student"]


def test_resume_reshards_method_modules_to_tp1pp1(full, interrupted):
    tmp, _ = interrupted
    resumed = run(tmp, "reshard", tp=1, pp=1, dp=1, steps=STEPS, out_dir=str(tmp / "reshard"))
    assert [r["step"] for r in resumed["records"]] == [3, 4]
    expected = {r["step"]: r for r in full["records"]}
    for record in resumed["records"]:
        assert _close(record["loss"], expected[record["step"]]["loss"]), record
    for key, value in full["modules"].items():
        assert _close(resumed["modules"][key], value, 1e-4), key


def test_distilled_student_loads_as_the_next_runs_teacher(full, tmp_path):
    """TAKD's chain: run 1 distills an assistant (its checkpoint also holds method modules); run 2
    loads it as the teacher, at another layout, reading only the student's weights."""
    saved = run(tmp_path, "assistant", tp=2, pp=2, dp=1, steps=1, out_dir=str(tmp_path / "assistant"))
    as_teacher = run(
        tmp_path, "student", tp=1, pp=1, dp=1, steps=1, teacher_arch="student",
        teacher_checkpoint=str(tmp_path / "assistant"), methods=[{"name": "glmd"}],
    )  # fmt: skip
    assert set(as_teacher["teacher"]) == set(saved["student"])
    for key, value in saved["student"].items():
        assert math.isclose(as_teacher["teacher"][key], value, rel_tol=1e-6, abs_tol=1e-9), key
