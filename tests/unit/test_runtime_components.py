"""The runtime's components one by one (parallel/components.py, parallel/forward_hooks.py): the
checks and plan made before any model exists, the forward handles, the scheduler. The assembled
runtime is tested on gloo ranks (tests/dist/test_runtime_*.py)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from methods.base import FeatureKind, ForwardHandles, Role, Tap
from parallel.components import (
    build_scheduler,
    microbatches_per_step,
    plan_methods,
    resolve_precision,
)
from parallel.config import ModelArch, TrainConfig
from parallel.forward_hooks import RuntimeHandles, install_forward_modifiers
from parallel.stage import StepState

pytestmark = pytest.mark.unit

ARCH = ModelArch(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=300)


def _ctx(*, tp=1, pp=1, dp=1, sequence_parallel=False):
    return SimpleNamespace(tp=tp, pp=pp, dp=dp, sequence_parallel=sequence_parallel)


def test_precision_auto_is_fp32_on_cpu_and_explicit_settings_are_kept():
    if not torch.cuda.is_available():
        assert resolve_precision("auto").params_dtype is torch.float32
    assert resolve_precision("bf16").params_dtype is torch.bfloat16
    assert resolve_precision("fp32").name == "fp32"


def test_microbatches_per_step_divides_the_global_batch_over_dp():
    train = TrainConfig(global_batch_size=8, micro_batch_size=2)
    assert microbatches_per_step(train, 16, _ctx(dp=2)) == 2
    with pytest.raises(ValueError, match="not divisible by"):
        microbatches_per_step(train, 16, _ctx(dp=3))
    with pytest.raises(ValueError, match="multiple of 2"):
        microbatches_per_step(train, 15, _ctx(tp=2, sequence_parallel=True))


@dataclass
class _Entry:
    name: str
    method: object


class _Method:
    name = "fake"

    def __init__(self, taps, single_stage=False):
        self._taps = taps
        self.requires_single_stage = single_stage
        self.installed = None

    def taps(self, teacher, student):
        return self._taps


class _Pipeline:
    def __init__(self, *methods):
        self.entries = [_Entry(f"m{i}", m) for i, m in enumerate(methods)]
        self.seen = None

    def taps(self, teacher, student):
        self.seen = (teacher, student)
        return [t for e in self.entries for t in e.method.taps(teacher, student)]

    def compute(self, features, ctx):
        return None, {}


def test_plan_collects_taps_and_model_infos_and_checks_the_layout():
    logits = Tap(Role.STUDENT, FeatureKind.LOGITS)
    probs = Tap(Role.TEACHER, FeatureKind.ATTENTION_PROBS, layer=1)
    pipeline = _Pipeline(_Method([logits]), _Method([probs]))
    plan = plan_methods(pipeline, student=ARCH, teachers=[ARCH], tp=2, pp=1, recompute="none")
    assert plan.taps == [logits, probs] and plan.needs_attention
    assert plan.student_info.padded_vocab_size % 2 == 0 and len(plan.teacher_infos) == 1
    assert pipeline.seen == (plan.teacher_infos[0], plan.student_info)
    assert [e.name for e in plan.entries] == ["m0", "m1"]

    no_attention = plan_methods(
        _Pipeline(_Method([logits])), student=ARCH, teachers=[], tp=1, pp=1, recompute="none"
    )
    assert not no_attention.needs_attention and no_attention.teacher_infos == []

    class Built(_Method):  # a method arrives built from its BuildContext: never changed after
        def set_teachers(self, teachers):
            raise AssertionError("the runtime must not change a built method")

        def set_stage(self, stage):
            raise AssertionError("the runtime must not change a built method")

    plan_methods(
        _Pipeline(Built([])), student=ARCH, teachers=[ARCH, ARCH], tp=1, pp=1, recompute="none"
    )

    with pytest.raises(ValueError, match="parallel.pp=1"):
        plan_methods(
            _Pipeline(_Method([logits], single_stage=True)),
            student=ARCH, teachers=[ARCH], tp=1, pp=2, recompute="none",
        )  # fmt: skip


class _Layer(torch.nn.Module):
    def __init__(self, number: int) -> None:
        super().__init__()
        self.layer_number = number


def _model(first: int, count: int) -> torch.nn.Module:
    model = torch.nn.Module()
    model.decoder = torch.nn.Module()
    model.decoder.layers = torch.nn.ModuleList(_Layer(first + i + 1) for i in range(count))
    return model


def _stage():
    stage = torch.nn.Module()
    stage.module = _model(2, 2)  # the second of two pipeline stages: global layers 2 and 3
    stage.teachers = [_model(4, 4)]
    stage.microbatch_index = 3
    stage.batch_multiplier = 1
    stage.embedding_epsilon = 0.0
    return stage


def test_handles_implement_the_protocol_over_the_stage_and_the_step_state():
    stage, state = _stage(), StepState(total_steps=50)
    handles: ForwardHandles = RuntimeHandles(stage, state, seed=9)
    members = [n for n in vars(ForwardHandles) if not n.startswith("_")]
    members += list(ForwardHandles.__annotations__)
    assert all(hasattr(handles, n) for n in members)
    assert sorted(handles.student_layers) == [2, 3]
    assert sorted(handles.teacher_layers[0]) == [4, 5, 6, 7]
    assert handles.seed == 9 and handles.microbatch() == 3
    assert handles.step() == (0, 50)
    state.step = 7  # the runtime advances the shared state; the handles read it
    assert handles.step() == (7, 50)
    stage.eval()
    assert not handles.is_training()
    handles.double_batch()
    handles.perturb_embeddings(0.25)
    assert stage.batch_multiplier == 2 and stage.embedding_epsilon == 0.25
    with pytest.raises(ValueError, match="must be > 0"):
        handles.perturb_embeddings(0.0)


class _Modifier(_Method):
    def install(self, handles):
        self.installed = handles


def test_forward_modifiers_are_installed_and_refused_under_sequence_parallelism():
    plain, modifier = _Method([]), _Modifier([])
    entries = [_Entry("plain", plain), _Entry("mod", modifier)]
    handles = RuntimeHandles(_stage(), StepState(total_steps=1), seed=0)
    install_forward_modifiers(entries, handles, sequence_parallel=False)
    assert modifier.installed is handles and plain.installed is None
    with pytest.raises(ValueError, match="'mod' changes the forward pass"):
        install_forward_modifiers(entries, handles, sequence_parallel=True)


def test_scheduler_warms_up_then_decays_to_min_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    train = TrainConfig(steps=10, lr=1.0, min_lr=0.1, warmup_steps=2, decay="linear")
    scheduler = build_scheduler(optimizer, train)
    lrs = []
    for _ in range(train.steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and lrs[3] < lrs[2]
