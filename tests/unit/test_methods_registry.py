"""The method registry: its entries, config validation, documentation, and the README table."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from methods import registry, typed
from methods.base import Method, Stage
from methods.registry import REGISTRY, build_method, describe, markdown_table, parse_params
from methods.schedules import Linear

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[2] / "README.md"
EXPECTED = {
    "lm", "kd", "pd", "glmd", "annealing_kd", "continuation_kd", "forward_kl", "reverse_kl",
    "jsd", "skew_kl", "skew_rkl", "tvd", "topk_kd",
}  # fmt: skip


def test_registry_holds_the_logit_methods_under_their_own_names():
    assert EXPECTED <= set(REGISTRY)
    for key, spec in REGISTRY.items():
        assert key == spec.name == spec.cls.name
        assert spec.params is spec.cls.Params
        assert spec.paper and spec.signals and spec.summary
        assert spec.stages and spec.stages <= set(Stage)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_method_follows_the_conventions(name):
    spec = REGISTRY[name]
    assert spec.cls.__mro__ == (spec.cls, object), "methods share helpers, not base classes"
    assert spec.cls.__doc__, "the docstring cites the paper's definition"
    assert dataclasses.is_dataclass(spec.params)
    params = spec.params()
    fields = dataclasses.fields(spec.params)
    assert all(f.kw_only for f in fields)
    docs = typed.field_docs(spec.params)  # the one engine, as the run config
    assert set(docs) == {f.name for f in fields}, "every parameter has a docstring"
    method = build_method(name, {})
    assert isinstance(method, Method)
    assert method.params == params


def test_unknown_method_suggests_the_closest_names():
    with pytest.raises(
        ValueError, match=r"unknown distillation method 'glmdd'.*did you mean 'glmd'"
    ):
        build_method("glmdd", {})
    with pytest.raises(ValueError, match="did you mean 'forward_kl'"):
        build_method("forward_kd", {})
    with pytest.raises(ValueError, match="unknown distillation method 'zzz'"):
        build_method("zzz", {})


def test_unknown_parameter_names_the_method_the_key_and_the_valid_keys():
    with pytest.raises(ValueError) as info:
        build_method("glmd", {"temprature": 10})
    message = str(info.value)
    assert "'glmd'" in message and "'temprature'" in message
    assert "valid parameters: temperature" in message
    assert "did you mean 'temperature'" in message


def test_missing_required_parameter(monkeypatch):
    @dataclasses.dataclass(kw_only=True, frozen=True)
    class NeedsK:
        k: int
        """Required."""

    class Dummy:
        name = "dummy"
        stages = frozenset({Stage.TASK})
        paper = "none"
        signals = "logits"
        Params = NeedsK

        def __init__(self, params):
            self.params = params

    monkeypatch.setitem(REGISTRY, "dummy", registry._spec(Dummy))
    with pytest.raises(ValueError, match="'dummy' needs parameter.*k"):
        build_method("dummy", {})
    assert build_method("dummy", {"k": 3}).params.k == 3
    assert describe("dummy")[0].required


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("kd", {"temperature": "hot"}, "kd.temperature: expected a number"),
        ("kd", {"soft_loss": "mse"}, "kd.soft_loss: 'mse' is not one of ce, kl"),
        ("topk_kd", {"k": 2.5}, "topk_kd.k: expected an integer"),
        ("topk_kd", {"k": True}, "topk_kd.k: expected an integer"),
        ("jsd", {"beta": 1.5}, r"jsd.beta=1.5 must be in \[0, 1\]"),
        ("kd", {"temperature": {"type": "cosine"}}, "kd.temperature.type"),
    ],
)
def test_bad_values_name_the_field(name, params, message):
    with pytest.raises(ValueError, match=message):
        build_method(name, params)


def test_schedulable_parameters_accept_schedules():
    params = parse_params("kd", {"temperature": {"type": "linear", "start": 10, "end": 1}})
    assert params.temperature == Linear(start=10.0, end=1.0)
    assert parse_params("glmd", {"temperature": 15}).temperature == 15.0


def test_describe_lists_defaults_and_help():
    docs = {d.name: d for d in describe("kd")}
    assert set(docs) == {"temperature", "soft_loss", "soft_weight", "hard_weight"}
    assert docs["temperature"].default == 10.0
    assert docs["temperature"].type == "number or schedule"
    assert "temperature" in docs["temperature"].help.lower()
    assert not docs["temperature"].required
    theseus = {d.name: d for d in describe("theseus")}
    assert theseus["replace_rate"].default == {
        "type": "linear", "start": 0.3, "end": 1.0, "until": 0.66,
    }  # fmt: skip
    continuation = {d.name: d for d in describe("continuation_kd")}
    assert continuation["psi_switch"].default == 0.666
    assert describe("glmd")[0].default == 15.0


def test_markdown_table_has_one_row_per_method():
    table = markdown_table().splitlines()
    assert table[0] == "| name | paper | signals | stage |"
    assert table[1] == "|---|---|---|---|"
    rows = table[2:]
    assert [re.match(r"\| `([a-z_0-9]+)` \|", row).group(1) for row in rows] == list(REGISTRY)
    glmd = next(row for row in rows if row.startswith("| `glmd`"))
    assert glmd.endswith("| PT+TS |")
    assert next(row for row in rows if row.startswith("| `kd`")).endswith("| TS |")


def test_readme_embeds_the_current_table():
    if not README.exists():
        pytest.skip("README.md does not exist yet; the methods table check runs once it does")
    text = README.read_text()
    match = re.search(r"<!-- methods:start -->\n(.*?)\n?<!-- methods:end -->", text, re.S)
    assert match, "README.md needs a <!-- methods:start --> ... <!-- methods:end --> block"
    assert match.group(1).strip() == markdown_table().strip(), (
        "README.md's methods table is stale: paste methods.registry.markdown_table() between the "
        "methods:start/end markers"
    )
