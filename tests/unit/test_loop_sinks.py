"""The training loop's metric sinks, validation every N steps and the best checkpoint, with a
stand-in runtime (one gloo process), read back with independent readers: TensorBoard's own
EventAccumulator, and W&B's ``.wandb`` files parsed from the LevelDB-log record format with
wandb's protobuf ``Record``."""

from __future__ import annotations

import glob
import json
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from parallel import checkpoint as ckpt
from parallel.loop import LoopSettings, train_loop
from parallel.runtime import StepResult

pytestmark = pytest.mark.unit

TERMS = ("glmd/kl", "lm/ce")


def loss_at(step: int) -> float:
    """The loss of step ``step`` (0-based): a pure function, so resumed = uninterrupted."""
    return 3.0 / (step + 1) + 0.125


def valid_at(step: int) -> float:
    """Validation loss after ``step`` steps: improves until step 6, then gets worse."""
    return 2.0 + abs(step - 6) / 10


class FakeRuntime:
    """What train_loop uses of DistillationRuntime; checkpoints are real folders with meta.json
    and a manifest, pruned by parallel.checkpoint."""

    def __init__(self) -> None:
        self.stage = SimpleNamespace(memory=SimpleNamespace(reset=lambda: 1024))
        self.baseline_memory_bytes = 0
        self.skipped_steps = 0

    def train_step(self, step, batch) -> StepResult:
        loss = loss_at(step)
        return StepResult(
            step=step,
            loss=loss,
            terms={"glmd/kl": loss * 0.75, "lm/ce": loss * 0.25},
            lr=1e-3 * (1 - step / 20),
            grad_norm=0.5 + step,
            skipped=False,
            seconds=0.01,
            tokens=64,
        )

    def save(self, root, *, step, meta, config_yaml, keep_last, extra_files=None) -> Path:
        folder = root / ckpt.step_dir_name(step)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").write_text(json.dumps({"step": step}))
        ckpt.write_manifest(folder)
        (root / "latest").write_text(folder.name)
        ckpt._prune(root, keep_last)
        return folder

    def load(self, folder: Path) -> dict:
        return json.loads((folder / "meta.json").read_text())


