"""Peak memory of a rank importing a Hugging Face model at TP2: its shard plus a small constant.

A Llama-shaped model (hidden 512, 4 layers, grouped-query attention, vocabulary 32000, untied,
fp32: 181 MB) is written as two safetensors shards. Each of the 2 ranks builds its shard from the
files (``build_from_hf``) with its peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` just before) measured. Bound asserted: peak - baseline <= this rank's
parameter bytes (about 91 MB) + 40 MiB (a 16 MiB read block counts twice, plus slack); reading
whole tensors or whole files would exceed it by about the other rank's half (90 MB). The save's peak is reported, not asserted (megatron's
checkpoint writer stages the shard once more).

    torchrun --nproc-per-node 2 tests/dist/test_convert_memory.py SPEC.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the torchrun worker runs this file as a script
    sys.path.insert(0, str(REPO))

from parallel.hf.load import READ_BLOCK_BYTES  # noqa: E402

# One read block in flight costs it twice (the copied block, and the file pages it touched, which
# count in the resident set while the file is mapped), plus 8 MiB of allocator and module slack.
# Measured: 29-31 MiB above the shard. Reading a whole 62.5 MiB embedding instead would add ~93 MiB.
CONSTANT_BYTES = 2 * READ_BLOCK_BYTES + 8 * 1024 * 1024
HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, VOCAB = 512, 8, 4, 4, 1536, 32000


def write_model(folder: Path) -> int:
    """A random Llama-shaped model in two safetensors shards with an index; returns its bytes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    head_dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (HIDDEN,),
                p + "post_attention_layernorm.weight": (HIDDEN,),
                p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
                p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
                p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
                p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
                p + "mlp.gate_proj.weight": (FFN, HIDDEN),
                p + "mlp.up_proj.weight": (FFN, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, FFN),
            }
        )
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    gen = torch.Generator().manual_seed(0)
    names = list(shapes)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map, total = {}, 0
    for file, part in halves.items():
        tensors = {n: torch.randn(shapes[n], generator=gen) * 0.02 for n in part}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * 4 for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return total


def _peak_rss() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _current_rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def worker(spec_path: str) -> None:
    import gc

    import torch.distributed as dist

    from parallel.config import ParallelConfig
    from parallel.distributed import initialize, shutdown
    from parallel.hf.load import build_from_hf, save_imported
    # megatron's GPT modules are imported lazily by the build: import them before the baseline, so
    # the measured growth is data, not code (about 3 MiB of modules).
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    import megatron.core.tensor_parallel.layers  # noqa: F401
    import megatron.core.transformer.transformer_block  # noqa: F401

    spec = json.loads(Path(spec_path).read_text())
    initialize(ParallelConfig(tp=2), seed=0)
    gc.collect()
    dist.barrier()
    baseline = _current_rss()
    _reset_peak()
    model, checkpoint = build_from_hf(spec["hf_dir"])
    load_peak = _peak_rss()
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    dist.barrier()
    _reset_peak()
    save_imported(model, checkpoint, spec["out"])
    save_peak = _peak_rss()
    report = {"baseline": baseline, "load_peak": load_peak, "save_peak": save_peak, "shard": shard}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(gathered))
    shutdown()


@pytest.mark.dist
def test_import_peak_memory_is_shard_plus_constant(tmp_path):
    from tests.dist._torchrun import torchrun

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak memory")
    total = write_model(tmp_path / "hf")
    spec = {"hf_dir": str(tmp_path / "hf"), "out": str(tmp_path / "ckpt"), "result": str(tmp_path / "r.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torchrun(Path(__file__), 2, str(tmp_path / "spec.json"))
    reports = json.loads((tmp_path / "r.json").read_text())
    mib = 1024 * 1024
    for rank, r in enumerate(reports):
        growth = r["load_peak"] - r["baseline"]
        print(
            f"rank {rank}: model {total / mib:.1f} MiB, shard {r['shard'] / mib:.1f} MiB, load peak "
            f"+{growth / mib:.1f} MiB, save peak +{(r['save_peak'] - r['baseline']) / mib:.1f} MiB"
        )
        assert abs(r["shard"] - total / 2) < 0.01 * total  # a real half at TP2
        assert growth <= r["shard"] + CONSTANT_BYTES, (rank, growth / mib, r["shard"] / mib)


if __name__ == "__main__":
    worker(sys.argv[1])
