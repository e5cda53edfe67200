"""MethodPipeline: building from config, taps, weighted total and logged terms, stages, modules."""

from __future__ import annotations

import pytest
import torch

from methods.base import FeatureKind, LossContext, ModelInfo, Role, Stage, Tap
from methods.logit_common import STUDENT_LOGITS, TEACHER_LOGITS
from methods.pipeline import MethodPipeline, PipelineEntry
from tests.unit.test_methods_vocab_parallel import make_case, reference

pytestmark = pytest.mark.unit

VOCAB, PADDED, TOKENS = 29, 32, 10
INFO = ModelInfo(
    num_layers=2, hidden_size=8, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=32,
    vocab_size=VOCAB, padded_vocab_size=PADDED,
)  # fmt: skip


def _ctx(mask, labels, *, step=0, total_steps=100, stage=Stage.TASK):
    return LossContext(
        step=step, total_steps=total_steps, stage=stage, loss_mask=mask, labels=labels,
        vocab_start=0, vocab_size=VOCAB,
    )  # fmt: skip


def test_weighted_total_and_named_unweighted_terms():
    student, teacher, mask, labels = make_case(0, TOKENS, VOCAB, PADDED)
    pipeline = MethodPipeline.from_config(
        [
            {"name": "glmd", "weight": 1.0, "temperature": 15},
            {"name": "lm", "weight": {"type": "linear", "start": 0, "end": 0.1}},
        ],
        stage="pretrain",
    )
    leaf = student.clone().requires_grad_()
    ctx = _ctx(mask, labels, step=50, stage=Stage.PRETRAIN)
    total, terms = pipeline.compute({STUDENT_LOGITS: leaf, TEACHER_LOGITS: teacher}, ctx)
    kl, kl_grad = reference("forward_kl", student, teacher, mask, labels, VOCAB, 15.0)
    ce, ce_grad = reference("ce", student, teacher, mask, labels, VOCAB)
    assert set(terms) == {"glmd/kl", "lm/ce"}
    assert all(not term.requires_grad for term in terms.values())
    torch.testing.assert_close(terms["glmd/kl"], 225.0 * kl, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["lm/ce"], ce, rtol=1e-6, atol=0)
    torch.testing.assert_close(total, 225.0 * kl + 0.05 * ce, rtol=1e-6, atol=0)
    total.backward()
    torch.testing.assert_close(leaf.grad, 225.0 * kl_grad + 0.05 * ce_grad, rtol=1e-6, atol=1e-12)
    assert pipeline.weights(ctx) == {"glmd": 1.0, "lm": pytest.approx(0.05)}


def test_method_term_weights_multiply_the_method_weight():
    student, teacher, mask, labels = make_case(1, TOKENS, VOCAB, PADDED)
    pipeline = MethodPipeline.from_config(
        [{"name": "kd", "weight": 2.0, "temperature": 1.0, "hard_weight": 0.25}], stage="task"
    )
    total, terms = pipeline.compute(
        {STUDENT_LOGITS: student, TEACHER_LOGITS: teacher}, _ctx(mask, labels)
    )
    torch.testing.assert_close(total, 2.0 * terms["kd/soft"] + 0.5 * terms["kd/hard"])


def test_taps_are_the_union_of_the_methods_taps():
    pipeline = MethodPipeline.from_config(
        [{"name": "lm"}, {"name": "forward_kl"}, {"name": "reverse_kl"}], stage="task"
    )
    assert pipeline.taps(INFO, INFO) == [STUDENT_LOGITS, TEACHER_LOGITS]
    pretrain_pd = MethodPipeline.from_config([{"name": "pd"}], stage=Stage.PRETRAIN)
    assert pretrain_pd.taps(INFO, INFO) == [STUDENT_LOGITS]  # no teacher in PD's first stage


def test_building_for_a_stage_a_method_lacks_is_an_error():
    with pytest.raises(ValueError, match=r"'kd' applies to stage TS only.*'pretrain'"):
        MethodPipeline.from_config([{"name": "kd"}], stage="pretrain")
    with pytest.raises(ValueError, match="unknown stage 'finetune'"):
        MethodPipeline.from_config([{"name": "lm"}], stage="finetune")


def test_methods_of_another_stage_are_skipped_at_compute():
    student, teacher, mask, labels = make_case(2, TOKENS, VOCAB, PADDED)
    pipeline = MethodPipeline.from_config([{"name": "kd"}, {"name": "lm"}])  # no stage given
    total, terms = pipeline.compute(
        {STUDENT_LOGITS: student, TEACHER_LOGITS: teacher},
        _ctx(mask, labels, stage=Stage.PRETRAIN),
    )
    assert set(terms) == {"lm/ce"}
    torch.testing.assert_close(total, terms["lm/ce"])


def test_no_features_here_gives_a_zero_total():
    _, _, mask, labels = make_case(3, TOKENS, VOCAB, PADDED)
    pipeline = MethodPipeline.from_config([{"name": "glmd"}], stage="task")
    total, terms = pipeline.compute({}, _ctx(mask, labels))
    assert terms == {} and total.item() == 0.0 and not total.requires_grad


@pytest.mark.parametrize(
    "config, message",
    [
        ({"name": "lm"}, "methods: expected a list"),
        ([], "is empty"),
        ([{"weight": 1.0}], r"methods\.0\.name is required"),
        (
            [{"name": "lm"}, {"name": "glmdd"}],
            r"methods\.1 \(glmdd\): unknown .*did you mean 'glmd'",
        ),
        (
            [{"name": "glmd", "temp": 2}],
            r"methods\.0 \(glmd\): method 'glmd' has no parameter 'temp'",
        ),
        ([{"name": "lm", "weight": "high"}], r"methods\.0\.weight: expected a number"),
        ([{"name": "lm"}, {"name": "lm"}], "listed twice"),
    ],
)
def test_config_errors_name_the_entry(config, message):
    with pytest.raises(ValueError, match=message):
        MethodPipeline.from_config(config, stage="task")


class _Projected:
    """A stand-in for an intermediate-layer method that owns a projection."""

    name = "projected"
    stages = frozenset({Stage.TASK})

    def __init__(self):
        self.proj = torch.nn.Linear(4, 8)

    def taps(self, teacher, student):
        return (Tap(Role.STUDENT, FeatureKind.HIDDEN, layer=0),)

    def compute(self, features, ctx):
        hidden = features.get(Tap(Role.STUDENT, FeatureKind.HIDDEN, layer=0))
        return {} if hidden is None else {"norm": self.proj(hidden).pow(2).mean()}

    def modules(self):
        return {"proj": self.proj}


def test_modules_of_methods_that_have_them():
    method = _Projected()
    pipeline = MethodPipeline([PipelineEntry("projected", method, 0.5)], stage="task")
    modules = pipeline.modules()
    assert list(modules.keys()) == ["projected"]
    assert modules["projected"]["proj"] is method.proj
    _, _, mask, labels = make_case(4, TOKENS, VOCAB, PADDED)
    hidden = torch.randn(3, 4)
    total, terms = pipeline.compute(
        {Tap(Role.STUDENT, FeatureKind.HIDDEN, layer=0): hidden}, _ctx(mask, labels)
    )
    torch.testing.assert_close(total, 0.5 * terms["projected/norm"])
    total.backward()
    assert method.proj.weight.grad is not None
