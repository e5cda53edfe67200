"""``gkd convert``'s input errors (one red line, exit code 2, before any worker starts) and its
launch plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gkd_cli.convert import convert_app, find_vocab_mapping, import_plan

pytestmark = pytest.mark.unit

runner = CliRunner()


def _tiny_llama_config(folder: Path, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        **overrides,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _assert_one_red_line(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], result.output


def test_import_of_a_missing_folder(tmp_path):
    result = runner.invoke(
        convert_app, ["import-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    _assert_one_red_line(result, "is not a folder")


def test_import_of_an_unsupported_architecture(tmp_path):
    folder = _tiny_llama_config(tmp_path / "hf", architectures=["T5ForConditionalGeneration"])
    result = runner.invoke(convert_app, ["import-hf", str(folder), "--out", str(tmp_path / "o")])
    _assert_one_red_line(result, "T5ForConditionalGeneration", "GPT2LMHeadModel")


def test_import_without_weights(tmp_path):
    folder = _tiny_llama_config(tmp_path / "hf")
    result = runner.invoke(convert_app, ["import-hf", str(folder), "--out", str(tmp_path / "o")])
    _assert_one_red_line(result, "has no weights")


def test_import_with_a_layout_that_does_not_divide_the_heads(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from parallel.hf.layout import expected_shapes
    from parallel.hf.spec import read_spec

    folder = _tiny_llama_config(tmp_path / "hf")
    shapes = expected_shapes(read_spec(folder))
    save_file(
        {n: np.zeros(s, dtype=np.float32) for n, s in shapes.items()},
        str(folder / "model.safetensors"),
    )
    result = runner.invoke(
        convert_app, ["import-hf", str(folder), "--out", str(tmp_path / "o"), "--tp", "4"]
    )
    # config.json's own keys (not gkd's num_query_groups/num_layers) and the sizes that work:
    # 4 heads, 2 key/value heads, intermediate 48 -> tp 1 or 2; 2 layers -> pp 1 or 2
    _assert_one_red_line(
        result,
        "num_key_value_heads=2",
        "not divisible by --tp=4",
        "valid --tp values for this model: 1, 2;",
        "valid --pp values: 1, 2",
    )
    assert "num_query_groups" not in result.output
    result = runner.invoke(
        convert_app, ["import-hf", str(folder), "--out", str(tmp_path / "o"), "--pp", "3"]
    )
    _assert_one_red_line(
        result, "num_hidden_layers=2", "not divisible by --pp=3", "valid --pp values: 1, 2"
    )
    assert "num_layers" not in result.output
    assert not (tmp_path / "o").exists()
    existing = tmp_path / "o2"
    existing.mkdir()
    (existing / "x").write_text("keep me")
    result = runner.invoke(convert_app, ["import-hf", str(folder), "--out", str(existing)])
    _assert_one_red_line(result, "exists and is not empty", "--overwrite")
    result = runner.invoke(
        convert_app, ["import-hf", str(folder), "--out", str(tmp_path / "o"), "--dtype", "int8"]
    )
    _assert_one_red_line(result, "--dtype")


def test_export_of_something_that_is_not_a_checkpoint(tmp_path):
    result = runner.invoke(convert_app, ["export-hf", str(tmp_path), "--out", str(tmp_path / "o")])
    _assert_one_red_line(result, "no complete gkd checkpoint")


def test_export_of_an_arch_without_hugging_face_counterpart(tmp_path):
    from parallel.config import ModelArch

    folder = tmp_path / "ckpt"
    folder.mkdir()
    arch = ModelArch.llama(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=300,
        normalization="LayerNorm",
    )
    (folder / "meta.json").write_text(json.dumps({"arch": vars(arch)}))
    result = runner.invoke(convert_app, ["export-hf", str(folder), "--out", str(tmp_path / "o")])
    _assert_one_red_line(result, "no supported Hugging Face architecture", "RMSNorm")


def test_export_refuses_a_non_empty_out(tmp_path):
    from parallel.config import ModelArch

    folder = tmp_path / "ckpt"
    folder.mkdir()
    arch = ModelArch.gpt2(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300)
    (folder / "meta.json").write_text(json.dumps({"arch": vars(arch)}))
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = runner.invoke(convert_app, ["export-hf", str(folder), "--out", str(out)])
    _assert_one_red_line(result, "exists and is not empty")
    assert (out / "config.json").read_text() == "{}"


def test_import_plan_launches_the_worker_on_tp_x_pp_ranks(tmp_path):
    plan = import_plan(
        tmp_path / "hf", tmp_path / "out", tp=2, pp=2, dtype="bfloat16", log_dir=tmp_path / "logs"
    )
    assert plan.nproc_per_node == 4 and plan.nnodes == 1
    assert plan.entry_module == "parallel.hf.worker"
    assert plan.args == [
        "--hf-dir",
        str((tmp_path / "hf").resolve()),
        "--out",
        str((tmp_path / "out").resolve()),
        "--tp",
        "2",
        "--pp",
        "2",
        "--dtype",
        "bfloat16",
    ]
    from parallel.hf.worker import parse_args

    args = parse_args(plan.args)  # the worker accepts exactly what the plan passes
    assert (args.tp, args.pp, args.dtype) == (2, 2, "bfloat16")


def test_vocab_mapping_is_found_in_checkpoint_run_dir_or_config(tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000010"
    step.mkdir(parents=True)
    assert find_vocab_mapping(step, {}) is None
    elsewhere = tmp_path / "vocab" / "vocab_mapping.safetensors"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    assert find_vocab_mapping(step, {"data": {"vocab_mapping": str(elsewhere)}}) == elsewhere
    (run / "vocab_mapping.safetensors").write_bytes(b"x")
    assert (
        find_vocab_mapping(step, {"data": {"vocab_mapping": str(elsewhere)}})
        == run / "vocab_mapping.safetensors"
    )
    (step / "vocab_mapping.safetensors").write_bytes(b"x")
    assert find_vocab_mapping(step, {}) == step / "vocab_mapping.safetensors"
