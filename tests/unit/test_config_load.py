"""Config loading: YAML -> typed sections, overrides, type errors, malformed YAML, round trip.

Also holds the helpers other CLI/config tests import (a valid tiny config with real files, a fake
methods registry with the agreed API).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gkd_cli.config import (
    DataConfig,
    DistillConfig,
    ModelConfig,
    describe_section,
    dump_config,
    field_docs,
    load_config,
)
from gkd_cli.errors import ConfigError
from parallel.config import ModelArch, ParallelConfig, TrainConfig

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------------------------
# Helpers shared with the other test_config_* / test_cli_* files
# ---------------------------------------------------------------------------------------------


SAMPLE_TEXT = "\n\n".join(
    f"Document {i}: the teacher distills its knowledge into a smaller student, step after step."
    for i in range(12)
)


@functools.cache
def _sample_tokenizer_json() -> str:
    """A real byte-level BPE (a few hundred tokens) trained on SAMPLE_TEXT, built once."""
    import tempfile

    from gkd_cli.data import train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "sample.txt"
        text.write_text(SAMPLE_TEXT)
        train_bpe([text], 300, Path(tmp) / "tokenizer.json")
        return (Path(tmp) / "tokenizer.json").read_text()


def base_config(tmp_path: Path) -> dict[str, Any]:
    """A valid tiny config (as parsed YAML) whose files exist under ``tmp_path``."""
    train = tmp_path / "train.txt"
    train.write_text(SAMPLE_TEXT)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(_sample_tokenizer_json())
    return {
        "teacher": {
            "num_layers": 4,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "vocab_size": 512,
            "max_seq_len": 64,
            "init": "random",
        },
        "student": {
            "num_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "vocab_size": 512,
            "max_seq_len": 64,
        },
        "methods": [{"name": "glmd", "weight": 1.0}],
        "parallel": {"tp": 2, "pp": 1, "dp": 1},
        "data": {"tokenizer": str(tokenizer), "train_files": [str(train)], "seq_length": 32},
        "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2},
        "output": {"dir": str(tmp_path / "run")},
    }


def write_yaml(tmp_path: Path, data: Any, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass(kw_only=True)
class FakeGlmdParams:
    temperature: float = 15.0
    """Softmax temperature T."""
    chunk_tokens: int = 1024
    """Tokens per loss chunk."""


@dataclass(kw_only=True)
class FakeKdParams:
    temperature: float = 10.0
    """Softmax temperature T."""


@dataclass(kw_only=True)
class FakeSpec:
    name: str
    cls: type
    params: type
    paper: str
    signals: tuple[str, ...]
    stages: frozenset[str]
    summary: str


@dataclass(kw_only=True)
class FakeLmParams:
    """No parameters."""


def install_fake_registry(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Put a small ``methods.registry`` (REGISTRY, build_method; no describe) into
    ``sys.modules`` in place of the real package, so these tests do not depend on it."""
    registry = types.ModuleType("methods.registry")
    registry.REGISTRY = {
        "glmd": FakeSpec(
            name="glmd",
            cls=object,
            params=FakeGlmdParams,
            paper="Tan et al. 2023 (GLMD)",
            signals=("logits",),
            stages=frozenset({"pretrain", "task"}),
            summary="KL at temperature T over all vocabulary logits",
        ),
        "lm": FakeSpec(
            name="lm",
            cls=object,
            params=FakeLmParams,
            paper="next-token cross entropy",
            signals=("student logits",),
            stages=frozenset({"pretrain", "task"}),
            summary="the student's own LM loss",
        ),
        "kd": FakeSpec(
            name="kd",
            cls=object,
            params=FakeKdParams,
            paper="Hinton et al. 2015",
            signals=("logits",),
            stages=frozenset({"task"}),
            summary="soft cross entropy + hard loss",
        ),
    }

    def build_method(name: str, params: dict[str, Any], ctx: Any = None):
        import difflib

        if name not in registry.REGISTRY:
            close = difflib.get_close_matches(name, list(registry.REGISTRY), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown method '{name}'{hint}")
        spec = registry.REGISTRY[name]
        names = {f.name for f in dataclasses.fields(spec.params)}
        for key in params:
            if key not in names:
                raise ValueError(f"unknown parameter '{key}' of {name}")
        return spec.params(**params)

    registry.build_method = build_method
    package = types.ModuleType("methods")
    package.__path__ = []  # a package with nothing else in it: the real one imports the registry
    package.registry = registry
    monkeypatch.setitem(sys.modules, "methods", package)
    monkeypatch.setitem(sys.modules, "methods.registry", registry)
    return registry


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch):
    return install_fake_registry(monkeypatch)


