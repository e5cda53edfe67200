"""Distilling from a teacher cache equals distilling from the co-located teacher (issue 17).

One torchrun job at dp=2 (2 ranks): (1) two steps with the co-located teacher (runtime_job's
teacher and student), the loss a plain-torch forward KL (T=2) on the logits plus 0.5 x the LM loss
(the independent reference); (2) rank 0 alone runs the teacher forward only
(:class:`parallel.teacher_source.TeacherForward`) over the 16 samples and writes a top-k cache with
k = V as a single writer (a cache written at dp=1); (3) two steps from that cache, read at dp=2,
the loss gkd's sparse-target divergence (``vp.divergence`` against SparseTargets). The result holds
both runs' losses and student fingerprints. ``quantization``: the cache's weight code (``fp32``:
exact, the test's fp32 tolerance).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from methods.base import FeatureKind, Role, Tap
from tests.dist import job_setup
from tests.dist.runtime_job import GLOBAL_BATCH, MICRO, SEQ, STUDENT, TEACHER, fingerprint

T = 2.0
STEPS = 2


def global_batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2000 + step)
    return torch.randint(0, TEACHER["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=gen)


def micro(tokens: torch.Tensor, ids: list[int]) -> dict:
    b = tokens.shape[0]
    return {
        "tokens": tokens,
        "loss_mask": torch.ones(b, SEQ),
        "token_mask": None,
        "example_ids": torch.arange(b).unsqueeze(1).expand(b, SEQ).contiguous(),
        "position_ids": torch.arange(SEQ).unsqueeze(0).expand(b, SEQ).contiguous(),
        "packed": False,
        "sample_ids": torch.tensor(ids, dtype=torch.long),
    }


def rank_microbatches(step: int, dp_rank: int, dp: int) -> list[dict]:
    data = global_batch(step)
    per = GLOBAL_BATCH // dp
    out = []
    for start in range(dp_rank * per, (dp_rank + 1) * per, MICRO):
        ids = [step * GLOBAL_BATCH + j for j in range(start, start + MICRO)]
        out.append(micro(data[start : start + MICRO], ids))
    return out


class DenseReference:
    """Plain torch: T^2 KL(q_T || p_T) on the full logits + 0.5 x LM loss (tp=1 here)."""

    t_tap, s_tap = Tap(Role.TEACHER, FeatureKind.LOGITS), Tap(Role.STUDENT, FeatureKind.LOGITS)

    def taps(self, teacher, student):
        return [self.t_tap, self.s_tap]

    def compute(self, features, ctx):
        if self.s_tap not in features:
            return None, {}
        t, s = features[self.t_tap], features[self.s_tap]
        t, s = t[:, : ctx.vocab_size].float(), s[:, : ctx.vocab_size].float()
        lt, ls = torch.log_softmax(t / T, -1), torch.log_softmax(s / T, -1)
        mask = ctx.loss_mask
        kl = ((lt.exp() * (lt - ls)).sum(-1) * mask).sum() / mask.sum() * T * T
        nll = -torch.log_softmax(s, -1).gather(1, ctx.labels.view(-1, 1)).squeeze(1)
        lm = (nll * mask).sum() / mask.sum()
        return kl + 0.5 * lm, {"kl": kl.detach(), "lm": lm.detach()}


class SparsePipeline(DenseReference):
    """gkd's losses: the teacher feature is SparseTargets read from the cache."""

    def compute(self, features, ctx):
        from methods import vocab_kernels as vk
        from methods import vocab_parallel as vp
        from methods.sparse_targets import is_sparse_targets

        if self.s_tap not in features:
            return None, {}
        t, s = features[self.t_tap], features[self.s_tap]
        assert is_sparse_targets(t), type(t)
        shard = vp.VocabShard.of(ctx)
        kl = vp.divergence(vk.forward_kl_kernel, s, t, ctx.loss_mask, shard, temperature=T) * T * T
        lm = vp.cross_entropy(s, ctx.labels, ctx.loss_mask, shard)
        return kl + 0.5 * lm, {"kl": kl.detach(), "lm": lm.detach()}


COMPRESSED = 256
"""The compressed student vocabulary: 250 kept ids of the teacher's 500 and 6 padding slots."""


