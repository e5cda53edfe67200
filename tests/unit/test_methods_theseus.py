"""BERT-of-Theseus (Xu et al. 2020, sec. 3) with a teacher that differs from the student: other
weights, twice the depth. The paper's hybrid model, written out with plain torch blocks: student
module ``i`` (successor) runs with probability ``p``, else the teacher's block group ``i``
(predecessor: teacher layers ``2i`` and ``2i + 1``) runs on the same input in its place,
``y_i = r_i scc_i(y_{i-1}) + (1 - r_i) prd_i(y_{i-1})``, ``r_i ~ Bernoulli(p)`` (eqs. 4-5).
``methods.forward_methods.Theseus`` installs forward hooks on the student's layers; for every
fixed draw the hooked student must compute that hybrid (value and gradients), the replaced
student layers get no gradient, the frozen teacher passes gradients to the input."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from methods.base import ModelInfo
from methods.forward_methods import Theseus, TheseusParams

pytestmark = pytest.mark.unit

H, S, BATCH, STUDENT_LAYERS, FACTOR = 8, 5, 3, 2, 2


class Block(torch.nn.Module):
    """A pre-norm residual MLP block called like megatron's layers: ``hidden_states`` ``[s, b, h]``
    and other keyword arguments in, a tuple whose first element is the output."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(H)
        self.up = torch.nn.Linear(H, 2 * H)
        self.down = torch.nn.Linear(2 * H, H)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, scale: float = 1.0):
        out = hidden_states + scale * self.down(
            torch.nn.functional.gelu(self.up(self.norm(hidden_states)))
        )
        return out, None


def info(layers: int) -> ModelInfo:
    return ModelInfo(
        num_layers=layers, hidden_size=H, num_attention_heads=2, num_query_groups=2,
        ffn_hidden_size=2 * H, vocab_size=11, padded_vocab_size=12,
    )  # fmt: skip


class Handles:
    """The runtime's ForwardHandles, reduced to what Theseus uses."""

    def __init__(self, student: dict, teacher: dict, step: int = 3, total: int = 10) -> None:
        self.student_layers, self.teacher_layers = student, [teacher]
        self.seed, self.training, self._step = 5, True, (step, total)

    def step(self) -> tuple[int, int]:
        return self._step

    def microbatch(self) -> int:
        return 0

    def is_training(self) -> bool:
        return self.training


def models(seed: int = 0):
    torch.manual_seed(seed)
    student = {i: Block().double() for i in range(STUDENT_LAYERS)}
    teacher = {i: Block().double() for i in range(STUDENT_LAYERS * FACTOR)}  # other weights
    for block in teacher.values():
        block.requires_grad_(False)
    return student, teacher


def install(student: dict, teacher: dict, **params) -> tuple[Theseus, Handles]:
    method = Theseus(TheseusParams(**params))
    method.taps(info(STUDENT_LAYERS * FACTOR), info(STUDENT_LAYERS))
    handles = Handles(student, teacher)
    method.install(handles)
    return method, handles


def hooked_forward(student: dict, x: torch.Tensor, positional: bool = False) -> torch.Tensor:
    h = x
    for i in range(STUDENT_LAYERS):  # as the runtime's GPT calls its layers
        h = (
            student[i](h, attention_mask=None, scale=0.5)[0]
            if positional
            else student[i](hidden_states=h, attention_mask=None, scale=0.5)[0]
        )
    return h


def hybrid(student: dict, teacher: dict, x: torch.Tensor, use: list[bool]) -> torch.Tensor:
    """The paper's hybrid written out (hook-free copies of the blocks)."""
    h = x
    for i, successor in enumerate(use):
        if successor:
            h = student[i](hidden_states=h, scale=0.5)[0]
        else:
            for t in range(i * FACTOR, (i + 1) * FACTOR):
                h = teacher[t](hidden_states=h, scale=0.5)[0]
    return h


@pytest.mark.parametrize("positional", [False, True])
def test_every_draw_computes_the_papers_hybrid_with_a_deeper_different_teacher(positional):
    for use in itertools.product((True, False), repeat=STUDENT_LAYERS):
        student, teacher = models()
        ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
        method, _ = install(student, teacher)
        method.use_student = lambda step, total, use=use: list(use)
        x = torch.randn(
            S, BATCH, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        x_ref = x.clone().requires_grad_(True)
        x = x.requires_grad_(True)
        out = hooked_forward(student, x, positional)
        expected = hybrid(ref_student, ref_teacher, x_ref, list(use))
        assert torch.allclose(out, expected, rtol=0, atol=1e-12), use
        weights = torch.randn(
            S, BATCH, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
        )
        (out * weights).sum().backward()
        (expected * weights).sum().backward()
        assert torch.allclose(x.grad, x_ref.grad, atol=1e-12), use  # through the frozen blocks
        for i, successor in enumerate(use):
            for p, p_ref in zip(student[i].parameters(), ref_student[i].parameters(), strict=True):
                if successor:
                    assert torch.allclose(p.grad, p_ref.grad, atol=1e-12), (use, i)
                else:  # replaced: its output is discarded
                    assert p.grad is None or float(p.grad.abs().max()) == 0.0, (use, i)
        assert all(p.grad is None for block in teacher.values() for p in block.parameters())
        if not all(use):  # the teacher does change the output
            assert not torch.allclose(
                out, hybrid(ref_student, ref_teacher, x_ref, [True] * STUDENT_LAYERS)
            )


def test_the_draws_follow_the_replacement_rate_and_evaluation_runs_the_student_alone():
    student, teacher = models()
    method, handles = install(student, teacher, replace_rate=0.5)
    draws = torch.tensor(
        [method.use_student(step, 100) for step in range(400)], dtype=torch.float64
    )
    assert 0.42 < float(draws.mean()) < 0.58  # r_i ~ Bernoulli(p)
    assert draws[:, 0].tolist() != draws[:, 1].tolist()  # one draw per module
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    handles.training = False
    method.use_student = lambda step, total: [False] * STUDENT_LAYERS
    x = torch.randn(S, BATCH, H, dtype=torch.float64)
    assert torch.equal(
        hooked_forward(student, x), hybrid(ref_student, ref_teacher, x, [True, True])
    )
    for rate, expected in ((1.0, [True, True]), (0.0, [False, False])):
        fixed, _ = install(*models(), replace_rate=rate)
        assert all(fixed.use_student(step, 10) == expected for step in range(10))