def load(tmp_path: Path, data: dict, overrides=(), **kwargs) -> DistillConfig:
    return load_config(write_yaml(tmp_path, data), overrides, **kwargs)


def error_of(tmp_path: Path, data: dict, overrides=(), **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data, overrides, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_valid_config_builds_typed_sections(tmp_path):
    cfg = load(tmp_path, base_config(tmp_path))
    assert isinstance(cfg.teacher, ModelConfig) and isinstance(cfg.teacher, ModelArch)
    assert isinstance(cfg.parallel, ParallelConfig) and isinstance(cfg.train, TrainConfig)
    assert isinstance(cfg.data, DataConfig)
    assert cfg.teacher.num_layers == 4 and cfg.student.hidden_size == 32
    assert cfg.parallel.world_size == 2
    assert cfg.methods == [{"name": "glmd", "weight": 1.0}]
    # defaults filled in from the dataclasses
    assert cfg.train.lr == TrainConfig().lr and cfg.data.format == "text"
    assert cfg.teacher.arch() == ModelArch(
        num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=512, max_seq_len=64
    )


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    data = base_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    data["data"]["tokenizer"] = "tokenizer.json"
    data["output"]["dir"] = "runs/x"
    cfg = load(tmp_path, data)
    assert cfg.data.tokenizer == str(tmp_path / "tokenizer.json")
    assert cfg.output.dir == str(tmp_path / "runs" / "x")


def test_number_without_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as a string; a float field must still accept it.
    data = base_config(tmp_path)
    data["train"]["lr"] = "1e-3"
    cfg = load(tmp_path, data, ["train.min_lr=1e-5"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.min_lr == pytest.approx(1e-5)


def test_overrides_are_typed_yaml_values(tmp_path):
    cfg = load(
        tmp_path,
        base_config(tmp_path),
        [
            "parallel.tp=4",
            "train.lr=1e-4",
            "parallel.sequence_parallel=true",
            "methods.0.temperature=10",
            "methods.1.name=kd",
            "data.valid_files=[]",
            "train.global_batch_size=8",
        ],
    )
    assert cfg.parallel.tp == 4 and cfg.parallel.sequence_parallel is True
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.methods[0] == {"name": "glmd", "weight": 1.0, "temperature": 10}
    assert cfg.methods[1] == {"name": "kd", "weight": 1.0}
    assert cfg.data.valid_files == []


def test_override_creates_missing_section(tmp_path):
    data = base_config(tmp_path)
    del data["parallel"]
    cfg = load(tmp_path, data, ["parallel.tp=4"])
    assert cfg.parallel.tp == 4 and cfg.parallel.pp == 1


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr", "must look like section.key=value"),
        ("trian.lr=1", "did you mean 'train'"),
        ("methods.5.temperature=1", "list index from 0 to 1"),
        ("train.steps.x=1", "'train.steps' is a value"),
        ("train.lr.x=1", "train.lr: expected a number"),
    ],
)
def test_bad_overrides_name_the_problem(tmp_path, override, expected):
    assert expected in str(error_of(tmp_path, base_config(tmp_path), [override]))


def test_unknown_key_suggests_the_close_one(tmp_path):
    data = base_config(tmp_path)
    data["teacher"]["num_layer"] = data["teacher"].pop("num_layers")
    err = error_of(tmp_path, data)
    assert "unknown key 'teacher.num_layer'" in str(err)
    assert "did you mean 'teacher.num_layers'" in str(err)
    assert err.field == "teacher.num_layer"


def test_unknown_section(tmp_path):
    data = base_config(tmp_path)
    data["optimizer"] = {"lr": 1}
    assert "unknown section 'optimizer'" in str(error_of(tmp_path, data))


def test_unknown_key_from_override(tmp_path):
    err = error_of(tmp_path, base_config(tmp_path), ["train.learning_rate=1e-4"])
    assert "unknown key 'train.learning_rate'" in str(err)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("teacher", "num_layers", "four", "teacher.num_layers: expected an integer, got 'four'"),
        ("teacher", "num_layers", True, "teacher.num_layers: expected an integer"),
        ("teacher", "num_layers", 2.5, "teacher.num_layers: expected an integer"),
        ("train", "lr", [1], "train.lr: expected a number"),
        ("train", "lr", "fast", "train.lr: expected a number"),
        ("parallel", "sequence_parallel", "yes please", "expected true or false"),
        ("data", "train_files", 3, "data.train_files: expected a list"),
        ("train", "decay", "cosin", "did you mean 'cosine'"),
        ("teacher", "init", "rand", "did you mean 'random'"),
        ("teacher", "ffn_hidden_size", "wide", "teacher.ffn_hidden_size: expected an integer"),
    ],
)
def test_wrong_types_name_field_and_expected_type(tmp_path, section, key, value, expected):
    data = base_config(tmp_path)
    data[section][key] = value
    assert expected in str(error_of(tmp_path, data))


