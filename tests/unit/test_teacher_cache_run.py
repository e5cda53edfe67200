"""Distilling from a teacher cache, before launch (issue 17): ``teacher: {cache: DIR}`` takes the
teacher's architecture from the cache, a cache keyed to other data is refused naming the field, a
method the cache cannot serve is refused naming the method and what it needs, and the global
sample ids a cached teacher reads are the same at every data-parallel size."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from gkd_cli.errors import ConfigError
from tests.unit.test_config_load import base_config, install_fake_registry, load

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch):
    return install_fake_registry(monkeypatch)


def write_cache(tmp_path, *, kind="topk", temperature=1.0, seq_length=32):
    """A small finished cache of the base config's (random) teacher, written as gkd cache-teacher
    would: teacher.json, the key of the run's data, a few samples."""
    from gkd_cli import cache_teacher as ct
    from gkd_cli.teacher_cache import CacheSpec, CacheWriter, finalize
    from methods import sparse_targets as st
    from methods.vocab_parallel import VocabShard

    data = base_config(tmp_path)
    data["data"]["seq_length"] = seq_length
    cfg = load(tmp_path, data)
    root = tmp_path / "cache"
    root.mkdir()
    ct.write_json_atomic(root / ct.ARCH_FILE, ct.arch_record(cfg.teacher))
    spec = CacheSpec(
        kind=kind,
        k=8 if kind == "topk" else 0,
        samples=4 if kind == "sampled" else 0,
        temperature=temperature,
    )
    writer = CacheWriter(root, spec, ct.cache_key(cfg, 0), dp_rank=0, dp_size=1)
    logits = torch.randn(seq_length * 2, 512, generator=torch.Generator().manual_seed(0))
    shard = VocabShard(0, 512, None)
    if kind == "topk":
        targets = st.from_logits_topk(logits, 8, shard, temperature=temperature)
    else:
        targets = st.from_logits_sampled(
            logits, 4, shard, temperature=temperature, generator=torch.Generator().manual_seed(1)
        )
    writer.write([0, 1], targets, seq_length)
    writer.close()
    finalize(root)
    return root


def cached_config(tmp_path, root, methods, **data_overrides):
    data = base_config(tmp_path)
    data["teacher"] = {"cache": str(root)}  # no architecture: the cache records it
    data["methods"] = methods
    data["data"].update(data_overrides)
    return data


def preflight_error(tmp_path, data, overrides=()) -> str:
    from gkd_cli.preflight import run_preflight

    with pytest.raises(ConfigError) as info:
        run_preflight(load(tmp_path, data, overrides))
    return str(info.value)


def test_cache_only_teacher_gets_its_architecture_and_passes(tmp_path):
    from gkd_cli.preflight import run_preflight

    root = write_cache(tmp_path, temperature=2.0)
    cfg = load(
        tmp_path, cached_config(tmp_path, root, [{"name": "forward_kl", "temperature": 2.0}])
    )
    assert cfg.teacher.cache == str(root)
    assert (cfg.teacher.num_layers, cfg.teacher.hidden_size, cfg.teacher.vocab_size) == (4, 64, 512)
    run_preflight(cfg)  # key, checksums and the method all fit


def test_method_needing_features_is_refused_before_launch(tmp_path):
    root = write_cache(tmp_path)
    err = preflight_error(tmp_path, cached_config(tmp_path, root, [{"name": "tinybert"}]))
    assert "method 'tinybert' needs the teacher's" in err
    assert "intermediate features" in err and "teacher.cache" in err


def test_method_needing_dense_logits_is_refused(tmp_path):
    root = write_cache(tmp_path)
    data = cached_config(tmp_path, root, [{"name": "annealing_kd"}])  # MSE between raw logits
    data["train"]["stage"] = "task"
    err = preflight_error(tmp_path, data)
    assert "method 'annealing_kd'" in err and "raw logits" in err


def test_nonlinear_divergence_refuses_a_sampled_cache(tmp_path):
    root = write_cache(tmp_path, kind="sampled")
    err = preflight_error(tmp_path, cached_config(tmp_path, root, [{"name": "reverse_kl"}]))
    assert "method 'reverse_kl'" in err and "top-k cache" in err


