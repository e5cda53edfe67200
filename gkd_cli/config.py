"""The distillation config: one YAML file -> typed, keyword-only dataclasses, validated before
anything is launched.

``load_config(path, overrides)`` parses the file, applies ``section.key=value`` overrides (values
are YAML: ``train.lr=1e-4``, ``parallel.tp=2``, ``methods.0.temperature=10``), builds the typed
tree (unknown keys, wrong types and bad choices are reported with the field's dotted name) and
runs :func:`validate` (layouts, batch sizes, world size, paths, vocabularies, methods). Every
problem raises :class:`~gkd_cli.errors.ConfigError` naming the field and the fix.

``dump_config(cfg)`` writes YAML that ``load_config`` reads back to an equal config; the launcher
writes it to ``<output.dir>/config.yaml`` and the workers read that file.

Each field's docstring is its help text (``gkd config fields`` prints them). Nothing here imports
megatron-core or torch: the config is checked on a login node.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import glob
import inspect
import json
import os
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gkd_cli.errors import ConfigError
from parallel.config import ModelArch, ParallelConfig, TrainConfig

SUPERGLUE_TASKS = ("BoolQ", "CB", "COPA", "MultiRC", "ReCoRD", "RTE", "WiC", "WSC")
"""The eight SuperGLUE tasks, spelled as the official release (and its folder names) spell them."""

MAPPING_METADATA_KEY = "gkd_vocab"
"""Safetensors metadata key under which ``gkd compress-vocab`` stores its JSON metadata."""
MAPPING_COMPRESSED_KEYS = ("compressed_vocab_size", "compressed_size")
"""Safetensors metadata keys of a vocabulary mapping that may hold the compressed size."""
MAPPING_ORIGINAL_KEYS = ("original_vocab_size", "vocab_size")
"""Safetensors metadata keys of a vocabulary mapping that may hold the teacher's size."""


# ---------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ModelConfig(ModelArch):
    """A teacher or student: its architecture (the ``ModelArch`` fields) and where its weights
    come from."""

    checkpoint: str | None = None
    """Teacher: the gkd checkpoint directory to load (required). Student: an optional checkpoint
    to initialize from (default: random initialization)."""
    init: Literal["checkpoint", "random"] | None = None
    """How the weights start: ``checkpoint`` (load ``checkpoint``) or ``random``. Default:
    ``checkpoint`` when one is given, else ``random`` for the student. A teacher with random
    weights is only useful for tests and demos, so it must be asked for explicitly."""

    def arch(self) -> ModelArch:
        """The plain architecture, as ``parallel/`` takes it."""
        names = {f.name for f in dataclasses.fields(ModelArch)}
        return ModelArch(**{n: getattr(self, n) for n in names})


@dataclass(kw_only=True)
class DataConfig:
    """Where the training tokens come from."""

    tokenizer: str
    """Path of the tokenizer (a Hugging Face ``tokenizer.json`` or a directory holding one)."""
    source: Literal["corpus", "superglue"] = "corpus"
    """``corpus``: the files in ``train_files``; ``superglue``: the SuperGLUE tasks in
    ``superglue_tasks`` read from ``superglue_dir``."""
    train_files: list[str] = field(default_factory=list)
    """Training files (globs allowed) when ``source`` is ``corpus``."""
    valid_files: list[str] = field(default_factory=list)
    """Validation files (globs allowed); empty: no validation."""
    format: Literal["text", "jsonl"] = "text"
    """File format: plain text (one document per blank-line separated block) or JSON lines."""
    text_field: str = "text"
    """JSON key holding the text when ``format`` is ``jsonl``."""
    seq_length: int = 1024
    """Tokens per training sequence; at most both models' ``max_seq_len``."""
    cache_dir: str | None = None
    """Where tokenized shards are cached; default ``<output.dir>/cache``."""
    vocab_mapping: str | None = None
    """Compressed-vocabulary mapping file (``gkd compress-vocab``); when set, the student's
    ``vocab_size`` is the compressed size and the teacher's logits are restricted to kept tokens."""
    superglue_tasks: list[str] = field(default_factory=list)
    """SuperGLUE tasks to read when ``source`` is ``superglue`` (BoolQ, CB, COPA, MultiRC,
    ReCoRD, RTE, WiC, WSC)."""
    superglue_split: Literal["train", "val", "dev32", "unlabeled"] = "train"
    """Which file of each task to read."""
    superglue_dir: str | None = None
    """Folder holding one sub-folder per task (``BoolQ/train.jsonl``, ...)."""