def test_optional_int_accepts_null(tmp_path):
    data = base_config(tmp_path)
    data["teacher"]["ffn_hidden_size"] = None
    assert load(tmp_path, data).teacher.ffn_hidden_size is None


def test_single_file_is_a_list_of_one(tmp_path):
    data = base_config(tmp_path)
    data["data"]["train_files"] = data["data"]["train_files"][0]
    assert load(tmp_path, data).data.train_files == [str(tmp_path / "train.txt")]


def test_missing_required_key_quotes_its_help(tmp_path):
    data = base_config(tmp_path)
    del data["teacher"]["vocab_size"]
    err = str(error_of(tmp_path, data))
    assert "teacher.vocab_size is required" in err
    assert "tokenizer" in err  # the field's docstring: "Real vocabulary size (the tokenizer's)"


def test_missing_section(tmp_path):
    data = base_config(tmp_path)
    del data["output"]
    assert "section 'output' is required" in str(error_of(tmp_path, data))


@pytest.mark.parametrize(
    ("methods", "expected"),
    [
        ("glmd", "methods: expected a list"),
        ([{"weight": 1.0}], "methods.0.name is required"),
        ([{"name": "glmd", "weight": "heavy"}], "methods.0.weight: expected a number"),
        ([{"name": "glmd", "weight": -1}], "methods.0.weight=-1 must be >= 0"),
        ([], "methods is empty"),
    ],
)
def test_method_entries_are_checked(tmp_path, methods, expected):
    data = base_config(tmp_path)
    data["methods"] = methods
    assert expected in str(error_of(tmp_path, data))


def test_method_shorthand_string(tmp_path):
    data = base_config(tmp_path)
    data["methods"] = ["glmd", {"name": "kd", "weight": 0.5, "temperature": 2}]
    cfg = load(tmp_path, data)
    assert cfg.methods == [
        {"name": "glmd", "weight": 1.0},
        {"name": "kd", "weight": 0.5, "temperature": 2},
    ]


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("teacher:\n  num_layers: 4\n  hidden_size: [64\nstudent: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "malformed YAML" in message
    # the unclosed flow sequence opened on line 3 is reported at the line where it breaks
    line = int(message.split(str(path) + ":")[1].split(":")[0])
    assert 3 <= line <= 4


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


# ---------------------------------------------------------------------------------------------
# Round trip and help
# ---------------------------------------------------------------------------------------------


def test_dump_round_trips(tmp_path):
    data = base_config(tmp_path)
    data["methods"] = [{"name": "glmd", "weight": 0.7, "temperature": 15}]
    data["train"]["lr"] = 3.0e-4
    cfg = load(tmp_path, data, ["parallel.sequence_parallel=true", "train.recompute=full"])
    text = dump_config(cfg)
    again = load_config(write_yaml(tmp_path, yaml.safe_load(text), "dumped.yaml"))
    assert again == cfg
    (tmp_path / "verbatim.yaml").write_text(text)
    assert load_config(tmp_path / "verbatim.yaml") == cfg


def test_field_docs_include_inherited_fields():
    docs = field_docs(ModelConfig)
    assert docs["num_layers"] == "Number of transformer layers."
    assert docs["checkpoint"].startswith("Teacher: the gkd checkpoint directory")
    # every field of every section has help text
    for section in ("teacher", "parallel", "data", "train", "output"):
        for row in describe_section(section):
            assert row.help, row.key


def test_describe_section_rows():
    rows = {row.key: row for row in describe_section("train")}
    assert rows["train.global_batch_size"].default == "8"
    assert rows["train.decay"].type == "cosine | linear | constant"
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        describe_section("trian")


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[2] / "gkd_cli" / "configs"
    demo = load_config(root / "demo.yaml", check_paths=False)
    assert (demo.teacher.num_layers, demo.teacher.hidden_size) == (4, 256)
    assert (demo.student.num_layers, demo.student.hidden_size) == (2, 128)
    big = load_config(root / "llama_100b_to_7b.yaml", check_paths=False)
    assert 95e9 < big.teacher.num_parameters() < 105e9
    assert 6e9 < big.student.num_parameters() < 8e9
    assert big.parallel.world_size == 8
