"""A tiny distillation job for the runtime's distributed tests, run under torchrun.

    torchrun --nproc-per-node N tests/dist/runtime_job.py SPEC.json

SPEC keys: tp, pp, dp, sequence_parallel (optional), steps, out_dir, save_every, stop_after, result
(path of the JSON written by rank 0), teacher_checkpoint (optional). The result holds per-step losses and terms, and a
layout-independent fingerprint of the student's and the teacher's weights: for every global tensor,
the dot product of its full value with a fixed random tensor of the same global shape, summed over
the ranks that hold its main replica. Equal weights give equal fingerprints at every layout.

Fault injection (tests/faults): nan_loss_at / nan_grad_at (1-based step whose total loss is NaN, or
whose loss is finite but whose gradient is NaN), max_skipped_steps, step_sleep (seconds after each
step), load_sleep (seconds before the loop, after writing <out_dir>/loading: "data loading"),
slow_save (seconds inside each save, after writing <out_dir>/saving), enospc_at_save (step whose
save fails with ENOSPC while rank 0 writes the manifest).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from methods.base import FeatureKind, Role, Tap  # noqa: E402

TEACHER = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=500, max_seq_len=32)
STUDENT = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=500, max_seq_len=32)
SEQ, GLOBAL_BATCH, MICRO = 16, 8, 2
FAULTS: dict = {}
"""The spec's fault-injection options, plus ``step``: the 0-based step being run."""


class GatheredPipeline:
    """Plain reference losses, independent of ``methods/``: forward KL (T=2) on gathered logits,
    0.5 x the student's LM loss, and an intermediate hidden-state MSE (teacher layer 0 <- student
    layer 0, both on stage 0 when pp=2, so its term is attached as an auxiliary loss there)."""

    def __init__(self):
        self.hidden = HiddenMSE()
        self.t_logits = Tap(Role.TEACHER, FeatureKind.LOGITS)
        self.s_logits = Tap(Role.STUDENT, FeatureKind.LOGITS)

    def taps(self, teacher, student):
        return [self.t_logits, self.s_logits, *self.hidden.taps(teacher, student)]

    def compute(self, features, ctx):
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        terms = dict(self.hidden.compute(features, ctx))
        weights = {"mse": 1.0}
        if self.t_logits in features:
            t, s = features[self.t_logits], features[self.s_logits]
            if ctx.tp_group is not None:
                t = gather_from_tensor_model_parallel_region(t)
                s = gather_from_tensor_model_parallel_region(s)
            t, s = t[:, : ctx.vocab_size].float(), s[:, : ctx.vocab_size].float()
            mask = ctx.loss_mask
            lt, ls = torch.log_softmax(t / 2, -1), torch.log_softmax(s / 2, -1)
            kl = (lt.exp() * (lt - ls)).sum(-1) * 4
            terms["kl"] = (kl * mask).sum() / mask.sum()
            nll = -torch.log_softmax(s, -1).gather(1, ctx.labels.view(-1, 1)).squeeze(1)
            terms["lm"] = (nll * mask).sum() / mask.sum()
            weights.update(kl=1.0, lm=0.5)
        if not terms:
            return None, {}
        total = sum(weights[k] * v for k, v in terms.items())
        step = FAULTS.get("step", -1) + 1
        if step == FAULTS.get("nan_loss_at") and "kl" in terms:
            terms["kl"] = terms["kl"] * float("nan")
            total = total + terms["kl"]
        if step == FAULTS.get("nan_grad_at") and self.t_logits in features:
            # sqrt(|x - x|): the value is 0, its gradient 0 * inf = NaN.
            s = features[self.s_logits]
            total = total + torch.sqrt((s - s.detach()).abs().sum())
        return total, {k: v.detach() for k, v in terms.items()}


class FusedPipeline(GatheredPipeline):
    """The same three terms through gkd's vocab-parallel losses, declared ``fused_head``: the
    runtime takes the fused output-layer path (methods/fused_head.py), so the logit features are
    the output layers' inputs and weights; the reference stays GatheredPipeline's plain losses."""

    fused_head = True

    def compute(self, features, ctx):
        from methods import vocab_kernels as vk
        from methods import vocab_parallel as vp

        terms = dict(self.hidden.compute(features, ctx))
        weights = {"mse": 1.0}
        if self.t_logits in features:
            t, s = features[self.t_logits], features[self.s_logits]
            shard = vp.VocabShard.of(ctx)
            kl = vp.divergence(vk.forward_kl_kernel, s, t, ctx.loss_mask, shard, temperature=2.0)
            terms["kl"] = kl * 4
            terms["lm"] = vp.cross_entropy(s, ctx.labels, ctx.loss_mask, shard)
            weights.update(kl=1.0, lm=0.5)
        if not terms:
            return None, {}
        total = sum(weights[k] * v for k, v in terms.items())
        return total, {k: v.detach() for k, v in terms.items()}


class HiddenMSE:
    name = "hidden_mse"
    t_tap = Tap(Role.TEACHER, FeatureKind.HIDDEN, 0)
    s_tap = Tap(Role.STUDENT, FeatureKind.HIDDEN, 0)

    def taps(self, teacher, student):
        return [self.t_tap, self.s_tap]

    def compute(self, features, ctx):
        if self.t_tap not in features:
            return {}
        t, s = features[self.t_tap], features[self.s_tap]
        diff = (t[..., : s.shape[-1]] - s) ** 2
        mask = ctx.loss_mask.view(s.shape[0], s.shape[1], 1)
        return {"mse": (diff * mask).sum() / (mask.sum() * s.shape[-1])}