@pytest.fixture
def world(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def wandb_history(out: Path) -> list[dict]:
    """History rows of every ``.wandb`` file under ``out/wandb`` (the LevelDB log format: a
    7-byte file header, 32 KiB blocks of records with a 7-byte header: crc32c, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "*.wandb"))):
        data = Path(path).read_bytes()
        assert data[:4] == b":W&B"
        offset, pending = 7, b""
        while offset + 7 <= len(data):
            left = 32768 - offset % 32768
            if left < 7:
                offset += left
                continue
            _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
            offset += 7
            if length == 0 and kind == 0:
                break
            pending += data[offset : offset + length]
            offset += length
            if kind in (1, 4):  # FULL or LAST
                record = pb.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append(
                        {
                            item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item
                        }
                    )
    return rows


def scalar_events(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_sinks_validation_and_best_checkpoint_survive_a_crash_and_resume(tmp_path, world):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    calls: list[int] = []

    def validate(step: int) -> dict:
        calls.append(step)
        loss = valid_at(step)
        return {"student_loss": loss, "student_ppl": math.exp(loss), "teacher_loss": 1.5}

    settings = LoopSettings(
        steps=10,
        save_every=4,
        keep_last=1,
        out_dir=out,
        config_yaml="train: {steps: 10, lr: 0.001}\nmethods:\n- {name: glmd, weight: 1.0}\n",
        log_to=("jsonl", "tensorboard", "wandb"),
        eval_every=3,
        best_metric="valid/student_loss",
    )

    def crash_at_7(record):
        if record["step"] == 7:  # after step 7 was logged, before any save of it: a kill -9
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train_loop(FakeRuntime(), lambda step: [], settings, on_step=crash_at_7, validate=validate)
    assert calls == [3, 6]
    root = out / "checkpoints"
    # Step 6 improved the best validation loss: saved there although save_every is 4.
    assert (root / "best").read_text().strip() == "step_0000006"
    assert (root / "latest").read_text().strip() == "step_0000006"

    outcome = train_loop(FakeRuntime(), lambda step: [], settings, validate=validate)
    assert outcome.status == "finished"
    assert calls == [3, 6, 9, 10]  # resumed from step 6: 7..10 re-run, validated at 9 and 10
    assert outcome.validation is not None and outcome.validation["student_loss"] == valid_at(10)

    # metrics.jsonl: every step once, as computed; validation in the records of steps 3, 6, 9, 10
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r["step"] for r in records if "valid" in r] == [3, 6, 9, 10]
    for r in records:
        assert r["loss"] == pytest.approx(loss_at(r["step"] - 1))

    # best: the lowest validation loss was at step 6; its folder survives keep_last=1 pruning
    best = json.loads((root / "best.json").read_text())
    assert best["step"] == 6 and best["value"] == pytest.approx(valid_at(6))
    assert (root / "step_0000006" / "manifest.json").exists()
    assert (root / "latest").read_text().strip() == "step_0000010"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000006", "step_0000010"]

    # TensorBoard: each step once (the crashed attempt's step 7 purged), every quantity logged
    events = scalar_events(out)
    expected_tags = {
        "loss/total",
        "loss/glmd/kl",
        "loss/lm/ce",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/skipped",
        "train/skipped_steps",
        "memory/peak_gib",
        "valid/student_loss",
        "valid/student_ppl",
        "valid/teacher_loss",
    }
    assert expected_tags <= set(events)
    assert [s for s, _ in events["loss/total"]] == list(range(1, 11))
    for step, value in events["loss/glmd/kl"]:
        assert value == pytest.approx(0.75 * loss_at(step - 1), rel=1e-6)
    assert [s for s, _ in events["valid/student_loss"]] == [3, 6, 9, 10]

    # W&B offline: one run id over both attempts; each step once in the union of their histories
    state = json.loads((out / "wandb" / "gkd_wandb.json").read_text())
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert runs and all(p.endswith(state["run_id"]) for p in runs)
    rows = wandb_history(out)
    steps = [row["_step"] for row in rows]
    assert sorted(steps) == list(range(1, 11)) and len(set(steps)) == 10
    by_step = {row["_step"]: row for row in rows}
    assert by_step[4]["loss/lm/ce"] == pytest.approx(0.25 * loss_at(3))
    assert [s for s in sorted(by_step) if "valid/student_loss" in by_step[s]] == [3, 6, 9, 10]


def test_missing_sink_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    from gkd_cli.errors import ConfigError
    from gkd_cli.observe import check_observability
    from parallel.sinks import MissingExtraError, TensorBoardSink

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'gkd\[tensorboard\]'"):
        TensorBoardSink(tmp_path).open(0, {})
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    cfg = SimpleNamespace(
        output=SimpleNamespace(log_to=["jsonl", "wandb"]),
        train=SimpleNamespace(eval_every=0, eval_batches=8, best_metric=None),
        data=SimpleNamespace(valid_files=[]),
    )
    with pytest.raises(ConfigError, match=r"pip install 'gkd\[wandb\]'"):
        check_observability(cfg)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("log_to", "train", "valid_files", "message"),
    [
        (["jsonl", "tensorbord"], {}, [], r"unknown sink 'tensorbord'.*tensorboard"),
        (["jsonl"], {"eval_every": 5}, [], r"eval_every=5 needs a validation set.*valid_files"),
        (["jsonl"], {"eval_every": -1}, ["v.txt"], r"eval_every=-1 must be >= 0"),
        (["jsonl"], {"best_metric": "valid/student_ppl"}, ["v.txt"], r"set train.eval_every"),
        (["jsonl"], {"eval_every": 5, "best_metric": "loss"}, ["v.txt"], r"not a validation"),
    ],
)
def test_observability_fields_are_checked_before_launch(log_to, train, valid_files, message):
    from gkd_cli.errors import ConfigError
    from gkd_cli.observe import check_observability

    cfg = SimpleNamespace(
        output=SimpleNamespace(log_to=log_to),
        train=SimpleNamespace(**{"eval_every": 0, "eval_batches": 8, "best_metric": None, **train}),
        data=SimpleNamespace(valid_files=valid_files),
    )
    with pytest.raises(ConfigError, match=message):
        check_observability(cfg)  # type: ignore[arg-type]