@dataclass(kw_only=True)
class OutputConfig:
    """Where the run writes checkpoints, metrics and logs."""

    dir: str
    """Run directory: checkpoints, ``config.yaml``, ``metrics.jsonl`` and ``logs/``."""
    save_every: int = 1000
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Keep only the newest N checkpoints (0: keep all)."""
    resume: bool = False
    """Continue from the newest checkpoint in ``dir`` (set by ``gkd distill --resume``)."""


@dataclass(kw_only=True)
class DistillConfig:
    """A distillation run: the two models, the methods, the layout, the data, the optimization
    and the outputs."""

    student: ModelConfig
    """The trained student."""
    teacher: ModelConfig | None = None
    """The frozen teacher. Omit it to pre-train the student alone (GKD's ``pd`` first stage,
    or a teacher for the demo): then only teacher-free methods (``lm``) are allowed."""
    teachers: list[ModelConfig] | None = None
    """Several frozen teachers instead of ``teacher`` (multi-teacher methods: tmkd, mt_bert,
    uncertainty, rl_kd, dgkd), each sharded like the single teacher and sharing the student's
    vocabulary; single-teacher methods use the first. Give ``teacher`` or ``teachers``, not both."""
    methods: list[dict[str, Any]]
    """Distillation methods, each ``{name: ..., weight: 1.0, <method parameters>}``; the terms
    are weighted and summed (``gkd methods list`` shows the names)."""
    data: DataConfig
    """Training data."""
    output: OutputConfig
    """Run directory and checkpointing."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/pipeline/data parallel layout (teacher and student share it)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization of the student."""


SECTIONS: dict[str, type] = {
    "teacher": ModelConfig,
    "student": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "output": OutputConfig,
}
"""Config sections backed by a dataclass (``methods`` is a list of free-form mappings)."""


