"""Option scores under vocabulary-sharded logits (methods.choices): at TP=2 both ranks get the
scores of the full log-softmax, and each rank's logit gradient is its slice of the full one."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_on_ranks

pytestmark = pytest.mark.dist

VOCAB, PADDED, TOKENS = 11, 12, 7  # one padding column in the last shard


def _case():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(TOKENS, PADDED, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    return logits, labels


def _on_rank():
    from methods.choices import ChoiceBatch, label_logprobs, scores_from_token_logprobs

    rank, world = dist.get_rank(), dist.get_world_size()
    logits, labels = _case()
    width = PADDED // world
    shard = logits[:, rank * width : (rank + 1) * width].clone().requires_grad_(True)
    rows = torch.tensor([1, 2, 4, 5, 6])
    logp = label_logprobs(
        shard, labels, rows, vocab_start=rank * width, vocab_size=VOCAB, tp_group=dist.group.WORLD
    )
    choices = ChoiceBatch(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), torch.tensor([1, -1]))
    scores = scores_from_token_logprobs(choices, logp, torch.tensor([0, 0, 1, 2, 2]))
    torch.log_softmax(scores[0], -1)[1].backward()
    return scores.detach(), shard.grad


def test_option_scores_are_equal_on_both_tp_ranks_and_match_the_full_vocabulary():
    (s0, g0), (s1, g1) = run_on_ranks(_on_rank, 2)
    logits, labels = _case()
    full = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(full[:, :VOCAB], -1)
    tok = logp[torch.arange(TOKENS), labels]
    expected = torch.stack(
        [
            torch.stack([tok[1] + tok[2], tok[4]]),
            torch.stack([tok[5] + tok[6], torch.tensor(float("-inf"), dtype=tok.dtype)]),
        ]
    )
    torch.testing.assert_close(s0, expected.detach())
    torch.testing.assert_close(s1, expected.detach())
    torch.log_softmax(expected[0], -1)[1].backward()
    torch.testing.assert_close(torch.cat([g0, g1], 1), full.grad)
