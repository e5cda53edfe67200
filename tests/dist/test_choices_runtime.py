"""Choice records through the runtime (tests/dist/choices_job.py): glmd_soft, kd on class scores
and glmd at the answer positions on packed choice rows.

Independent reference: step 1's glmd_soft term and kd's hard term (before any update) equal the
values computed from each option's ``log p(option | prompt)`` with the option run alone through the
same models (no packing, no block mask, no vocabulary sharding, no fused head) and GLMD's soft
cross entropy / the class cross entropy written with plain math. Layouts: TP2PP2 equals TP1PP1
for every term of both steps. Cost: five rank processes (~25 CPU-s)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.dist._torchrun import REPO, torchrun

pytestmark = pytest.mark.dist


def run(tmp: Path, name: str, **spec) -> dict:
    spec.update(out_dir=str(tmp / name), result=str(tmp / f"{name}.json"), steps=2)
    path = tmp / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    torchrun(REPO / "tests/dist/choices_job.py", spec["tp"] * spec["pp"], str(path))
    return json.loads(Path(spec["result"]).read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("choices")
    return {layout: run(tmp, layout, tp=tp, pp=pp) for layout, tp, pp in
            (("tp1pp1", 1, 1), ("tp2pp2", 2, 2))}  # fmt: skip


def test_step_one_equals_the_options_scored_alone(runs):
    ref = runs["tp1pp1"]["reference"]
    first = runs["tp1pp1"]["records"][0]["terms"]
    assert len(ref["groups"]) >= 3  # packed: several task examples per row
    assert first["glmd_soft/soft"] == pytest.approx(ref["glmd_soft"], rel=1e-5)
    assert first["kd/hard"] == pytest.approx(ref["hard"], rel=1e-5)
    assert first["glmd/kl"] > 0


def test_tp2pp2_equals_tp1pp1_on_choice_rows(runs):
    one, four = runs["tp1pp1"]["records"], runs["tp2pp2"]["records"]
    assert [r["step"] for r in one] == [r["step"] for r in four] == [1, 2]
    for a, b in zip(one, four, strict=True):
        assert set(a["terms"]) == set(b["terms"])
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["loss"], b["loss"])
        for name, value in a["terms"].items():
            assert math.isclose(value, b["terms"][name], rel_tol=1e-5, abs_tol=1e-7), name