# ---------------------------------------------------------------------------------------------
# Field help (the docstring under each field)
# ---------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: docstring}`` of a dataclass, read from the string literal under each field
    (inherited fields included; a subclass's docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        if not isinstance(body, ast.ClassDef):
            continue
        statements = body.body
        for stmt, nxt in zip(statements, statements[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                text = " ".join(nxt.value.value.split())
                docs[stmt.target.id] = text.replace("``", "")  # reST literals read as plain text
    return docs


@dataclass(frozen=True, kw_only=True)
class FieldHelp:
    """One row of the config reference."""

    key: str
    type: str
    default: str
    help: str


def describe_section(name: str) -> list[FieldHelp]:
    """The reference of one section (``teacher``, ``train``, ...): key, type, default, help."""
    if name == "methods":
        return [
            FieldHelp(
                key="methods.N.name",
                type="str",
                default="(required)",
                help="Method name (gkd methods list).",
            ),
            FieldHelp(
                key="methods.N.weight",
                type="float",
                default="1.0",
                help="Weight of the method's terms in the total loss.",
            ),
            FieldHelp(
                key="methods.N.<param>",
                type="any",
                default="",
                help="The method's parameters (gkd methods show NAME).",
            ),
        ]
    if name == "teachers":
        return [
            dataclasses.replace(row, key=row.key.replace("teachers.", "teachers.N.", 1))
            for row in describe_section_of(ModelConfig, "teachers")
        ]
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section '{name}'{_did_you_mean(name, _section_names())}")
    return describe_section_of(SECTIONS[name], name)


def describe_section_of(cls: type, name: str) -> list[FieldHelp]:
    """The reference rows of dataclass ``cls`` under the key prefix ``name``."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        rows.append(
            FieldHelp(
                key=f"{name}.{f.name}",
                type=_type_name(hints[f.name]),
                default=_default_text(f),
                help=docs.get(f.name, ""),
            )
        )
    return rows


def _section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(DistillConfig)]


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        if f.default is None or isinstance(f.default, bool):
            return yaml.safe_dump(f.default).split("\n")[0]  # null, true, false as YAML spells them
        return repr(f.default).strip("'")
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


# ---------------------------------------------------------------------------------------------
# Building typed sections from YAML data
# ---------------------------------------------------------------------------------------------


def _did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe_value(value: Any) -> str:
    return f"{value!r} ({'null' if value is None else type(value).__name__})"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` (parsed YAML) against the annotation ``tp``; return it typed."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
        else:
            problems = []
            for option in options:
                if option is type(None):
                    continue
                try:
                    return _coerce(value, option, where)
                except ConfigError as err:
                    problems.append(str(err))
            if len(problems) == 1:
                raise ConfigError(problems[0], field=where)
        raise ConfigError(
            f"{where}: expected {_type_name(tp)}, got {_describe_value(value)}", field=where
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        hint = _did_you_mean(str(value), [str(c) for c in choices])
        raise ConfigError(
            f"{where}: {value!r} is not one of {', '.join(map(str, choices))}{hint}", field=where
        )
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) and item_tp is str:
            value = [value]  # a single file is a list of one
        if not isinstance(value, list):
            raise ConfigError(
                f"{where}: expected a list, got {_describe_value(value)}", field=where
            )
        return [_coerce(v, item_tp, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where}: expected a mapping, got {_describe_value(value)}", field=where
            )
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and not isinstance(value, bool):
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; it is clearly a number here.
            try:
                return float(value)
            except ValueError:
                pass
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(
        f"{where}: expected {_EXPECTED.get(tp, _type_name(tp))}, got {_describe_value(value)}",
        field=where,
    )


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, naming ``where.key`` in every error."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of keys to values, got {_describe_value(data)}",
            field=where,
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"unknown key '{where}.{key}'{_did_you_mean(str(key), fields, f'{where}.')}"
                f" (valid keys of {where}: {', '.join(fields)})",
                field=f"{where}.{key}",
            )
    kwargs = {}
    docs = None
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            docs = docs if docs is not None else field_docs(cls)
            help_text = f" ({docs[name]})" if docs.get(name) else ""
            raise ConfigError(
                f"{where}.{name} is required{help_text}; add '{name}:' under '{where}:'",
                field=f"{where}.{name}",
            )
    return cls(**kwargs)


def _build_methods(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ConfigError(
            f"methods: expected a list of {{name: ..., weight: ...}} entries, got "
            f"{_describe_value(value)}",
            field="methods",
        )
    methods = []
    for i, entry in enumerate(value):
        where = f"methods.{i}"
        if isinstance(entry, str):
            entry = {"name": entry}  # "- glmd" is shorthand for "- name: glmd"
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"{where}: expected a mapping like {{name: glmd, weight: 1.0}}, got "
                f"{_describe_value(entry)}",
                field=where,
            )
        entry = dict(entry)
        if not isinstance(entry.get("name"), str):
            raise ConfigError(
                f"{where}.name is required (a method name; gkd methods list shows them)",
                field=f"{where}.name",
            )
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float | Mapping):
            raise ConfigError(
                f"{where}.weight: expected a number (or a schedule mapping), got "
                f"{_describe_value(weight)}",
                field=f"{where}.weight",
            )
        if isinstance(weight, int | float):
            if weight < 0:
                raise ConfigError(f"{where}.weight={weight} must be >= 0", field=f"{where}.weight")
            weight = float(weight)
        entry["weight"] = weight
        methods.append(entry)
    return methods


def build_config(data: Any) -> DistillConfig:
    """The typed config from a parsed YAML mapping (no cross-field validation; see
    :func:`validate`)."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"the config must be a mapping of sections ({', '.join(_section_names())}), got "
            f"{_describe_value(data)}"
        )
    sections = _section_names()
    for key in data:
        if key not in sections:
            raise ConfigError(
                f"unknown section '{key}'{_did_you_mean(str(key), sections)}"
                f" (valid sections: {', '.join(sections)})",
                field=str(key),
            )
    kwargs: dict[str, Any] = {}
    for name in sections:
        if name == "methods":
            if "methods" not in data:
                raise ConfigError(
                    "methods is required: a list such as '- name: glmd' (gkd methods list)",
                    field="methods",
                )
            kwargs["methods"] = _build_methods(data["methods"])
        elif name == "teacher" and name in data and data[name] is None:
            kwargs[name] = None  # no teacher: the student trains alone
        elif name == "teachers":
            if data.get(name) is not None:
                kwargs[name] = _coerce(data[name], list[ModelConfig], name)
        elif name in data:
            kwargs[name] = _build(
                SECTIONS[name], data[name] if data[name] is not None else {}, name
            )
        elif name in ("student", "data", "output"):
            raise ConfigError(f"section '{name}' is required", field=name)
    return DistillConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Files and overrides
# ---------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: PyYAML keeps the last
    silently, so a second ``train:`` section would replace the first without a word."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # '<<: *anchor' merges may repeat keys on purpose
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if isinstance(key, typing.Hashable) and key in seen:
            raise ConfigError(
                f"{key_node.start_mark.name}:{line}: key '{key}' is given twice (first on line "
                f"{seen[key]}); YAML would silently keep only the second: merge the two into one "
                f"'{key}:' entry"
            )
        if isinstance(key, typing.Hashable):
            seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def parse_yaml(text: str, name: str = "<config>") -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (``ConfigError`` naming the key and lines)."""
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file; malformed YAML is a ``ConfigError`` naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        return parse_yaml(text, str(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(f"{where}: malformed YAML: {detail}") from None


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to parsed YAML (in place; also returned). Values are
    parsed as YAML; list entries are addressed by index (``methods.0.temperature=10``; index
    ``len`` appends)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"override '{override}' must look like section.key=value (e.g. train.lr=1e-4)"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        if parts[0] not in _section_names():
            raise ConfigError(
                f"override '{override}': unknown section '{parts[0]}'"
                f"{_did_you_mean(parts[0], _section_names())}",
                field=key,
            )
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) > len(node):
                    raise ConfigError(
                        f"override '{override}': '{here}' needs a list index from 0 to {len(node)}",
                        field=key,
                    )
                index = int(part)
                if index == len(node):
                    node.append(None if last else {})
                if last:
                    node[index] = value
                else:
                    if node[index] is None:
                        node[index] = {}
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = [] if part == "methods" else {}
                    node = node[part]
            else:
                raise ConfigError(
                    f"override '{override}': '{'.'.join(parts[:depth])}' is a value, not a section",
                    field=key,
                )
    return data


def load_config(
    path: str | os.PathLike,
    overrides: Iterable[str] = (),
    *,
    environ: Mapping[str, str] | None = None,
    check_paths: bool = True,
) -> DistillConfig:
    """Read, override, type-check and validate a config file. Relative paths in it are taken
    relative to the current directory and made absolute (the workers may run elsewhere).

    ``environ`` (e.g. ``os.environ``) lets validation check the world size of a torchrun or Slurm
    environment; ``check_paths=False`` skips the existence checks (``gkd plan`` on a login node).
    """
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, not a list or value"
        )
    apply_overrides(data, overrides)
    cfg = build_config(data)
    cfg = absolutize_paths(cfg)
    validate(cfg, environ=environ, check_paths=check_paths)
    return cfg


def load_config_text(text: str, overrides: Iterable[str] = (), **kwargs: Any) -> DistillConfig:
    """:func:`load_config` from a YAML string (tests, notebooks)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(text)
    try:
        return load_config(handle.name, overrides, **kwargs)
    finally:
        os.unlink(handle.name)


def dump_config(cfg: DistillConfig) -> str:
    """YAML of the whole resolved config (defaults included); ``load_config`` reads it back to
    an equal config."""
    data = dataclasses.asdict(cfg)
    header = "# Resolved gkd config: every default spelled out. Written by gkd; edit the source.\n"
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


def write_config(cfg: DistillConfig, path: str | os.PathLike) -> Path:
    """Write :func:`dump_config` to ``path`` atomically (several nodes may write the same file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dump_config(cfg), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _absolute_or_none(path: str | None) -> str | None:
    return None if path is None else _absolute(path)


def absolutize_paths(cfg: DistillConfig) -> DistillConfig:
    """A copy of ``cfg`` with every path absolute."""
    teacher = cfg.teacher and dataclasses.replace(
        cfg.teacher, checkpoint=_absolute_or_none(cfg.teacher.checkpoint)
    )
    teachers = cfg.teachers and [
        dataclasses.replace(t, checkpoint=_absolute_or_none(t.checkpoint)) for t in cfg.teachers
    ]
    student = dataclasses.replace(cfg.student, checkpoint=_absolute_or_none(cfg.student.checkpoint))
    d = cfg.data
    data = dataclasses.replace(
        d,
        tokenizer=_absolute(d.tokenizer),
        train_files=[_absolute(p) for p in d.train_files],
        valid_files=[_absolute(p) for p in d.valid_files],
        cache_dir=_absolute_or_none(d.cache_dir),
        vocab_mapping=_absolute_or_none(d.vocab_mapping),
        superglue_dir=_absolute_or_none(d.superglue_dir),
    )
    output = dataclasses.replace(cfg.output, dir=_absolute(cfg.output.dir))
    return dataclasses.replace(
        cfg, teacher=teacher, teachers=teachers, student=student, data=data, output=output
    )


# ---------------------------------------------------------------------------------------------
# Validation across fields
# ---------------------------------------------------------------------------------------------


def teacher_roles(cfg: DistillConfig) -> list[tuple[str, ModelConfig]]:
    """``[(role, teacher)]``: ``("teacher", t)``, or ``("teachers.0", t0), ...``, or ``[]``."""
    if cfg.teacher is not None:
        return [("teacher", cfg.teacher)]
    return [(f"teachers.{i}", t) for i, t in enumerate(cfg.teachers or [])]


def teacher_configs(cfg: DistillConfig) -> list[ModelConfig]:
    """The run's teachers in order (``teacher`` or ``teachers``; empty without one)."""
    return [t for _, t in teacher_roles(cfg)]


def first_teacher(cfg: DistillConfig) -> ModelConfig | None:
    """The teacher single-teacher methods (and the vocabulary checks) use."""
    teachers = teacher_configs(cfg)
    return teachers[0] if teachers else None


def model_roles(cfg: DistillConfig) -> list[tuple[str, ModelConfig]]:
    """``[(role, model)]`` of the models present (teachers are optional)."""
    return [*teacher_roles(cfg), ("student", cfg.student)]


def reference_vocab_size(cfg: DistillConfig) -> int:
    """Size of the vocabulary the data's token ids index: the (first) teacher's, or the
    student's when it trains alone."""
    teacher = first_teacher(cfg)
    return teacher.vocab_size if teacher is not None else cfg.student.vocab_size


def validate(
    cfg: DistillConfig,
    *,
    environ: Mapping[str, str] | None = None,
    check_paths: bool = True,
) -> None:
    """Check everything that can be checked before launching; raise ``ConfigError`` on the first
    problem, naming the field and the fix."""
    _check_ranges(cfg)
    _check_layout(cfg)
    _check_batch(cfg)
    if environ is not None:
        check_world_size(cfg, environ)
    _check_sequence(cfg)
    _check_models(cfg)
    _check_vocab(cfg, check_paths=check_paths)
    if check_paths:
        _check_paths(cfg)
    _check_methods(cfg)


def _positive(value: int | float, name: str, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value} must be {bound}", field=name)


def _check_ranges(cfg: DistillConfig) -> None:
    for role, m in model_roles(cfg):
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "vocab_size",
            "max_seq_len",
        ):
            _positive(getattr(m, name), f"{role}.{name}")
        for name in ("ffn_hidden_size", "num_query_groups", "kv_channels"):
            if getattr(m, name) is not None:
                _positive(getattr(m, name), f"{role}.{name}")
        _positive(m.norm_epsilon, f"{role}.norm_epsilon")
    p = cfg.parallel
    for name in ("tp", "pp", "dp", "nnodes"):
        _positive(getattr(p, name), f"parallel.{name}")
    if p.timeout_minutes is not None:
        _positive(p.timeout_minutes, "parallel.timeout_minutes")
    t = cfg.train
    for name in ("steps", "global_batch_size", "micro_batch_size", "log_every"):
        _positive(getattr(t, name), f"train.{name}")
    for name in ("warmup_steps", "weight_decay", "clip_grad", "min_lr"):
        _positive(getattr(t, name), f"train.{name}", allow_zero=True)
    _positive(t.lr, "train.lr")
    if t.min_lr > t.lr:
        raise ConfigError(
            f"train.min_lr={t.min_lr} is above train.lr={t.lr}; lower min_lr", field="train.min_lr"
        )
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise ConfigError(
                f"train.{name}={getattr(t, name)} must be in [0, 1)", field=f"train.{name}"
            )
    if t.warmup_steps > t.steps:
        raise ConfigError(
            f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}",
            field="train.warmup_steps",
        )
    _positive(cfg.data.seq_length, "data.seq_length")
    _positive(cfg.output.save_every, "output.save_every", allow_zero=True)
    _positive(cfg.output.keep_last, "output.keep_last", allow_zero=True)


