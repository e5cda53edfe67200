"""Details real checkpoints use, imported from Hugging Face and checked against transformers'
logits (fp32, CPU, gloo): RoPE scaling (``llama3`` with non-default factors, ``linear``,
``yarn``), ``rope_theta`` != 10000, sliding-window attention (Mistral, Qwen2 with
``use_sliding_window``), Qwen2 q/k/v biases, Qwen3 q/k norms, tied and untied embeddings.

Each model is a tiny random-initialized transformers model of that exact config, run on a sequence
of :data:`SEQ` = 40 tokens: beyond ``original_max_position_embeddings`` (16) of the scaled
models and longer than the window (7), so every feature changes the logits (the pytest process
checks that transformers' logits without the feature differ by more than 0.05).

One 2-rank torchrun (this file is the worker script) imports every model through the real import
path (``build_from_hf``) at TP1 (two data-parallel replicas), TP2 and PP2, and compares the
logits with transformers' within 1e-4. At TP2 it also saves each import as a gkd checkpoint and
builds a fresh ``build_gpt`` model from the checkpoint's ``meta.json`` arch (the teacher route:
the arch carries the scaling and the window), and scores packed options of the sliding-window
Mistral with :class:`parallel.scoring.Scorer` (explicit attention masks) against transformers'
per-option log-probabilities. At TP1 it exports every TP2 checkpoint; transformers loads the
exports and gives the reference logits (the export writes the scaling and window back).

    torchrun --nproc-per-node 2 tests/dist/test_hf_model_details.py SPEC.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the torchrun worker runs this file as a script
    sys.path.insert(0, str(REPO))

SEQ, BATCH, VOCAB = 40, 2, 128
LAYOUTS = [(1, 1), (2, 1), (1, 2)]
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    vocab_size=VOCAB,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 6.0,
    "low_freq_factor": 2.0,
    "high_freq_factor": 8.0,
    "original_max_position_embeddings": 16,
}
# name -> (transformers class names, config kwargs, the kwargs that remove the feature for the
# control, or None when the feature is structural: biases, norms, tying)
MODELS: dict[str, tuple[str, dict, dict | None]] = {
    "llama3_untied": (
        "Llama",
        dict(rope_parameters={**LLAMA3, "rope_theta": 5000.0}, tie_word_embeddings=False),
        dict(rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    ),
    "linear_tied": (
        "Llama",
        dict(
            rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0},
            tie_word_embeddings=True,
        ),
        dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "yarn": (
        "Llama",
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 20000.0,
            }
        ),
        dict(rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
    ),
    "theta": (
        "Llama",
        dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
        dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "mistral_window": ("Mistral", dict(sliding_window=7), dict(sliding_window=None)),
    "qwen2_bias_window": (
        "Qwen2",
        dict(use_sliding_window=True, sliding_window=7, max_window_layers=0),
        dict(use_sliding_window=False),
    ),
    "qwen2_bias_tied": ("Qwen2", dict(tie_word_embeddings=True), None),
    "qwen3_qknorm": ("Qwen3", dict(head_dim=32), None),
}
NAMES = tuple(MODELS)


# ---------------------------------------------------------------------------------------------
# reference models (pytest process)
# ---------------------------------------------------------------------------------------------


def _hf_model(kind: str, kwargs: dict):
    import transformers

    config = getattr(transformers, f"{kind}Config")(**COMMON, **kwargs)
    return getattr(transformers, f"{kind}ForCausalLM")(config)


def scoring_requests() -> list:
    """Two requests (context, options) whose packed rows are longer than the window."""
    gen = torch.Generator().manual_seed(11)

    def ids(n: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=gen).tolist()

    return [(ids(14), [ids(9), ids(6), ids(11)]), (ids(5), [ids(12), ids(3)])]


def _hf_option_logprobs(model, requests) -> list[list[list[float]]]:
    """Per request, per option: transformers' log-probability of each option token after
    ``context + option`` alone."""
    out = []
    for context, options in requests:
        per_option = []
        for option in options:
            tokens = torch.tensor([context + option])
            with torch.no_grad():
                logprobs = model(tokens).logits.double().log_softmax(-1)[0]
            start = len(context)
            per_option.append([logprobs[start + j - 1, t].item() for j, t in enumerate(option)])
        out.append(per_option)
    return out


def build_reference_models(root: Path) -> dict:
    from tests.dist.test_convert_hf import _randomize

    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    refs: dict = {"tokens": tokens, "controls": {}}
    for seed, (name, (kind, kwargs, control)) in enumerate(MODELS.items()):
        model = _hf_model(kind, kwargs)
        _randomize(model, seed)
        model.eval()
        model.save_pretrained(root / name)
        with torch.no_grad():
            refs[name] = model(tokens).logits.double()
        if control is not None:
            other = _hf_model(kind, {**kwargs, **control})
            other.load_state_dict(model.state_dict())
            other.eval()
            with torch.no_grad():
                refs["controls"][name] = (
                    (other(tokens).logits.double() - refs[name]).abs().max().item()
                )
        if name == "mistral_window":
            refs["scoring"] = _hf_option_logprobs(model, scoring_requests())
    return refs


# ---------------------------------------------------------------------------------------------
# torchrun worker
# ---------------------------------------------------------------------------------------------


def _error(logits, ref) -> float:
    return (logits[..., :VOCAB].double() - ref).abs().max().item()


def check_layout(spec: dict, tp: int, pp: int, ctx) -> dict:
    from parallel.checkpoint import load_model_weights, read_meta
    from parallel.config import ModelArch
    from parallel.hf.load import build_from_hf, save_imported
    from parallel.model import build_gpt
    from parallel.scoring import Scorer
    from tests.dist.test_convert_hf import forward_logits

    refs = torch.load(spec["refs"])
    tokens = refs["tokens"]
    report: dict = {}
    for name in NAMES:
        model, checkpoint = build_from_hf(Path(spec["hf_root"]) / name, dtype="float32")
        arch = checkpoint.spec.arch
        entry: dict = {"rope_scaling": arch.rope_scaling, "sliding_window": arch.sliding_window}
        logits = forward_logits(model, tokens, arch.hidden_size)
        if logits is not None:
            entry["import"] = _error(logits, refs[name])
        if (tp, pp) == (2, 1):
            folder = save_imported(model, checkpoint, Path(spec["out"]) / name)
            saved = ModelArch(**read_meta(folder)["arch"])
            fresh = build_gpt(saved, params_dtype=torch.float32)
            load_model_weights(folder, fresh)
            logits = forward_logits(fresh, tokens, arch.hidden_size)
            if logits is not None:
                entry["checkpoint"] = _error(logits, refs[name])
            if name == "mistral_window":
                model.eval()
                scorer = Scorer.for_model(ctx, arch, model, micro_batch_size=2, seq_length=48)
                ours = scorer.token_logprobs(scoring_requests())
                scorer.close()
                if ctx.is_last_stage:
                    entry["scoring"] = max(
                        abs(a - b)
                        for mine, theirs in zip(ours, refs["scoring"], strict=True)
                        for x, y in zip(mine, theirs, strict=True)
                        for a, b in zip(x, y, strict=True)
                    )
        report[name] = entry
    return report


def worker(spec_path: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from parallel.config import ParallelConfig
    from parallel.distributed import initialize, shutdown
    from parallel.hf.export import export_hf

    spec = json.loads(Path(spec_path).read_text())
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    results = {}
    for tp, pp in spec["layouts"]:
        ctx = initialize(ParallelConfig(tp=tp, pp=pp, dp=world // (tp * pp)), seed=3)
        report = check_layout(spec, tp, pp, ctx)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, report)
        results[f"tp{tp}pp{pp}"] = gathered
        ps.destroy_model_parallel()
    initialize(ParallelConfig(dp=world), seed=3)
    for name in NAMES:
        export_hf(Path(spec["out"]) / name, Path(spec["out"]) / f"{name}_hf")
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(results))
    shutdown()


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf_details")
    torch.save(build_reference_models(root), root / "refs.pt")
    return root


@pytest.fixture(scope="module")
def job(hf_root, tmp_path_factory):
    from tests.dist._torchrun import torchrun

    work = tmp_path_factory.mktemp("details")
    spec = {
        "layouts": LAYOUTS,
        "hf_root": str(hf_root),
        "refs": str(hf_root / "refs.pt"),
        "out": str(work / "out"),
        "result": str(work / "result.json"),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    torchrun(Path(__file__), 2, str(work / "spec.json"))
    return json.loads((work / "result.json").read_text()), work / "out"


@pytest.mark.dist
def test_each_feature_changes_the_reference_logits(hf_root):
    """The sequence is long enough that each feature matters: transformers' logits without it
    differ by far more than the 1e-4 tolerance."""
    controls = torch.load(hf_root / "refs.pt")["controls"]
    assert set(controls) == {n for n, m in MODELS.items() if m[2] is not None}
    for name, difference in controls.items():
        assert difference > 0.05, (name, difference)


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_imported_logits_match_transformers(job, tp, pp):
    results, _ = job
    checked = 0
    for report in results[f"tp{tp}pp{pp}"]:
        assert set(report) == set(NAMES)
        for name, entry in report.items():
            if "import" in entry:
                assert entry["import"] < 1e-4, (name, tp, pp, entry)
                checked += 1
    assert checked == len(NAMES) * (2 if pp == 1 else 1)  # last-stage ranks


@pytest.mark.dist
def test_arch_records_the_features(job):
    results, _ = job
    report = results["tp1pp1"][0]
    assert report["llama3_untied"]["rope_scaling"] == {**LLAMA3, "factor": 6.0}
    assert report["linear_tied"]["rope_scaling"] == {"rope_type": "linear", "factor": 3.0}
    assert report["yarn"]["rope_scaling"]["rope_type"] == "yarn"
    assert report["theta"]["rope_scaling"] is None
    assert report["mistral_window"]["sliding_window"] == 7
    assert report["qwen2_bias_window"]["sliding_window"] == 7
    assert report["qwen2_bias_tied"]["sliding_window"] is None


@pytest.mark.dist
def test_model_built_from_the_checkpoint_matches_transformers(job):
    results, _ = job
    checked = 0
    for report in results["tp2pp1"]:
        for name, entry in report.items():
            assert entry["checkpoint"] < 1e-4, (name, entry)
            checked += 1
    assert checked == 2 * len(NAMES)


@pytest.mark.dist
def test_packed_scoring_with_a_sliding_window_matches_transformers(job):
    results, _ = job
    errors = [r["mistral_window"]["scoring"] for r in results["tp2pp1"]]
    assert len(errors) == 2 and max(errors) < 1e-4, errors


@pytest.mark.dist
@pytest.mark.parametrize("name", NAMES)
def test_export_gives_transformers_the_same_model(job, hf_root, name):
    from transformers import AutoModelForCausalLM

    _, out = job
    folder = out / f"{name}_hf"
    original = json.loads((hf_root / name / "config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == original["architectures"]
    refs = torch.load(hf_root / "refs.pt")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(refs["tokens"]).logits.double()
    assert (logits - refs[name]).abs().max().item() < 1e-5


if __name__ == "__main__":
    worker(sys.argv[1])
