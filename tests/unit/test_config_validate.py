"""Cross-field validation: layouts, batch sizes, world size, sequence length, paths, vocabularies,
methods. Every error must name the field and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gkd_cli.errors import ConfigError
from gkd_cli.launch import check_world_size, environment_world_size
from tests.unit.test_config_load import (
    base_config,
    error_of,
    install_fake_registry,
    load,
)

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch):
    return install_fake_registry(monkeypatch)


def test_heads_not_divisible_by_tp(tmp_path):
    err = str(error_of(tmp_path, base_config(tmp_path), ["parallel.tp=3"]))
    assert "teacher.num_attention_heads=4 is not divisible by parallel.tp=3" in err


def test_query_groups_not_divisible_by_tp(tmp_path):
    data = base_config(tmp_path)
    data["teacher"].update(num_attention_heads=8, num_query_groups=2)
    err = str(error_of(tmp_path, data, ["parallel.tp=4"]))
    assert "teacher.num_query_groups=2 is not divisible by parallel.tp=4" in err


def test_student_layers_not_divisible_by_pp(tmp_path):
    data = base_config(tmp_path)
    data["parallel"].update(tp=1, pp=4)
    err = str(error_of(tmp_path, data))
    assert "student.num_layers=2 is not divisible by parallel.pp=4" in err


def test_global_batch_not_divisible(tmp_path):
    err = error_of(tmp_path, base_config(tmp_path), ["train.global_batch_size=5", "parallel.dp=2"])
    message = str(err)
    assert err.field == "train.global_batch_size"
    assert "micro_batch_size x parallel.dp = 2 x 2 = 4" in message
    assert "e.g. 4 or 8" in message


def test_processes_not_split_over_nodes(tmp_path):
    err = str(error_of(tmp_path, base_config(tmp_path), ["parallel.nnodes=4"]))
    assert "cannot be split evenly over parallel.nnodes=4" in err


@pytest.mark.parametrize(
    ("environ", "world"),
    [
        ({"WORLD_SIZE": "8"}, 8),
        ({"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"}, 8),
        ({"SLURM_NNODES": "3", "SLURM_GPUS_ON_NODE": "8"}, 24),
        ({"SLURM_JOB_NUM_NODES": "2"}, None),  # GPUs unknown: no check
        ({}, None),
    ],
)
def test_environment_world_size(environ, world):
    known = environment_world_size(environ)
    assert (known[0] if known else None) == world


def test_world_size_mismatch(tmp_path):
    cfg = load(tmp_path, base_config(tmp_path))  # tp 2 x pp 1 x dp 1
    with pytest.raises(ConfigError) as info:
        check_world_size(cfg.parallel, {"WORLD_SIZE": "8"})
    assert "world size 8 from WORLD_SIZE" in str(info.value)
    assert "set parallel.dp=4" in str(info.value)
    check_world_size(cfg.parallel, {"WORLD_SIZE": "2"})  # matches: no error
    err = error_of(tmp_path, base_config(tmp_path), environ={"WORLD_SIZE": "4"})
    assert "parallel.dp=2" in str(err)


def test_seq_length_beyond_max_seq_len(tmp_path):
    err = str(error_of(tmp_path, base_config(tmp_path), ["data.seq_length=128"]))
    assert "data.seq_length=128 exceeds teacher.max_seq_len=64" in err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=0", "train.steps=0 must be > 0"),
        ("parallel.dp=0", "parallel.dp=0 must be > 0"),
        ("train.lr=-1", "train.lr=-1.0 must be > 0"),
        ("train.min_lr=1", "train.min_lr=1.0 is above train.lr"),
        ("train.logit_chunk_tokens=0", "train.logit_chunk_tokens=0 must be > 0"),
        ("train.adam_beta2=1.0", "train.adam_beta2=1.0 must be in [0, 1)"),
        ("train.warmup_steps=10", "train.warmup_steps=10 exceeds train.steps=2"),
        ("output.keep_last=-1", "output.keep_last=-1 must be >= 0"),
    ],
)
def test_ranges(tmp_path, override, expected):
    assert expected in str(error_of(tmp_path, base_config(tmp_path), [override]))


# ---------------------------------------------------------------------------------------------
# Paths and checkpoints
# ---------------------------------------------------------------------------------------------


def test_missing_train_file(tmp_path):
    data = base_config(tmp_path)
    data["data"]["train_files"].append(str(tmp_path / "missing.txt"))
    err = error_of(tmp_path, data)
    assert "data.train_files.1" in str(err) and "missing.txt does not exist" in str(err)


def test_glob_matching_nothing(tmp_path):
    data = base_config(tmp_path)
    data["data"]["train_files"] = [str(tmp_path / "shard-*.jsonl")]
    assert "matches no file" in str(error_of(tmp_path, data))
    (tmp_path / "shard-0.jsonl").write_text('{"text": "a"}\n')
    assert load(tmp_path, data).data.train_files == [str(tmp_path / "shard-*.jsonl")]


def test_missing_valid_file_and_tokenizer(tmp_path):
    data = base_config(tmp_path)
    data["data"]["valid_files"] = [str(tmp_path / "valid.txt")]
    assert "data.valid_files.0" in str(error_of(tmp_path, data))
    data = base_config(tmp_path)
    data["data"]["tokenizer"] = str(tmp_path / "tok.json")
    assert "data.tokenizer" in str(error_of(tmp_path, data))


def test_paths_unchecked_when_asked(tmp_path):
    data = base_config(tmp_path)
    data["data"]["tokenizer"] = str(tmp_path / "elsewhere" / "tok.json")
    load(tmp_path, data, check_paths=False)


def test_teacher_checkpoint_required_unless_random(tmp_path):
    data = base_config(tmp_path)
    del data["teacher"]["init"]
    err = error_of(tmp_path, data)
    assert err.field == "teacher.checkpoint" and "teacher.init=random" in str(err)
    data["teacher"]["checkpoint"] = str(tmp_path / "ckpt")
    assert "teacher.checkpoint: directory" in str(error_of(tmp_path, data))
    (tmp_path / "ckpt").mkdir()
    assert load(tmp_path, data).teacher.checkpoint == str(tmp_path / "ckpt")


def test_teacher_random_and_checkpoint_contradict(tmp_path):
    data = base_config(tmp_path)
    (tmp_path / "ckpt").mkdir()
    data["teacher"]["checkpoint"] = str(tmp_path / "ckpt")
    assert "contradicts" in str(error_of(tmp_path, data))


def test_student_checkpoint(tmp_path):
    data = base_config(tmp_path)
    data["student"]["init"] = "checkpoint"
    assert "student.init=checkpoint needs student.checkpoint" in str(error_of(tmp_path, data))
    data["student"]["checkpoint"] = str(tmp_path / "student-ckpt")
    assert "student.checkpoint: directory" in str(error_of(tmp_path, data))


def _superglue(tmp_path):
    root = tmp_path / "superglue"
    (root / "BoolQ").mkdir(parents=True)
    (root / "BoolQ" / "train.jsonl").write_text('{"passage": "x"}\n')
    (root / "RTE").mkdir()
    (root / "RTE" / "val.jsonl").write_text('{"premise": "x"}\n')
    data = base_config(tmp_path)
    data["data"].update(source="superglue", superglue_dir=str(root), train_files=[])
    return data


def test_superglue_source(tmp_path):
    data = _superglue(tmp_path)
    data["data"]["superglue_tasks"] = ["boolq"]
    load(tmp_path, data)
    data["data"]["superglue_tasks"] = ["BoolQ", "RTE"]  # RTE has no train.jsonl here
    assert "RTE/train.jsonl does not exist" in str(error_of(tmp_path, data))
    data["data"]["superglue_tasks"] = ["Boolq", "RTEE"]
    assert "did you mean 'RTE'" in str(error_of(tmp_path, data))
    data["data"]["superglue_tasks"] = []
    assert "data.superglue_tasks is empty" in str(error_of(tmp_path, data))


# ---------------------------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------------------------


def test_student_vocab_must_match_teacher(tmp_path):
    err = error_of(tmp_path, base_config(tmp_path), ["student.vocab_size=256"])
    assert err.field == "student.vocab_size"
    assert "differs from teacher.vocab_size=512" in str(err) and "data.vocab_mapping" in str(err)


def _mapping(path, metadata):
    from safetensors.numpy import save_file

    save_file({"orig_to_comp": np.zeros(512, dtype=np.int64)}, str(path), metadata=metadata)
    return path


def test_vocab_mapping_compressed_size(tmp_path):
    nested = {"gkd_vocab": json.dumps({"vocab_size": 512, "compressed_vocab_size": 256})}
    mapping = _mapping(tmp_path / "mapping.safetensors", nested)
    overrides = ["student.vocab_size=256", f"data.vocab_mapping={mapping}"]
    cfg = load(tmp_path, base_config(tmp_path), overrides)
    assert cfg.data.vocab_mapping == str(mapping)
    err = error_of(tmp_path, base_config(tmp_path), ["student.vocab_size=384", overrides[1]])
    assert "compressed size 256" in str(err) and "set student.vocab_size=256" in str(err)


def test_vocab_mapping_flat_metadata_and_teacher_size(tmp_path):
    mapping = _mapping(
        tmp_path / "m.safetensors", {"compressed_vocab_size": "256", "vocab_size": "1024"}
    )
    err = error_of(
        tmp_path, base_config(tmp_path), ["student.vocab_size=256", f"data.vocab_mapping={mapping}"]
    )
    assert "made for a vocabulary of 1024 tokens" in str(err)


def test_vocab_mapping_without_sizes_is_not_checked(tmp_path):
    mapping = _mapping(tmp_path / "bare.safetensors", {})
    load(
        tmp_path, base_config(tmp_path), ["student.vocab_size=128", f"data.vocab_mapping={mapping}"]
    )


def test_missing_vocab_mapping(tmp_path):
    err = error_of(
        tmp_path,
        base_config(tmp_path),
        ["student.vocab_size=256", f"data.vocab_mapping={tmp_path / 'none.safetensors'}"],
    )
    assert err.field == "data.vocab_mapping"


def test_tokenizer_larger_than_teacher_vocab(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(600)}
    vocab["[UNK]"] = 600
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    path = tmp_path / "real-tokenizer.json"
    tokenizer.save(str(path))
    err = error_of(tmp_path, base_config(tmp_path), [f"data.tokenizer={path}"])
    assert "data.tokenizer has 601 tokens but teacher.vocab_size=512" in str(err)
    overrides = [
        f"data.tokenizer={path}",
        "teacher.vocab_size=601",
        "student.vocab_size=601",
    ]
    load(tmp_path, base_config(tmp_path), overrides)


# ---------------------------------------------------------------------------------------------
# Methods (through the registry's build_method)
# ---------------------------------------------------------------------------------------------


def test_unknown_method_did_you_mean(tmp_path):
    err = error_of(tmp_path, base_config(tmp_path), ["methods.0.name=glmdd"])
    assert err.field == "methods.0"
    assert "methods.0 (glmdd): unknown distillation method 'glmdd'; did you mean 'glmd'" in str(err)


def test_method_parameters_are_passed_without_name_and_weight(tmp_path):
    cfg = load(tmp_path, base_config(tmp_path), ["methods.0.temperature=2"])
    assert cfg.methods[0].params.temperature == 2
    err = error_of(tmp_path, base_config(tmp_path), ["methods.0.temprature=2"])
    assert "method 'glmd' has no parameter 'temprature'" in str(err)