def _check_layout(cfg: DistillConfig) -> None:
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    for role, model in model_roles(cfg):
        try:
            model.check_parallel(tp, pp, where=role)
        except ValueError as err:
            raise ConfigError(str(err), field=role) from None
    world, nnodes = cfg.parallel.world_size, cfg.parallel.nnodes
    if world % nnodes:
        raise ConfigError(
            f"parallel.tp x pp x dp = {world} processes cannot be split evenly over "
            f"parallel.nnodes={nnodes}; use a node count that divides {world}",
            field="parallel.nnodes",
        )


def _check_batch(cfg: DistillConfig) -> None:
    t, dp = cfg.train, cfg.parallel.dp
    step = t.micro_batch_size * dp
    if t.global_batch_size % step:
        lower = max(step, t.global_batch_size // step * step)
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size x parallel.dp = {t.micro_batch_size} x {dp} = {step}; "
            f"use a multiple of {step} (e.g. {lower} or {lower + step})",
            field="train.global_batch_size",
        )


def environment_world_size(environ: Mapping[str, str]) -> tuple[int, str] | None:
    """The number of processes the surrounding launcher provides, and where that number comes
    from, when it is known: torchrun's ``WORLD_SIZE``, or a Slurm allocation's nodes x GPUs."""
    if environ.get("WORLD_SIZE", "").isdigit():
        return int(environ["WORLD_SIZE"]), "WORLD_SIZE (torchrun)"
    nodes = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
    gpus = environ.get("SLURM_GPUS_ON_NODE")
    if nodes and nodes.isdigit() and gpus and gpus.isdigit() and int(gpus) > 0:
        return int(nodes) * int(gpus), f"the Slurm allocation ({nodes} nodes x {gpus} GPUs)"
    return None


