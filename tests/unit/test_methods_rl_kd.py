"""RL-KD (Yuan et al. 2021) as GLMKD implements it (distill/multi_teacher_model.py, RL_KD), against
references written from GLMKD's code and the paper's policy gradient, not from gkd:

* step t: actions a ~ Bernoulli(pi(s)); the loss is alpha x mean_(j,k) a_jk L_jk + (1 - alpha) x
  CE; nothing trains the policy yet (no earlier selection);
* step t + 1: the reward of step t's actions is -the student's CE measured now (after the update),
  and the policy loss is ``-mean_j (r - b) sum_k log pi(a_jk | s_jk)`` with the policy's current
  weights, ``b`` the previous reward (the running mean's first value);
* the expected policy gradient, enumerated exactly over the actions of a one-sequence toy, is not
  zero when one teacher's guidance lowers the loss, and pi(that teacher) rises under training.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from methods.base import LossContext, Stage
from tests.unit.test_methods_multi_teacher import (
    STUDENT,
    TEACHERS,
    V_REAL,
    B,
    build,
    ce,
    check,
    data,
    features,
    logp,
    mean,
    pipeline,
    soft_ce,
)

pytestmark = pytest.mark.unit

STEP, TOTAL = 8, 10  # after the warm-up (10% of training)


def reference_state(d: dict, k: int) -> torch.Tensor:
    """Teacher ``k``'s ``[B, h_k + 3]`` state, written out: per sequence (column ``j`` of the
    s-major tokens), its hidden states averaged over the masked positions, then its mean CE on the
    labels, mean largest probability and mean entropy / log V over the same positions."""
    hidden = d["teacher_hidden"][k]  # [S, B, h]
    b = hidden.shape[1]
    mask = d["mask"].view(-1, b)  # [S, B]
    pooled = (hidden * mask[..., None]).sum(0) / mask.sum(0)[:, None]
    p = logp(d["teachers"][k]).exp()
    per_token = torch.stack(
        [
            ce(d["teachers"][k], d["labels"]),
            p.max(-1).values,
            -(p * p.log()).sum(-1) / math.log(V_REAL),
        ]
    )  # [3, N]
    scalars = (per_token.view(3, -1, b) * mask).sum(1) / mask.sum(0)  # [3, B]
    return torch.cat([pooled, scalars.T], dim=1)


def reference_pi(policies: dict, state: torch.Tensor, k: int) -> torch.Tensor:
    linear = policies[f"policy_t{k}"]
    return torch.sigmoid(state @ linear.weight.detach().T.double() + linear.bias.detach().double())


def test_two_consecutive_steps_match_glmkds_selection_and_delayed_reward():
    method = build("rl_kd")
    pipe = pipeline(method)
    policies = method.modules()
    gen = torch.Generator().manual_seed(0)
    for module in policies.values():
        torch.nn.init.normal_(module.weight, std=0.3, generator=gen)
    actions = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # [K, B]
    method.rule.sample = lambda probs, ctx, ids: actions.to(probs.dtype)
    first, second = data(21), data(22)  # two microbatches, one per step

    # Step t: the selected teachers teach, weighted 1/K each; no policy loss yet.
    student = first["student"].clone().requires_grad_(True)
    total, terms = pipe.compute(features(first, student), _ctx(first, STEP))
    total.backward()
    s = first["student"].clone().requires_grad_(True)
    tokens = [actions[k].repeat(len(first["mask"]) // B) for k in range(2)]  # s-major: n % B
    soft = sum(
        mean(tokens[k] * soft_ce(s, t, 10.0), first["mask"])
        for k, t in enumerate(first["teachers"])
    ) / len(TEACHERS)  # GLMKD l. 403-404: mean over (sequence, teacher) of a_jk L_jk
    check(total, student.grad, 0.5 * soft + 0.5 * mean(ce(s, first["labels"]), first["mask"]), s)
    assert float(terms["rl_kd/policy"]) == 0.0
    assert math.isclose(float(terms["rl_kd/selected"]), 0.5)
    reward_t = -float(mean(ce(first["student"], first["labels"]), first["mask"]))

    # The policy moves between the steps (as the optimizer would): step t + 1 must use the new
    # weights on step t's states (GLMKD l. 409-413).
    with torch.no_grad():
        for module in policies.values():
            module.weight.add_(0.05)
            module.bias.sub_(0.1)

    # Step t + 1: reward = -the student's CE now; baseline = the slot's previous reward.
    student = second["student"].clone().requires_grad_(True)
    total, terms = pipe.compute(features(second, student), _ctx(second, STEP + 1))
    total.backward()
    reward = -float(mean(ce(second["student"], second["labels"]), second["mask"]))
    assert math.isclose(float(terms["rl_kd/reward"]), reward, rel_tol=1e-6)
    weights = [policies[f"policy_t{k}"].weight for k in range(2)]
    log_prob = 0.0
    for k in range(2):
        state = reference_state(first, k)
        linear = policies[f"policy_t{k}"]
        p = torch.sigmoid(state @ linear.weight.T + linear.bias).squeeze(1)
        log_prob = log_prob + actions[k] * p.log() + (1 - actions[k]) * (1 - p).log()
    reference_policy = -((reward - reward_t) * log_prob).mean()
    assert math.isclose(float(terms["rl_kd/policy"]), float(reference_policy), rel_tol=1e-5)
    expected = torch.autograd.grad(reference_policy, weights)
    for weight, grad in zip(weights, expected, strict=True):
        assert torch.allclose(weight.grad, grad, rtol=1e-5, atol=1e-9)


def test_the_warm_up_trains_no_policy_on_actions_it_did_not_apply():
    method = build("rl_kd")
    pipe = pipeline(method)
    first_rl = math.ceil(0.1 * 100)  # warmup 0.1 of 100 steps
    for step in (first_rl - 2, first_rl - 1, first_rl):
        d = data(30 + step)
        total, terms = pipe.compute(features(d, d["student"]), _ctx(d, step, total=100))
        assert float(terms["rl_kd/policy"]) == 0.0, step  # nothing applied one step earlier
        if step < first_rl:  # every teacher, 1/K each
            average = sum(mean(soft_ce(d["student"], t, 10.0), d["mask"]) for t in d["teachers"])
            assert math.isclose(float(terms["rl_kd/soft"]), float(average) / 2, rel_tol=1e-9)
            assert float(terms["rl_kd/selected"]) == 1.0
            assert not method.rule.pending
    d = data(99)
    _, terms = pipe.compute(features(d, d["student"]), _ctx(d, first_rl + 1, total=100))
    assert float(terms["rl_kd/policy"]) != 0.0  # the first selection is rewarded


def test_draws_follow_each_sequences_tokens_not_its_place_in_the_batch():
    method = build("rl_kd").rule
    d = data(5)
    probs = torch.full((2, B), 0.5, dtype=torch.float64)
    ctx = _ctx(d, STEP)
    ids = torch.arange(len(d["labels"])) % B
    drawn = method.sample(probs, ctx, ids)
    # The same sequences in reversed order (another layout's microbatch) draw the same actions.
    order = torch.arange(B - 1, -1, -1)
    permuted = dict(d, labels=d["labels"].view(-1, B)[:, order].reshape(-1))
    again = method.sample(probs, _ctx(permuted, STEP), ids)
    assert torch.equal(again, drawn[:, order])
    many = torch.stack([method.sample(probs, _ctx(d, t), ids) for t in range(200)])
    assert 0.4 < float(many.mean()) < 0.6  # Bernoulli(1/2), fresh draws each step


# -- the toy: teacher A is the labels, teacher B is noise ---------------------------------------

TOY_S, TOY_PEAK, TOY_LR = 6, 5.0, 2.0


def _toy(seed: int = 3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V_REAL, (TOY_S,), generator=gen)
    wrong = (labels + torch.randint(1, V_REAL, (TOY_S,), generator=gen)) % V_REAL
    teacher_a, teacher_b = (
        torch.full((TOY_S, 12), 0.0, dtype=torch.float64).scatter_(1, peak.view(-1, 1), TOY_PEAK)
        for peak in (labels, wrong)
    )  # soft labels at T=10 that peak on the label (A) or on a wrong token (B)
    return {
        "student": torch.zeros(TOY_S, 12, dtype=torch.float64),
        "teachers": [teacher_a, teacher_b],
        "labels": labels,
        "mask": torch.ones(TOY_S, dtype=torch.float64),
        "teacher_hidden": [torch.zeros(TOY_S, 1, w, dtype=torch.float64) for w in (6, 7)],
        "student_hidden": torch.zeros(TOY_S, 1, 5, dtype=torch.float64),
    }


def _ctx(d: dict, step: int, total: int = TOTAL) -> LossContext:
    return LossContext(
        step=step, total_steps=total, stage=Stage.PRETRAIN, loss_mask=d["mask"],
        labels=d["labels"], vocab_start=0, vocab_size=V_REAL, teacher=TEACHERS[0], student=STUDENT,
    )  # fmt: skip


def _toy_step(pipe, d: dict, student: torch.Tensor, step: int) -> torch.Tensor:
    """One training step of the toy: the loss's gradient moves the student's logits (SGD);
    returns them after the update."""
    student = student.clone().requires_grad_(True)
    total, _ = pipe.compute(features(d, student), _ctx(d, step, total=10_000))
    total.backward()
    return (student - TOY_LR * student.grad).detach()


def test_expected_policy_gradient_favours_the_teacher_that_lowers_the_loss():
    """Exact expectation over the four actions of a one-sequence, two-teacher toy (the student
    learns from the soft terms only): sum_a pi(a) grad L_policy(a) raises pi(A) and lowers pi(B).
    The old design (reward from the same forward, before the update) gives exactly zero here."""
    d = _toy()
    grads = {"policy_t0": 0.0, "policy_t1": 0.0}
    for a in itertools.product((0.0, 1.0), repeat=2):
        method = build(
            "rl_kd",
            {"hard_weight": 0.0, "soft_weight": 1.0, "baseline_decay": None, "temperature": 1.0},
        )
        pipe = pipeline(method)
        actions = torch.tensor(a, dtype=torch.float64).view(2, 1)
        method.rule.sample = lambda probs, ctx, ids, actions=actions: actions.to(probs.dtype)
        student = _toy_step(pipe, d, d["student"], 5_000)  # step t: the selection is applied
        for module in method.modules().values():
            module.zero_grad()
        total, _ = pipe.compute(features(d, student), _ctx(d, 5_001, total=10_000))
        total.backward()  # only the policy loss reaches the policy
        for name in grads:
            grads[name] = grads[name] + 0.25 * method.modules()[name].bias.grad  # pi = 1/2 each
    # Gradient descent on the policy loss: bias_A goes up (pi(A) rises), bias_B down.
    assert float(grads["policy_t0"]) < -1e-3, grads
    assert float(grads["policy_t1"]) > 1e-3, grads


def test_pi_of_the_helpful_teacher_rises_under_training():
    d = _toy()
    method = build("rl_kd", {"hard_weight": 0.0, "soft_weight": 1.0, "temperature": 1.0})
    pipe = pipeline(method)
    policies = method.modules()
    optimizer = torch.optim.Adam([p for m in policies.values() for p in m.parameters()], lr=0.05)
    student = d["student"]
    for step in range(1_000, 1_060):  # after the warm-up of a 10 000-step run
        optimizer.zero_grad()
        student = _toy_step(pipe, d, student, step)
        optimizer.step()
    # pi(A) rises from 0.5 (pi(B)'s direction is the exact test above: once the student has learnt
    # A's labels, B's harm is small against the sampling noise and pi(B) wanders).
    pi_a = float(reference_pi(policies, reference_state(d, 0), 0).mean())
    assert pi_a > 0.8, pi_a


def test_a_run_resumed_at_another_layout_drops_the_selection_with_a_note(caplog):
    method = build("rl_kd")  # another layout: the kept selections are not restored
    pipe = pipeline(method)
    d = data(40)
    with caplog.at_level("INFO", logger="methods.multi_teacher"):
        total, terms = pipe.compute(features(d, d["student"]), _ctx(d, STEP))
    assert torch.isfinite(total) and float(terms["rl_kd/policy"]) == 0.0
    assert "restored at the same layout only" in caplog.text
    d = data(41)
    _, terms = pipe.compute(features(d, d["student"]), _ctx(d, STEP + 1))
    assert float(terms["rl_kd/policy"]) != 0.0  # trained again from the next step


def test_runtime_state_round_trips_the_kept_selection():
    """What the checkpoint carries (``runtime_state``) restores the kept selection in a fresh
    method: its next step trains the policy exactly as the method that made the selection."""
    method = build("rl_kd")
    pipe = pipeline(method)
    d = data(40)
    pipe.compute(features(d, d["student"]), _ctx(d, STEP))
    state = method.runtime_state()
    fresh = build("rl_kd")
    fresh_pipe = pipeline(fresh)
    policies = zip(fresh.rule._policies.values(), method.rule._policies.values(), strict=True)
    for policy, source in policies:
        policy.load_state_dict(source.state_dict())
    fresh.load_runtime_state(state)
    d = data(41)
    _, ours = pipe.compute(features(d, d["student"]), _ctx(d, STEP + 1))
    _, theirs = fresh_pipe.compute(features(d, d["student"]), _ctx(d, STEP + 1))
    assert float(ours["rl_kd/policy"]) != 0.0
    assert float(theirs["rl_kd/policy"]) == float(ours["rl_kd/policy"])
