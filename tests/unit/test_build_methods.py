"""The one builder: gkd_cli.build.build_methods (what validation and the worker call) and
methods.pipeline.build_pipeline with its BuildContext."""

from __future__ import annotations

import dataclasses

import pytest

from gkd_cli.build import build_context, build_methods
from gkd_cli.errors import ConfigError
from methods.base import BuildContext, Stage
from methods.pipeline import MethodEntry, build_pipeline, parse_entries, parse_entry
from methods.registry import ParamRangeError, build_method, with_inner_builder
from methods.typed import FieldError
from parallel.model import model_info
from tests.unit.test_config_load import base_config, load

pytestmark = pytest.mark.unit


def test_build_context_has_the_runtimes_model_info(tmp_path):
    data = base_config(tmp_path)
    data["teacher"]["vocab_size"] = data["student"]["vocab_size"] = 500  # pads to 512 at tp 2
    cfg = load(tmp_path, data)
    ctx = build_context(cfg)
    assert ctx.stage is Stage.PRETRAIN and (ctx.tp, ctx.pp) == (2, 1)
    assert ctx.student == model_info(cfg.student.arch(), 2)
    assert ctx.teachers == (model_info(cfg.teachers[0].arch(), 2),)
    assert ctx.teacher is not None and ctx.teacher.padded_vocab_size == 512


def test_build_methods_builds_the_configured_pipeline(tmp_path):
    data = base_config(tmp_path)
    data["methods"] = [{"name": "glmd", "temperature": 4}, {"name": "lm", "weight": 0.5}]
    cfg = load(tmp_path, data)
    pipeline = build_methods(cfg)
    assert [e.name for e in pipeline.entries] == ["glmd", "lm"]
    assert pipeline.entries[0].method.params.temperature == 4.0
    assert pipeline.entries[1].weight == 0.5 and pipeline.stage is Stage.PRETRAIN


def test_build_methods_names_the_entry(tmp_path):
    cfg = load(tmp_path, base_config(tmp_path))
    cfg = dataclasses.replace(cfg, methods=[MethodEntry("lm"), MethodEntry("kd")])
    with pytest.raises(ConfigError) as info:
        build_methods(cfg)  # kd is a task-stage method; the run pre-trains
    assert info.value.field == "methods.1"
    assert str(info.value).startswith("methods.1 (kd): method 'kd' applies to stage TS only")


def test_pd_is_built_for_the_stage():
    entries = parse_entries([{"name": "pd"}])
    pre = build_pipeline(entries, BuildContext(stage=Stage.PRETRAIN)).entries[0].method
    task = build_pipeline(entries, BuildContext(stage=Stage.TASK)).entries[0].method
    assert pre.stage is Stage.PRETRAIN and task.stage is Stage.TASK


def test_build_inner_builds_a_nested_entry_through_the_same_path():
    ctx = with_inner_builder(BuildContext(stage=Stage.TASK))
    assert ctx.build_inner is not None
    inner = ctx.build_inner({"name": "kd", "temperature": 3, "weight": 2.0})
    assert inner.params.temperature == 3.0
    assert ctx.build_inner("glmd").name == "glmd"
    assert ctx.build_inner(parse_entry({"name": "lm"}, "methods.0")).name == "lm"
    with pytest.raises(ParamRangeError, match=r"kd\.temperature=0"):  # the registry's ranges
        ctx.build_inner({"name": "kd", "temperature": 0})


def test_build_method_without_context_still_has_an_inner_builder():
    # a combiner built in a test (no run) gets a task-stage context with build_inner set
    seen = []

    class Probe:
        name = "probe"

        @classmethod
        def from_context(cls, params, ctx):
            seen.append(ctx)
            return cls()

    from methods import registry

    spec = dataclasses.replace(registry.REGISTRY["lm"], name="probe", cls=Probe)
    registry.REGISTRY["probe"] = spec
    try:
        build_method("probe", {})
    finally:
        del registry.REGISTRY["probe"]
    assert seen[0].stage is Stage.TASK and seen[0].build_inner is not None


def test_entries_are_typed_and_range_checked_at_load():
    entry = parse_entry({"name": "jsd", "beta": 1, "weight": 2}, "methods.3")
    assert entry == MethodEntry("jsd", 2.0, entry.params) and entry.params.beta == 1.0
    with pytest.raises(FieldError) as info:
        parse_entry({"name": "jsd", "beta": 1.5}, "methods.3")
    assert info.value.field == "methods.3.beta"
    assert str(info.value).startswith("methods.3 (jsd): jsd.beta=1.5 must be in [0, 1]")
    assert parse_entry(entry.to_config(), "methods.3") == entry  # to_config round-trips
