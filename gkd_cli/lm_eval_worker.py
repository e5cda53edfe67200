"""The per-rank entry point that ``gkd eval lm-eval`` starts under torchrun::

    python -m gkd_cli.lm_eval_worker --spec JOB.json

Every rank initializes the job's TP/PP/DP layout and loads the checkpoint into a
:class:`parallel.scoring.Scorer`. Rank 0 runs lm-evaluation-harness (``lm_eval.simple_evaluate``)
with :class:`gkd_cli.lm_eval_model.GkdLM` and writes the results JSON; the other ranks serve its
scoring requests (:class:`gkd_cli.lm_eval_model.ScoringService`). The Hugging Face hub is never
contacted: ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` are set before
lm-eval is imported, so a task whose data is not local fails at once instead of hanging.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from torch.distributed.elastic.multiprocessing.errors import record

from gkd_cli.eval_worker import JsonJob
from gkd_cli.progress import rank_logging

log = logging.getLogger("gkd.lm_eval_worker")

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "HF_HUB_ETAG_TIMEOUT": "10",
    "HF_HUB_DOWNLOAD_TIMEOUT": "10",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
"""Environment of the workers (and of the CLI's task check): no network, short timeouts."""


@dataclass(kw_only=True)
class LmEvalJob(JsonJob):
    """What one ``gkd eval lm-eval`` run does (written by the CLI as JSON, read by every worker)."""

    KIND: ClassVar[str] = "lm-eval job"

    checkpoint: str
    """gkd checkpoint folder."""
    tokenizer: str
    """Tokenizer file or folder (the model's)."""
    tasks: list[str]
    """lm-eval task (or group, tag) names."""
    out: str
    """Results JSON that rank 0 writes."""
    include_path: list[str] = field(default_factory=list)
    """Folders of extra task YAMLs."""
    include_defaults: bool = True
    """Index lm-eval's own tasks too (False: the include paths hold every task; saves the tens of
    seconds lm-eval takes to index its thousands of task files)."""
    num_fewshot: int | None = None
    """Few-shot examples; None: each task's default."""
    limit: float | None = None
    """Examples per task (a fraction when < 1); None: all."""
    log_samples: bool = False
    """Also write each example's requests and responses (``samples``)."""
    seed: int = 1234
    """lm-eval's random, numpy, torch and few-shot seeds."""
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 8
    """Packed rows per forward pass."""
    batch_size: int = 64
    """lm-eval requests per scoring call."""
    max_length: int | None = None
    """The model's window for lm-eval (None: the checkpoint's max_seq_len)."""
    precision: str = "auto"
    add_bos: bool | None = None
    """None: the tokenizer's convention (:func:`gkd_cli.eval_worker.prompt_prefix`)."""
    model_name: str | None = None


def _jsonable(value):
    """lm-eval's results with tuples as lists and anything else JSON lacks as text."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def write_results(path: str | os.PathLike, results: dict, job: LmEvalJob) -> None:
    """The results JSON (lm-eval's ``results``, ``versions``, ``n-shot``, ``configs``, and
    ``samples`` when logged), with the gkd settings, written under a temporary name first."""
    keep = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better")
    document = {key: results[key] for key in keep if key in results}
    document["n-samples"] = results.get("n-samples")
    if job.log_samples:
        document["samples"] = results.get("samples", {})
    document["model"] = job.model_name
    document["gkd"] = {
        "checkpoint": job.checkpoint,
        "tokenizer": job.tokenizer,
        "tp": job.tp,
        "pp": job.pp,
        "dp": job.dp,
        "max_length": job.max_length,
        "num_fewshot": job.num_fewshot,
        "limit": job.limit,
    }
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(_jsonable(document), indent=2) + "\n", encoding="utf-8")
    temp.replace(path)


def evaluate(job: LmEvalJob, ctx) -> dict | None:
    """Run the job on this rank of an initialized layout; rank 0 returns lm-eval's results."""
    from gkd_cli.lm_eval_model import build_model

    model, service = build_model(
        ctx,
        Path(job.checkpoint),
        Path(job.tokenizer),
        max_length=job.max_length,
        batch_size=job.batch_size,
        micro_batch_size=job.micro_batch_size,
        add_bos=job.add_bos,
        precision=job.precision,
    )
    if model is None:
        calls = service.serve()
        log.info("served %d scoring calls", calls)
        service.scorer.close()
        return None
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        if job.include_defaults or not job.include_path:
            manager = TaskManager(include_path=list(job.include_path) or None)
        else:
            manager = TaskManager(include_path=list(job.include_path), include_defaults=False)
        log.info(
            "lm-eval %s on %s (tp=%d pp=%d dp=%d, max_length %d)",
            getattr(lm_eval, "__version__", "?"),
            ", ".join(job.tasks),
            ctx.tp,
            ctx.pp,
            ctx.dp,
            model.max_length,
        )
        results = lm_eval.simple_evaluate(
            model=model,
            tasks=list(job.tasks),
            num_fewshot=job.num_fewshot,
            limit=job.limit,
            task_manager=manager,
            log_samples=job.log_samples,
            bootstrap_iters=0,
            random_seed=job.seed,
            numpy_random_seed=job.seed,
            torch_random_seed=job.seed,
            fewshot_random_seed=job.seed,
        )
    except ConnectionError as error:
        raise ConnectionError(
            f"{error}: the workers run offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1) and this "
            "task's dataset is not in the local Hugging Face cache; fetch it into the cache "
            "first, run with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 where the hub is reachable, "
            "or write the task over local files (dataset_path: json) and pass --include-path"
        ) from error
    finally:
        service.stop()
        service.scorer.close()
    if results is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results on rank 0")
    write_results(job.out, results, job)
    log.info("wrote %s (%d scoring calls)", job.out, service.calls)
    return results


def run(job: LmEvalJob) -> dict | None:
    from parallel.config import ParallelConfig
    from parallel.distributed import initialize, shutdown

    ctx = initialize(ParallelConfig(tp=job.tp, pp=job.pp, dp=job.dp), seed=job.seed)
    try:
        return evaluate(job, ctx)
    finally:
        shutdown()


@record
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gkd_cli.lm_eval_worker")
    parser.add_argument("--spec", required=True, help="lm-eval job (JSON, see LmEvalJob).")
    args = parser.parse_args(argv)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    rank_logging()
    run(LmEvalJob.load(args.spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