def check_world_size(cfg: DistillConfig, environ: Mapping[str, str]) -> None:
    """Raise when a known world size (torchrun or Slurm environment) differs from the layout."""
    known = environment_world_size(environ)
    if known is None:
        return
    world, source = known
    p = cfg.parallel
    if world != p.world_size:
        raise ConfigError(
            f"world size {world} from {source} != parallel.tp x pp x dp = "
            f"{p.tp} x {p.pp} x {p.dp} = {p.world_size}; set parallel.dp={world // (p.tp * p.pp)}"
            if world % (p.tp * p.pp) == 0
            else f"world size {world} from {source} != parallel.tp x pp x dp = {p.world_size}; "
            f"pick tp x pp dividing {world}",
            field="parallel.dp",
        )


def _check_sequence(cfg: DistillConfig) -> None:
    s = cfg.data.seq_length
    tp = cfg.parallel.tp
    if cfg.parallel.sequence_parallel and tp > 1 and s % tp:
        raise ConfigError(
            f"parallel.sequence_parallel splits each sequence over tp={tp} ranks, but "
            f"data.seq_length={s} is not a multiple of {tp}; use data.seq_length="
            f"{s // tp * tp or tp} or {(s // tp + 1) * tp}, or parallel.sequence_parallel=false",
            field="data.seq_length",
        )
    for role, model in model_roles(cfg):
        limit = model.max_seq_len
        if s > limit:
            raise ConfigError(
                f"data.seq_length={s} exceeds {role}.max_seq_len={limit}; shorten the sequences",
                field="data.seq_length",
            )