def test_other_temperature_is_refused(tmp_path):
    root = write_cache(tmp_path, temperature=2.0)
    data = cached_config(tmp_path, root, [{"name": "forward_kl", "temperature": 1.0}])
    assert "temperature" in preflight_error(tmp_path, data)


def test_mismatched_sequence_length_is_refused(tmp_path):
    root = write_cache(tmp_path, seq_length=32)
    data = cached_config(tmp_path, root, [{"name": "forward_kl"}], seq_length=16)
    err = preflight_error(tmp_path, data)
    assert "teacher.cache" in err and "seq_length" in err


def test_other_tokenizer_is_refused(tmp_path):
    root = write_cache(tmp_path)
    data = cached_config(tmp_path, root, [{"name": "forward_kl"}])
    other = tmp_path / "other_tokenizer.json"
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    tok.setdefault("added_tokens", [])
    other.write_text(json.dumps({**tok, "normalizer": None}) + " ")
    data["data"]["tokenizer"] = str(other)
    assert "tokenizer_hash" in preflight_error(tmp_path, data)


def test_packed_rows_cannot_be_cached(tmp_path):
    root = write_cache(tmp_path)
    data = cached_config(tmp_path, root, [{"name": "forward_kl"}])
    with pytest.raises(ConfigError, match="data.mode=packed"):
        load(tmp_path, data, ["data.mode=packed"])


def test_sample_ids_do_not_depend_on_dp():
    """A step's rows carry the same global sample ids, in the same order, at dp 1, 2 and 4
    (the order rule of gkd_cli.data.batching), and after a resume (a pure function of the step)."""
    from gkd_cli.cache_teacher import sample_ids

    class Rows:  # a shuffled epoch order of 10 units, as RowDataset.order gives it
        def order(self, epoch):
            return torch.randperm(10, generator=torch.Generator().manual_seed(epoch)).numpy()

        def rows_in_epoch(self, epoch):
            return 10

        def locate(self, positions):
            return [(int(p // 10), int(p % 10)) for p in positions]

    for step in range(4):
        per_dp = {}
        for dp in (1, 2, 4):
            ids = [i for r in range(dp) for m in sample_ids(Rows(), step, 4, r, dp, 1) for i in m]
            per_dp[dp] = ids
        assert per_dp[1] == per_dp[2] == per_dp[4]
        epoch, first = divmod(step * 4, 10)
        assert per_dp[1][0] == int(Rows().order(epoch)[first])


def test_dump_keeps_the_cache(tmp_path):
    from gkd_cli.config import dump_config, load_config

    root = write_cache(tmp_path)
    cfg = load(tmp_path, cached_config(tmp_path, root, [{"name": "forward_kl"}]))
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert dataclasses.asdict(again.teacher) == dataclasses.asdict(cfg.teacher)


def test_plan_counts_no_teacher_weights_for_a_cache(tmp_path):
    """gkd plan: a cached teacher has no weights, forward workspace or pipeline share; its
    sparse targets (k = 8 here: int64 id + fp32 weight per entry) are on the last stage."""
    from gkd_cli.plan import estimate

    root = write_cache(tmp_path, temperature=2.0)
    data = cached_config(tmp_path, root, [{"name": "forward_kl", "temperature": 2.0}])
    plan = estimate(load(tmp_path, data, ["parallel.tp=1"]), "cpu")
    names = {item.name: item.bytes for item in plan.items}
    assert "teacher weights" not in names and "teacher forward workspace" not in names
    tokens = 32 * 2  # seq_length x micro_batch_size
    assert names["cached teacher targets"] == tokens * 8 * 12 + tokens * 8
    colocated = estimate(load(tmp_path, base_config(tmp_path), ["parallel.tp=1"]), "cpu")
    assert {i.name for i in colocated.items} >= {"teacher weights", "teacher forward workspace"}


def test_student_cannot_be_cached(tmp_path):
    data = base_config(tmp_path)
    data["student"]["cache"] = str(tmp_path)
    with pytest.raises(ConfigError, match="only a teacher can be read from a cache"):
        load(tmp_path, data)