def compressed_vocabulary(vocab: int):
    """A mapping as gkd compress-vocab writes one (tp=1): 250 kept ids in order, each dropped id
    replaced by a kept one (``orig_to_comp``), padding slots masked."""
    from parallel.components import VocabRestriction

    gen = torch.Generator().manual_seed(5)
    perm = torch.randperm(vocab, generator=gen)
    kept = perm[:250].sort().values
    comp_to_orig = torch.cat([kept, torch.full((COMPRESSED - 250,), -1)])
    orig_to_comp = torch.full((vocab,), -1)
    orig_to_comp[kept] = torch.arange(250)
    kept_orig_to_comp = orig_to_comp.clone()
    orig_to_comp[perm[250:]] = torch.randint(0, 250, (vocab - 250,), generator=gen)
    return VocabRestriction(
        orig_to_comp=orig_to_comp,
        teacher_index=comp_to_orig.clamp_min(0),
        valid=comp_to_orig >= 0,
        kept_orig_to_comp=kept_orig_to_comp,
    )


def main(spec_path: str) -> None:
    from gkd_cli.teacher_cache import CacheKey, CacheReader, CacheSpec, CacheWriter, finalize
    from methods import sparse_targets as st
    from methods.vocab_parallel import VocabShard
    from parallel.config import ModelArch
    from parallel.distributed import shutdown
    from parallel.runtime import DistillationRuntime, TeacherSpec, resolve_precision
    from parallel.teacher_source import TeacherForward

    spec = json.loads(Path(spec_path).read_text())
    ctx = job_setup.start(dp=2)
    teacher_arch = ModelArch.llama(**TEACHER)
    train = job_setup.train_config(STEPS, GLOBAL_BATCH, MICRO)
    root = Path(spec["out_dir"]) / "cache"
    key = CacheKey(
        tokenizer_hash="test",
        data_fingerprint="test",
        seq_length=SEQ,
        vocab_size=TEACHER["vocab_size"],
        teacher="random:4321",
    )
    result: dict = {}

    def run(teacher: TeacherSpec, pipeline, vocab=None) -> dict:
        student = STUDENT if vocab is None else {**STUDENT, "vocab_size": COMPRESSED}
        runtime = DistillationRuntime(
            ctx=ctx,
            student=ModelArch.gpt2(**student),
            teachers=[teacher],
            pipeline=pipeline,
            train=train,
            seq_length=SEQ,
            vocab=vocab,
        )
        records = []
        for step in range(STEPS):
            r = runtime.train_step(step, rank_microbatches(step, ctx.dp_rank, ctx.dp))
            records.append({"loss": r.loss, **r.terms})
        return {
            "records": records,
            "student": fingerprint(runtime.student),
            "send_width": runtime.stage.send_width,
            "teacher_modules": len(runtime.teachers),
            "teacher_bytes": runtime.parameter_bytes()["teacher"],
        }

    result["colocated"] = run(TeacherSpec(teacher_arch), DenseReference())

    # The cache: rank 0 alone, as a single (dp=1) writer, k = V.
    vocab = TEACHER["vocab_size"]
    cache_spec = CacheSpec(kind="topk", k=vocab, temperature=T, quantization=spec["quantization"])
    if ctx.rank == 0:
        writer = CacheWriter(root, cache_spec, key, dp_rank=0, dp_size=1)

        def on_logits(logits, batch):
            shard = VocabShard(0, vocab, None)
            targets = st.from_logits_topk(logits.float(), vocab, shard, temperature=T)
            ids = [int(i) for i in batch["sample_ids"]]
            writer.write(ids, targets.to("cpu"), SEQ)

        engine = TeacherForward(
            ctx=ctx,
            spec=TeacherSpec(teacher_arch),
            seq_length=SEQ,
            precision=resolve_precision(train.precision),
            on_logits=on_logits,
        )
        for step in range(STEPS):
            data = global_batch(step)
            engine.run(
                [
                    micro(
                        data[j : j + MICRO], [step * GLOBAL_BATCH + i for i in range(j, j + MICRO)]
                    )
                    for j in range(0, GLOBAL_BATCH, MICRO)
                ]
            )
        writer.close()
        finalize(root)
    dist.barrier()
    reader = CacheReader(root, key)
    result["cached"] = run(TeacherSpec(teacher_arch, cache=reader), SparsePipeline())
    # A compressed student vocabulary (data.vocab_mapping), the same k = V cache of the
    # teacher's full vocabulary: the co-located teacher's head computes the kept columns only;
    # the cached targets are mapped into the compressed ids.
    restriction = compressed_vocabulary(vocab)
    result["colocated_vocab"] = run(TeacherSpec(teacher_arch), DenseReference(), restriction)
    result["cached_vocab"] = run(
        TeacherSpec(teacher_arch, cache=reader), SparsePipeline(), restriction
    )
    if ctx.rank == 0:
        Path(spec["result"]).write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