def _check_models(cfg: DistillConfig) -> None:
    student = cfg.student
    if cfg.teacher is not None and cfg.teachers is not None:
        raise ConfigError(
            "the config has both teacher and teachers; give one teacher under 'teacher:' or a "
            "list under 'teachers:' (multi-teacher methods), not both",
            field="teachers",
        )
    if cfg.teachers is not None and not cfg.teachers:
        raise ConfigError(
            "teachers is empty; list at least one teacher, or remove it", field="teachers"
        )
    for role, teacher in teacher_roles(cfg):
        if teacher.init == "random" and teacher.checkpoint is not None:
            raise ConfigError(
                f"{role}.init=random contradicts {role}.checkpoint; remove one of them",
                field=f"{role}.init",
            )
        if teacher.checkpoint is None and teacher.init != "random":
            raise ConfigError(
                f"{role}.checkpoint is required (a gkd checkpoint directory; gkd convert imports "
                f"Hugging Face models); set {role}.init=random only for tests and demos",
                field=f"{role}.checkpoint",
            )
        if role.startswith("teachers.") and teacher.vocab_size != cfg.teachers[0].vocab_size:
            raise ConfigError(
                f"{role}.vocab_size={teacher.vocab_size} differs from teachers.0.vocab_size="
                f"{cfg.teachers[0].vocab_size}; the teachers of a run share one vocabulary "
                "(the student's, or the one data.vocab_mapping compresses)",
                field=f"{role}.vocab_size",
            )
    if student.init == "checkpoint" and student.checkpoint is None:
        raise ConfigError(
            "student.init=checkpoint needs student.checkpoint; set it or use init=random",
            field="student.checkpoint",
        )
    if student.init == "random" and student.checkpoint is not None:
        raise ConfigError(
            "student.init=random contradicts student.checkpoint; remove one of them",
            field="student.init",
        )


def read_mapping_sizes(path: str) -> tuple[int | None, int | None]:
    """(compressed size, original size) from a vocabulary mapping's safetensors metadata (flat
    keys, or the JSON object under ``gkd_vocab`` that ``gkd compress-vocab`` writes); either is
    ``None`` when the file does not record it or is not safetensors."""
    try:
        from safetensors import safe_open
    except ImportError:
        return None, None
    try:
        with safe_open(path, framework="numpy") as handle:
            meta: dict[str, Any] = dict(handle.metadata() or {})
    except Exception:  # not a safetensors file: the mapping reader will say so with detail
        return None, None
    try:
        nested = json.loads(meta.get(MAPPING_METADATA_KEY, "{}"))
    except ValueError:
        nested = {}
    if isinstance(nested, dict):
        meta.update(nested)

    def first_int(keys: tuple[str, ...]) -> int | None:
        for key in keys:
            value = meta.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and value.isdigit():
                return int(value)
        return None

    return first_int(MAPPING_COMPRESSED_KEYS), first_int(MAPPING_ORIGINAL_KEYS)


def _check_vocab(cfg: DistillConfig, *, check_paths: bool) -> None:
    tv, sv = reference_vocab_size(cfg), cfg.student.vocab_size
    mapping = cfg.data.vocab_mapping
    if first_teacher(cfg) is None and mapping is not None:
        raise ConfigError(
            "data.vocab_mapping needs a teacher (its logits are restricted to the kept tokens); "
            "add a teacher section or remove data.vocab_mapping",
            field="data.vocab_mapping",
        )
    if mapping is None:
        if sv != tv:
            raise ConfigError(
                f"student.vocab_size={sv} differs from teacher.vocab_size={tv}; use the teacher's "
                "vocabulary, or set data.vocab_mapping to a compressed-vocabulary mapping "
                "(gkd compress-vocab)",
                field="student.vocab_size",
            )
        return
    if not os.path.isfile(mapping):
        if check_paths:
            raise ConfigError(
                f"data.vocab_mapping: file {mapping} does not exist; run gkd compress-vocab or "
                "fix the path",
                field="data.vocab_mapping",
            )
        return
    compressed, original = read_mapping_sizes(mapping)
    if compressed is not None and compressed != sv:
        raise ConfigError(
            f"student.vocab_size={sv} differs from the compressed size {compressed} recorded in "
            f"data.vocab_mapping ({mapping}); set student.vocab_size={compressed}",
            field="student.vocab_size",
        )
    if original is not None and original > tv:
        raise ConfigError(
            f"data.vocab_mapping ({mapping}) was made for a vocabulary of {original} tokens, but "
            f"teacher.vocab_size={tv}; compress the teacher's vocabulary again",
            field="data.vocab_mapping",
        )
    from gkd_cli.vocab.compressed import check_run_compatibility

    try:  # a corrupt file, or a layout for another tp or teacher, fails here rather than in a rank
        check_run_compatibility(mapping, tp=cfg.parallel.tp, teacher_vocab_size=tv)
    except ValueError as error:
        raise ConfigError(f"data.vocab_mapping: {error}", field="data.vocab_mapping") from None


