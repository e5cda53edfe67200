"""Every numeric method parameter has a declared range, and `build_method` (which config
validation calls) refuses values outside it, naming the parameter and the bound."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from methods.registry import REGISTRY, ParamRangeError, Range, build_method
from methods.schedules import Schedule

pytestmark = pytest.mark.unit


def _numeric(hint) -> bool:
    args = typing.get_args(hint) or (hint,)
    return any(a in (int, float) or a is Schedule for a in args) and bool not in args


def _params():
    for name, spec in REGISTRY.items():
        hints = typing.get_type_hints(spec.params)
        for f in dataclasses.fields(spec.params):
            if _numeric(hints[f.name]):
                yield name, spec, f, hints[f.name]


def test_every_numeric_parameter_has_a_declared_range():
    missing = [
        f"{name}.{f.name}" for name, spec, f, _ in _params() if spec.range_of(f.name) is None
    ]
    assert not missing, f"declare ranges in methods/registry.py for {missing}"


def test_defaults_lie_in_their_ranges():
    for name, spec, f, _ in _params():
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, int | float) and not isinstance(default, bool):
            assert spec.range_of(f.name).contains(default), (name, f.name, default)


# Bounds from the methods' definitions: a softmax temperature divides the logits (T > 0); loss
# weights scale non-negative terms; jsd's beta, skew-KL's alpha, PKD's alpha, Theseus' replacement
# rate, DGKD's survival, RL-KD's warmup are probabilities or fractions of training; top-k's k, head
# counts and windows are counts.
OUTSIDE = {
    ("glmd", "temperature"): 0.0,
    ("kd", "temperature"): -1.0,
    ("kd", "soft_weight"): -0.5,
    ("jsd", "beta"): 1.01,
    ("skew_kl", "alpha"): -0.01,
    ("skew_rkl", "alpha"): 1.5,
    ("topk_kd", "k"): 0,
    ("pkd", "alpha"): 1.2,
    ("theseus", "replace_rate"): 1.1,
    ("dgkd", "survival"): 0.0,
    ("rl_kd", "warmup"): 2.0,
    ("annealing_kd", "max_temperature"): 0,
    ("continuation_kd", "margin"): -1.0,
    ("lrc_bert", "tau"): 0.0,
    ("lrc_bert", "epsilon"): -0.1,
    ("mgskd", "span_rate"): 0.0,
    ("diito", "span"): 1.0,
    ("ckd", "window"): 0,
    ("minilmv2", "relation_heads"): 0,
    ("rail_kd", "projection_size"): 0,
    ("tinybert", "redraw_every"): 0,
    ("distilbert", "seed"): -1,
    ("universal_kd", "projection_size"): -1,
}


@pytest.mark.parametrize("method, param", sorted(OUTSIDE), ids=lambda v: str(v))
def test_value_outside_the_range_is_refused(method, param):
    with pytest.raises(ParamRangeError, match=rf"{method}\.{param}=") as info:
        build_method(method, {param: OUTSIDE[(method, param)]})
    assert info.value.param == param
    assert str(REGISTRY[method].range_of(param)) in str(info.value)


@pytest.mark.parametrize(
    "method",
    sorted(
        n
        for n in REGISTRY
        if "temperature" in {f.name for f in dataclasses.fields(REGISTRY[n].params)}
    ),
)
def test_every_temperature_must_be_positive(method):
    with pytest.raises(ParamRangeError, match="must be > 0"):
        build_method(method, {"temperature": 0})
    with pytest.raises(ParamRangeError, match="must be > 0"):  # a schedule that reaches 0
        build_method(
            method, {"temperature": {"type": "step", "boundaries": [10], "values": [1.0, 0.0]}}
        )


def test_nested_method_of_a_combiner_is_checked():
    with pytest.raises(ValueError, match=r"tmkd\.method: kd\.temperature=0\.0 must be > 0"):
        build_method("tmkd", {"method": {"name": "kd", "temperature": 0}})


def test_edges_of_ranges():
    assert Range(0, 1).contains(0) and Range(0, 1).contains(1)
    assert not Range(0, 1, low_open=True).contains(0) and not Range(0, 1, high_open=True).contains(
        1
    )
    assert str(Range(0, 1, low_open=True)) == "in (0, 1]" and str(Range(0, low_open=True)) == "> 0"
    build_method("jsd", {"beta": 1.0})  # the edges of a closed range are accepted
    build_method("minilm", {"teacher_layer": -3})  # negative layers count from the end


def test_hf_layout_errors_name_config_json_keys_and_valid_sizes():
    from parallel.hf.spec import HFConversionError, check_layout, spec_from_config

    gpt2 = spec_from_config(
        {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": 768,
            "n_layer": 12,
            "n_head": 12,
            "n_positions": 1024,
            "vocab_size": 50257,
        }
    )
    with pytest.raises(HFConversionError) as info:
        check_layout(gpt2.arch, 5, 1, where="config.json", family=gpt2.family)
    message = str(info.value)
    assert "n_head=12 is not divisible by --tp=5" in message, message
    assert "valid --tp values for this model: 1, 2, 3, 4, 6, 12;" in message, message
    with pytest.raises(
        HFConversionError,
        match=r"n_layer=12 is not divisible by --pp=5.*valid --pp values: 1, 2, 3, 4, 6, 12",
    ):
        check_layout(gpt2.arch, 1, 5, where="config.json", family=gpt2.family)


def test_ranges_are_shown_by_gkd_methods_show():
    from typer.testing import CliRunner

    from gkd_cli.app import app

    result = CliRunner().invoke(app, ["methods", "show", "topk_kd"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "Range: >= 1." in text and "Range: > 0." in text, text
