"""Multi-teacher combiners against direct references (gathered vocabulary, fp64, plain torch):
value and gradient, one process and at TP=2 (vocabulary split over two gloo ranks)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from methods.base import BuildContext, FeatureKind, LossContext, ModelInfo, Role, Stage, Tap
from methods.multi_teacher import (
    Combiner,
    Uncertainty,
    UncertaintyParams,
    token_stats,
    uncertainty_weights,
)
from methods.pipeline import MethodPipeline, PipelineEntry
from methods.registry import REGISTRY, build_method, parse_params
from tests.distributed import run_on_ranks

pytestmark = pytest.mark.unit

S, B, V_COLS, V_REAL, H = 4, 3, 12, 11, 5
N = S * B
TEACHER_WIDTHS = (6, 7)


def info(hidden: int, layers: int = 4) -> ModelInfo:
    return ModelInfo(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=1,
        num_query_groups=1,
        ffn_hidden_size=4 * hidden,
        vocab_size=V_REAL,
        padded_vocab_size=V_COLS,
        # a GPT without biases and norms: attention, a 4h MLP, input and output embeddings
        num_parameters=layers * (4 * hidden * hidden + 2 * hidden * 4 * hidden)
        + 2 * V_COLS * hidden,
    )


STUDENT = info(H, 2)
TEACHERS = [info(TEACHER_WIDTHS[0], 4), info(TEACHER_WIDTHS[1], 2)]  # teacher 1 is the smaller


BUILD = BuildContext(
    stage=Stage.TASK,
    teachers=tuple(TEACHERS),
    student=STUDENT,
    build_inner=lambda entry: build_method(
        entry["name"], {k: v for k, v in entry.items() if k != "name"}
    ),
)
"""What a run's builder hands the combiners: both teachers, the student, a factory for the inner
method."""


def build(name: str, params: dict | None = None) -> Combiner:
    """Combiner ``name`` built from config parameters as a run builds it (``from_context``)."""
    return REGISTRY[name].cls.from_context(parse_params(name, params or {}), BUILD)


def data(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    d = {
        "student": torch.randn(N, V_COLS, generator=gen, dtype=torch.float64) * 2,
        "teachers": [
            torch.randn(N, V_COLS, generator=gen, dtype=torch.float64) * 2 for _ in TEACHERS
        ],
        "labels": torch.randint(0, V_REAL, (N,), generator=gen),
        "mask": (torch.rand(N, generator=gen) > 0.2).double(),
        "student_hidden": torch.randn(S, B, H, generator=gen, dtype=torch.float64),
        "teacher_hidden": [
            torch.randn(S, B, w, generator=gen, dtype=torch.float64) for w in TEACHER_WIDTHS
        ],
    }
    d["mask"][0] = 1.0
    return d


def features(d: dict, student: torch.Tensor, cols: slice = slice(None)) -> dict:
    out = {
        Tap(Role.STUDENT, FeatureKind.LOGITS): student,
        Tap(Role.STUDENT, FeatureKind.FINAL_NORM): d["student_hidden"],
    }
    for k, (logits, hidden) in enumerate(zip(d["teachers"], d["teacher_hidden"], strict=True)):
        out[Tap(Role.TEACHER, FeatureKind.LOGITS, teacher_index=k)] = logits[:, cols]
        out[Tap(Role.TEACHER, FeatureKind.FINAL_NORM, teacher_index=k)] = hidden
    return out


def context(
    d: dict, step: int = 5, total: int = 10, vocab_start: int = 0, tp_group=None
) -> LossContext:
    return LossContext(
        step=step,
        total_steps=total,
        stage=Stage.PRETRAIN,
        loss_mask=d["mask"],
        labels=d["labels"],
        vocab_start=vocab_start,
        vocab_size=V_REAL,
        tp_group=tp_group,
        teacher=TEACHERS[0],
        student=STUDENT,
    )


def pipeline(method) -> MethodPipeline:
    method.taps(TEACHERS[0], STUDENT)
    if hasattr(method, "modules"):
        for module in method.modules().values():
            module.double()
    return MethodPipeline([PipelineEntry(name=method.name, method=method)])


# ---------------------------------------------------------------------------------------------- references


def logp(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(x[:, :V_REAL] / temperature, dim=-1)


def kl(s, t, temperature):
    lt, ls = logp(t, temperature), logp(s, temperature)
    return (lt.exp() * (lt - ls)).sum(-1)


def soft_ce(s, t, temperature):
    return -(logp(t, temperature).exp() * logp(s, temperature)).sum(-1)


def mse(s, t):
    return ((s - t)[:, :V_REAL] ** 2).mean(-1)


def ce(x, labels):
    return -logp(x).gather(1, labels.view(-1, 1)).squeeze(1)


def mean(x, mask):
    return (x * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------------------------- tests


def run_and_grad(method, d):
    student = d["student"].clone().requires_grad_(True)
    pipe = pipeline(method)
    total, terms = pipe.compute(features(d, student), context(d))
    total.backward()
    return total, terms, student.grad


def check(total, grad, reference_total, student):
    (ref_grad,) = torch.autograd.grad(reference_total, student)
    assert torch.allclose(total, reference_total, rtol=1e-9, atol=1e-12), (
        float(total),
        float(reference_total),
    )
    assert torch.allclose(grad, ref_grad, rtol=1e-7, atol=1e-10)


def test_tmkd_is_the_average_of_the_teachers_logit_mse_plus_hard():
    d = data(1)
    total, terms, grad = run_and_grad(build("tmkd"), d)
    s = d["student"].clone().requires_grad_(True)
    soft = [mean(mse(s, t), d["mask"]) for t in d["teachers"]]
    hard = mean(ce(s, d["labels"]), d["mask"])
    check(total, grad, sum(soft) / 2 + hard, s)
    assert math.isclose(float(terms["tmkd/t1.soft"]), float(soft[1].detach()), rel_tol=1e-9)
    assert set(terms) == {"tmkd/soft", "tmkd/t0.soft", "tmkd/t1.soft", "tmkd/hard"}


def test_tmkd_wraps_any_single_teacher_method():
    d = data(2)
    method = build("tmkd", {"method": {"name": "kd", "temperature": 3.0, "hard_weight": 0.0}})
    total, terms, grad = run_and_grad(method, d)
    s = d["student"].clone().requires_grad_(True)
    soft = [mean(soft_ce(s, t, 3.0), d["mask"]) for t in d["teachers"]]
    check(total, grad, sum(soft) / 2 + mean(ce(s, d["labels"]), d["mask"]), s)
    assert "tmkd/t0.soft" in terms


def test_mt_bert_weights_each_token_by_the_teachers_own_cross_entropy():
    d = data(3)
    method = build("mt_bert")
    total, terms, grad = run_and_grad(method, d)
    s = d["student"].clone().requires_grad_(True)
    reference = mean(ce(s, d["labels"]), d["mask"])
    for t in d["teachers"]:
        weight = 1.0 / (1.0 + ce(t, d["labels"]))
        reference = reference + (d["mask"] * weight * soft_ce(s, t, 1.0)).sum() / d["mask"].sum()
    projections = method.modules()
    hidden = 0.0
    mask = d["mask"].view(S, B, 1)
    for k, teacher_hidden in enumerate(d["teacher_hidden"]):
        proj = projections[f"proj_t{k}"]
        projected = d["student_hidden"] @ proj.weight.T + proj.bias
        hidden = hidden + ((projected - teacher_hidden) ** 2 * mask).sum() / (
            mask.sum() * teacher_hidden.shape[-1]
        )
    check(total, grad, reference + hidden.detach(), s)
    assert math.isclose(float(terms["mt_bert/hidden"]), float(hidden), rel_tol=1e-9)
    # The projections get the hidden loss's gradient.
    grads = torch.autograd.grad(hidden, [projections["proj_t1"].weight])
    assert torch.allclose(projections["proj_t1"].weight.grad, grads[0], rtol=1e-9, atol=1e-12)
    assert method.module_layers() == {"proj_t0": -1, "proj_t1": -1}


def test_uncertainty_interpolates_teachers_by_size_with_the_students_entropy():
    d = data(4)
    total, terms, grad = run_and_grad(Uncertainty.from_context(UncertaintyParams(), BUILD), d)
    s = d["student"].clone().requires_grad_(True)
    p = logp(d["student"]).exp()
    u = -(p * p.log()).sum(-1) / math.log(V_REAL)
    # teachers ordered by size: teacher 1 (2 layers, width 7) is smaller than teacher 0.
    small, large = d["teachers"][1], d["teachers"][0]
    reference = (d["mask"] * ((1 - u) * kl(s, small, 1.0) + u * kl(s, large, 1.0))).sum() / d[
        "mask"
    ].sum()
    check(total, grad, reference + mean(ce(s, d["labels"]), d["mask"]), s)


def test_uncertainty_weights_route_and_interpolate():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    weights = uncertainty_weights(u, 3, "weight")
    assert torch.allclose(weights.sum(0), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(weights[:, 1], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert torch.equal(
        uncertainty_weights(u, 3, "route")[:, 3], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    )


def test_dgkd_sums_the_surviving_teachers_drawn_by_step():
    d = data(5)
    method = build("dgkd")
    draws = [tuple(method.rule.kept(step, 2)) for step in range(200)]
    assert all(any(k) for k in draws)
    kept_rate = sum(sum(k) for k in draws) / (2 * len(draws))
    assert 0.65 < kept_rate < 0.85  # survival 0.75 (plus the keep-one rule)
    # reproducible on every rank
    assert draws == [tuple(method.rule.kept(step, 2)) for step in range(200)]
    step = next(i for i, k in enumerate(draws) if k == (True, False))
    student = d["student"].clone().requires_grad_(True)
    pipe = pipeline(build("dgkd"))
    total, terms = pipe.compute(features(d, student), context(d, step=step))
    total.backward()
    s = d["student"].clone().requires_grad_(True)
    # GLMKD's DGKD recipe: 0.5 x (sum of the kept teachers' soft CE at T=10) + 0.5 x hard CE
    reference = 0.5 * mean(soft_ce(s, d["teachers"][0], 10.0), d["mask"]) + 0.5 * mean(
        ce(s, d["labels"]), d["mask"]
    )
    check(total, student.grad, reference, s)
    assert "dgkd/t1.soft" not in terms


def test_rl_kd_uses_every_teacher_during_the_warm_start():
    d = data(7)
    method = build("rl_kd")
    pipe = pipeline(method)
    total, terms = pipe.compute(features(d, d["student"]), context(d, step=0, total=100))
    average = sum(mean(soft_ce(d["student"], t, 10.0), d["mask"]) for t in d["teachers"]) / 2
    assert math.isclose(float(terms["rl_kd/soft"]), float(average), rel_tol=1e-9)
    # the selection and delayed reward: tests/unit/test_methods_rl_kd.py
    assert float(terms["rl_kd/selected"]) == 1.0


def test_token_stats_match_a_gathered_reference():
    d = data(8)
    stats = token_stats(
        d["student"], vocab_start=0, vocab_size=V_REAL, tp_group=None, labels=d["labels"]
    )
    p = logp(d["student"]).exp()
    assert torch.allclose(stats.entropy, -(p * p.log()).sum(-1))
    assert torch.allclose(stats.cross_entropy, ce(d["student"], d["labels"]))
    assert torch.allclose(stats.max_prob, p.max(-1).values)


def test_combiners_refuse_nested_combiners_and_forward_modifiers():
    with pytest.raises(ValueError, match="nest no combiners"):
        build("tmkd", {"method": {"name": "dgkd"}})
    with pytest.raises(ValueError, match="changes the forward pass"):
        build("dgkd", {"method": "theseus"})
    with pytest.raises(ValueError, match="unknown distillation method"):
        build("mt_bert", {"method": {"name": "nope"}})


def test_combiners_build_their_inner_method_per_teacher_through_the_context():
    built = []

    def build_inner(entry):
        built.append(entry)
        return BUILD.build_inner(entry)

    ctx = dataclasses.replace(BUILD, build_inner=build_inner)
    method = REGISTRY["tmkd"].cls.from_context(
        parse_params("tmkd", {"method": {"name": "kd", "temperature": 2.0, "weight": 3.0}}), ctx
    )
    assert built == [{"name": "kd", "temperature": 2.0}] * len(TEACHERS)  # no 'weight'
    assert [m.name for m, _ in method.per_teacher_methods()] == ["kd", "kd"]
    assert method.methods[0] is not method.methods[1]


def test_a_combiner_without_teachers_checks_its_method_and_refuses_taps():
    no_teachers = dataclasses.replace(BUILD, teachers=())
    method = REGISTRY["dgkd"].cls.from_context(parse_params("dgkd", {"method": "kd"}), no_teachers)
    with pytest.raises(ValueError, match="combines teachers, but the run has none"):
        method.taps(TEACHERS[0], STUDENT)
    with pytest.raises(ValueError, match="nest no combiners"):
        REGISTRY["dgkd"].cls.from_context(parse_params("dgkd", {"method": "tmkd"}), no_teachers)


def test_an_inner_method_of_another_stage_is_refused():
    pretrain = dataclasses.replace(BUILD, stage=Stage.PRETRAIN)
    with pytest.raises(ValueError, match="'kd' does not apply to stage 'pretrain'"):
        REGISTRY["tmkd"].cls.from_context(parse_params("tmkd", {"method": "kd"}), pretrain)


def test_multi_teacher_does_not_import_the_registry():
    import ast
    import inspect

    import methods.multi_teacher as mt

    tree = ast.parse(inspect.getsource(mt))
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "methods.registry" not in imported and "methods.pipeline" not in imported


# ---------------------------------------------------------------------------------------------- TP=2


def _reinit(method) -> None:
    for module in method.modules().values() if hasattr(method, "modules") else []:
        torch.manual_seed(3)
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.2)


def _tp_rank(cases: list[tuple[str, dict]]) -> list[tuple[float, torch.Tensor]]:
    import torch.distributed as dist

    rank = dist.get_rank()
    d = data(11)
    half = V_COLS // 2
    cols = slice(rank * half, (rank + 1) * half)
    out = []
    for name, params in cases:
        method = build(name, params)
        pipe = pipeline(method)
        _reinit(method)
        student = d["student"][:, cols].clone().requires_grad_(True)
        ctx = context(d, vocab_start=rank * half, tp_group=dist.group.WORLD)
        total, _ = pipe.compute(features(d, student, cols), ctx)
        total.backward()
        out.append((float(total), student.grad))
    return out


TP_CASES = [
    ("tmkd", {}),
    ("mt_bert", {}),
    ("uncertainty", {"mode": "route"}),
    ("uncertainty", {}),
    ("rl_kd", {}),
    ("dgkd", {}),
]


@pytest.fixture(scope="module")
def tp2_results():
    return run_on_ranks(_tp_rank, 2, TP_CASES)


@pytest.mark.parametrize("case", range(len(TP_CASES)), ids=[f"{n}{p}" for n, p in TP_CASES])
def test_tp2_equals_one_process(tp2_results, case):
    name, params = TP_CASES[case]
    d = data(11)
    method = build(name, params)
    pipe = pipeline(method)
    _reinit(method)
    student = d["student"].clone().requires_grad_(True)
    total, _ = pipe.compute(features(d, student), context(d))
    total.backward()
    ranks = [r[case] for r in tp2_results]
    assert math.isclose(ranks[0][0], float(total), rel_tol=1e-9) and ranks[0][0] == ranks[1][0]
    assert torch.allclose(
        torch.cat([ranks[0][1], ranks[1][1]], dim=1), student.grad, rtol=1e-8, atol=1e-12
    )