def fingerprint(module: torch.nn.Module) -> dict[str, float]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def is_main(replica_id):
        ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
        return all(i == 0 for i in ids)

    sums: dict[str, float] = {}
    leaves = []
    for leaf in nested_values(module.sharded_state_dict()):
        leaves.extend(nested_values(leaf.build()) if isinstance(leaf, ShardedTensorFactory) else [leaf])
    for sh in leaves:
        if not isinstance(sh, ShardedTensor) or not is_main(sh.replica_id):
            continue
        prepend = sh.prepend_axis_num
        key = f"{sh.key}|{tuple(sh.global_offset[:prepend])}"
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        full = torch.randn(tuple(sh.global_shape[prepend:]), generator=gen, dtype=torch.float64)
        index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[prepend:], sh.local_shape, strict=True))
        sums[key] = sums.get(key, 0.0) + float((full[index] * sh.data.double().reshape(full[index].shape)).sum())
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sums)
    total: dict[str, float] = {}
    for part in gathered:
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    return total


def local_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        if isinstance(p, torch.Tensor):
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def batches_for(step: int, dp_rank: int, dp: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, TEACHER["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=gen)
    data[-1, -4:] = 0  # padding at the end of one sequence (pad id 0)
    per = GLOBAL_BATCH // dp
    mine = data[dp_rank * per : (dp_rank + 1) * per]
    return [mine[i : i + MICRO] for i in range(0, per, MICRO)]


def _install_faults(spec: dict) -> None:
    import errno

    from parallel import checkpoint

    FAULTS.update({k: spec[k] for k in ("nan_loss_at", "nan_grad_at") if k in spec})
    write_manifest = checkpoint.write_manifest

    def faulty_write_manifest(folder: Path) -> None:
        if spec.get("slow_save"):
            (Path(spec["out_dir"]) / "saving").touch()
            time.sleep(spec["slow_save"])
        if spec.get("enospc_at_save") == FAULTS.get("step", -1) + 1:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(folder))
        write_manifest(folder)

    checkpoint.write_manifest = faulty_write_manifest


def main(spec_path: str) -> None:
    from parallel.config import ModelArch, ParallelConfig, TrainConfig
    from parallel.distributed import initialize, shutdown
    from parallel.loop import LoopSettings, train_loop
    from parallel.runtime import DistillationRuntime, TeacherSpec

    spec = json.loads(Path(spec_path).read_text())
    parallel = ParallelConfig(
        tp=spec["tp"], pp=spec["pp"], dp=spec["dp"], sequence_parallel=spec.get("sequence_parallel", False)
    )
    ctx = initialize(parallel, seed=7)
    teacher_ckpt = spec.get("teacher_checkpoint")
    # "student": the teacher has the student's architecture (loading a trained student as teacher).
    teacher_arch = ModelArch.gpt2(**STUDENT) if spec.get("teacher_arch") == "student" else ModelArch.llama(**TEACHER)
    train = TrainConfig(
        steps=spec["steps"], global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO, lr=5e-3, min_lr=5e-4,
        warmup_steps=1, seed=11, max_skipped_steps=spec.get("max_skipped_steps", 0),
    )
    _install_faults(spec)
    runtime = DistillationRuntime(
        ctx=ctx,
        student=ModelArch.gpt2(**STUDENT),
        teachers=[TeacherSpec(teacher_arch, checkpoint=Path(teacher_ckpt) if teacher_ckpt else None)],
        pipeline=FusedPipeline() if spec.get("pipeline") == "fused" else GatheredPipeline(),
        train=train,
        seq_length=SEQ,
        pad_id=0,
    )
    teacher_digest_before = local_digest(runtime.teachers[0])
    records: list[dict] = []
    train_step = runtime.train_step

    def counted_step(step, batches):
        FAULTS["step"] = step
        return train_step(step, batches)

    runtime.train_step = counted_step
    if spec.get("load_sleep"):
        Path(spec["out_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(spec["out_dir"]) / "loading").touch()
        time.sleep(spec["load_sleep"])

    def on_step(record):
        records.append(record)
        if spec.get("step_sleep"):
            time.sleep(spec["step_sleep"])

    outcome = train_loop(
        runtime,
        lambda step: batches_for(step, ctx.dp_rank, ctx.dp),
        LoopSettings(
            steps=spec["steps"], save_every=spec.get("save_every", 1000), out_dir=Path(spec["out_dir"]),
            stop_after=spec.get("stop_after"), meta={"test": True}, config_yaml="test: true\n",
        ),
        on_step=on_step,
    )
    result = {
        "records": records,
        "status": outcome.status,
        "student": fingerprint(runtime.student),
        "teacher": fingerprint(runtime.teachers[0]),
        "teacher_unchanged": teacher_digest_before == local_digest(runtime.teachers[0]),
        "teacher_requires_grad": any(p.requires_grad for p in runtime.teachers[0].parameters()),
        "teacher_param_bytes": runtime.parameter_bytes()["teacher"],
        "head_path": runtime.stage.head_path,
    }
    unchanged = [None] * dist.get_world_size()
    dist.all_gather_object(unchanged, result["teacher_unchanged"])
    result["teacher_unchanged"] = all(unchanged)
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