def _expand(pattern: str) -> list[str]:
    if glob.has_magic(pattern):
        return sorted(glob.glob(pattern))
    return [pattern] if os.path.exists(pattern) else []


def check_creatable_dir(path: str, name: str) -> None:
    """``ConfigError`` when folder ``path`` cannot be created (or written) by this user: a part
    of it is a file, or its nearest existing parent is read-only or refuses new entries (as
    ``/proc`` does). Probes with a temporary folder that it removes at once."""
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            raise ConfigError(
                f"{name}: {path} is a file, not a folder; point {name} at a folder (new or "
                "existing)",
                field=name,
            )
        parent = target
    else:
        parent = target.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(
                f"{name}: cannot create {path}: {parent} is a file, not a folder; choose a path "
                "under a folder",
                field=name,
            )
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".gkd-write-test-", dir=parent))
    except OSError as err:
        raise ConfigError(
            f"{name}: cannot create {path}: {parent} does not accept new folders "
            f"({err.strerror}); choose a writable location",
            field=name,
        ) from None


def _check_paths(cfg: DistillConfig) -> None:
    d = cfg.data
    check_creatable_dir(cfg.output.dir, "output.dir")
    if d.cache_dir is not None:
        check_creatable_dir(d.cache_dir, "data.cache_dir")
    for role, model in model_roles(cfg):
        ckpt = model.checkpoint
        if ckpt is not None and os.path.isfile(ckpt):
            raise ConfigError(
                f"{role}.checkpoint: {ckpt} is a file; expected a folder: a gkd run directory "
                "(its output.dir), its checkpoints/ folder or one checkpoints/step_N folder, or "
                "a Hugging Face model folder (config.json and *.safetensors); pass the folder "
                "that holds it",
                field=f"{role}.checkpoint",
            )
        if ckpt is not None and not os.path.isdir(ckpt):
            raise ConfigError(
                f"{role}.checkpoint: directory {ckpt} does not exist; fix the path "
                "(gkd convert imports Hugging Face checkpoints)",
                field=f"{role}.checkpoint",
            )
    if not os.path.exists(d.tokenizer):
        raise ConfigError(
            f"data.tokenizer: {d.tokenizer} does not exist; point it at a tokenizer.json",
            field="data.tokenizer",
        )
    _check_tokenizer_size(cfg)
    if d.source == "corpus":
        if not d.train_files:
            raise ConfigError(
                "data.train_files is empty; list the training files (or set data.source=superglue)",
                field="data.train_files",
            )
        _check_files(d.train_files, "data.train_files")
    else:
        _check_superglue(d)
    _check_files(d.valid_files, "data.valid_files")


def _check_files(patterns: list[str], name: str) -> None:
    for i, pattern in enumerate(patterns):
        if not _expand(pattern):
            what = "matches no file" if glob.has_magic(pattern) else "does not exist"
            raise ConfigError(f"{name}.{i}: {pattern} {what}; fix the path", field=f"{name}.{i}")


def _check_superglue(d: DataConfig) -> None:
    if not d.superglue_tasks:
        raise ConfigError(
            f"data.superglue_tasks is empty; list tasks from {', '.join(SUPERGLUE_TASKS)}",
            field="data.superglue_tasks",
        )
    if d.superglue_dir is None or not os.path.isdir(d.superglue_dir):
        raise ConfigError(
            f"data.superglue_dir: folder {d.superglue_dir} does not exist; point it at the folder "
            "holding BoolQ/, CB/, ...",
            field="data.superglue_dir",
        )
    by_lower = {t.lower(): t for t in SUPERGLUE_TASKS}
    for i, task in enumerate(d.superglue_tasks):
        official = by_lower.get(task.lower())
        if official is None:
            raise ConfigError(
                f"data.superglue_tasks.{i}: unknown task '{task}'"
                f"{_did_you_mean(task, SUPERGLUE_TASKS)} (tasks: {', '.join(SUPERGLUE_TASKS)})",
                field=f"data.superglue_tasks.{i}",
            )
        folder = next(
            (e for e in os.listdir(d.superglue_dir) if e.lower() == official.lower()), official
        )
        path = os.path.join(d.superglue_dir, folder, f"{d.superglue_split}.jsonl")
        if not os.path.isfile(path):
            raise ConfigError(
                f"data.superglue_tasks.{i}: {path} does not exist; pick another "
                "data.superglue_split or fix data.superglue_dir",
                field=f"data.superglue_tasks.{i}",
            )


def _check_tokenizer_size(cfg: DistillConfig) -> None:
    """A tokenizer that emits ids beyond the teacher's vocabulary would index out of range."""
    path = cfg.data.tokenizer
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not path.endswith(".json") or not os.path.isfile(path):
        return
    try:
        from tokenizers import Tokenizer

        size = Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    except Exception:  # unreadable here: the data loader reports it with its own message
        return
    reference = reference_vocab_size(cfg)
    role = teacher_roles(cfg)[0][0] if first_teacher(cfg) is not None else "student"
    if size > reference:
        raise ConfigError(
            f"data.tokenizer has {size} tokens but {role}.vocab_size={reference}; "
            f"use the {role}'s tokenizer or fix {role}.vocab_size",
            field="data.tokenizer",
        )


def _check_methods(cfg: DistillConfig) -> None:
    if not cfg.methods:
        raise ConfigError(
            "methods is empty; add at least one, e.g. '- name: glmd' (gkd methods list)",
            field="methods",
        )
    try:
        from methods.registry import build_method
    except ModuleNotFoundError as err:
        if err.name in ("methods", "methods.registry"):
            return  # registry not installed yet: the worker will check when it builds them
        raise
    from methods.base import BuildContext, ForwardModifier, Role, Stage
    from parallel.method_checks import check_method_layout
    from parallel.model import model_info
    from parallel.taps import check_taps_for_recompute

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    student = model_info(cfg.student.arch(), tp)
    teachers = [model_info(t.arch(), tp) for t in teacher_configs(cfg)]
    teacher = teachers[0] if teachers else student
    for i, entry in enumerate(cfg.methods):
        params = {k: v for k, v in entry.items() if k not in ("name", "weight")}
        where = f"methods.{i} ({entry['name']})"
        try:
            build = BuildContext(Stage(cfg.train.stage), tuple(teachers), student, tp, pp)
            method = build_method(entry["name"], params, build)
            taps = list(method.taps(teacher, student)) if hasattr(method, "taps") else []
            check_taps_for_recompute(taps, cfg.train.recompute)
        except (ValueError, TypeError) as err:
            param = getattr(err, "param", None)  # registry.ParamRangeError names the parameter
            field = f"methods.{i}.{param}" if param else f"methods.{i}"
            raise ConfigError(f"{where}: {err}", field=field) from None
        _check_weight_schedule(entry.get("weight", 1.0), f"methods.{i}.weight")
        needs_teacher = any(t.role is Role.TEACHER for t in taps)
        if not teachers and (needs_teacher or getattr(method, "needs_teacher", False)):
            raise ConfigError(
                f"{where} needs a teacher, but the config has no teacher section; add one or "
                "train with teacher-free methods only (lm)",
                field=f"methods.{i}",
            )
        wanted = max((t.teacher_index for t in taps if t.role is Role.TEACHER), default=0)
        if wanted >= max(len(teachers), 1):
            raise ConfigError(
                f"{where} reads teacher {wanted}, but the config has {len(teachers)} teacher(s); "
                "list them under 'teachers:'",
                field=f"methods.{i}",
            )
        if cfg.parallel.sequence_parallel and tp > 1 and isinstance(method, ForwardModifier):
            # Their hooks would see layer inputs of [s/tp, b, h] (per-sequence norms, token swaps).
            raise ConfigError(
                f"{where} changes the forward pass, which gkd does not support with "
                "parallel.sequence_parallel=true; set parallel.sequence_parallel=false",
                field="parallel.sequence_parallel",
            )
        try:
            check_method_layout(method, entry["name"], teachers, student, pp=pp, where=where)
        except ValueError as err:
            raise ConfigError(str(err), field=f"methods.{i}") from None


def _check_weight_schedule(weight: Any, where: str) -> None:
    """A method's weight given as a schedule: well formed, and never negative."""
    if not isinstance(weight, Mapping):
        return  # a number: checked when the methods list is built
    from methods.schedules import parse_schedule

    try:
        schedule = parse_schedule(weight, where=where)
    except ValueError as err:
        raise ConfigError(str(err), field=where) from None
    values = [getattr(schedule, name, None) for name in ("value", "start", "end")]
    values += list(getattr(schedule, "values", ()))
    negative = [v for v in values if v is not None and v < 0]
    if negative:
        raise ConfigError(
            f"{where} reaches {negative[0]}; a method's weight must be >= 0 at every step",
            field=where,
        )
