"""The distillation config: one YAML file -> typed, keyword-only dataclasses, validated before
anything is launched.

``load_config(path, overrides)`` parses the file, applies ``section.key=value`` overrides (values
are YAML: ``train.lr=1e-4``, ``parallel.tp=2``, ``methods.0.temperature=10``), builds the typed
tree with :mod:`methods.typed` (the engine the method parameters use too: unknown keys, wrong
types and bad choices are reported with the field's dotted name; each method entry is typed
against its method's parameters) and runs :func:`validate`. Every problem raises
:class:`~gkd_cli.errors.ConfigError` naming the field and the fix. Checks that belong to a part
of gkd live there and take plain values: the layout (:func:`gkd_cli.plan.check_layout`), the
world size (:func:`gkd_cli.launch.check_world_size`), the vocabulary mapping
(:func:`gkd_cli.vocab.compressed.check_mapping_for_run`), the tokenizer
(:func:`gkd_cli.data.tokenizer.check_tokenizer_fits`), the SuperGLUE tasks
(:func:`gkd_cli.superglue.distill_data.check_task_files`) and the methods, built exactly as the
workers build them (:func:`gkd_cli.build.build_methods`).

``dump_config(cfg)`` writes YAML that ``load_config`` reads back to an equal config; the launcher
writes it to ``<output.dir>/config.yaml`` and the workers read that file.

Each field's docstring is its help text (``gkd config-help`` prints them). megatron-core is never
imported: the config is checked on a login node (torch is, by the methods registry).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gkd_cli.errors import ConfigError
from methods.pipeline import MethodEntry, parse_entries
from methods.typed import (
    FieldError,
    coerce,
    describe_value,
    did_you_mean,
    field_docs,
    to_plain,
    type_name,
)
from methods.typed import build as typed_build
from parallel.config import ModelArch, ParallelConfig, TrainConfig

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
    cache: str | None = None
    """Teacher only: a teacher cache directory written by ``gkd cache-teacher``; the teacher is
    then read from it (sparse targets, no model, nothing between pipeline stages) instead of
    run. The architecture fields may be left out (the cache records them). Only methods whose
    loss is a logit divergence with a sparse form can use it (checked before launch)."""
    init_layers: list[int] | str | None = None
    """Student only: initialize by truncating ``checkpoint``, a deeper gkd checkpoint of the same
    widths (hidden, heads, FFN, vocabulary), keeping one of its layers per student layer: a list
    of 0-based layer indices, ``first`` (its first ``num_layers`` layers) or ``every:K`` (layers
    K-1, 2K-1, ...). Embeddings, final norm and output layer are copied. GLMKD starts PKD,
    Theseus, ALP-KD, Universal-KD, TAKD and DGKD students this way (e.g. the teacher itself as
    ``checkpoint``)."""

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
    format: Literal["text", "jsonl", "auto", "parquet", "arrow", "indexed"] = "text"
    """File format: plain text (one document per blank-line separated block), JSON lines,
    ``parquet``, ``arrow`` (Arrow IPC, as Hugging Face ``datasets`` writes), ``indexed`` (a
    megatron ``.bin``/``.idx`` pair: list the ``.bin``), or ``auto`` (by file suffix). Parquet,
    Arrow and indexed data are read as examples (``gkd_cli.data.build``)."""
    text_field: str = "text"
    """JSON key holding the text when ``format`` is ``jsonl``."""
    kind: Literal["auto", "text", "prompt_completion", "chat"] = "auto"
    """What each record (jsonl, parquet, arrow) holds: ``text`` (every token trained on),
    ``prompt_completion`` (loss on the completion only), ``chat`` (messages rendered with the
    tokenizer's chat template, loss on assistant turns only), or ``auto``: decided per file from
    its first record (``messages_field`` -> chat, ``prompt_field`` and ``completion_field`` ->
    prompt/completion, else text)."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (``kind: prompt_completion``)."""
    completion_field: str = "completion"
    """Record field holding the completion (``kind: prompt_completion``)."""
    messages_field: str = "messages"
    """Record field holding the chat messages, a list of ``{role, content}`` (``kind: chat``)."""
    train_weights: list[float] = field(default_factory=list)
    """Mixture weights, one per ``train_files`` entry: entry ``i`` gets the share
    ``w_i / sum(w)`` of the training examples (as Megatron-LM's ``--data-path 0.3 a 0.7 b``),
    shared by its files in proportion to their sizes; empty: every example once per epoch."""
    workers: int = 0
    """Processes tokenizing the data (0: the available cores, at most 8); the result does not
    depend on it."""
    seq_length: int = 1024
    """Tokens per training sequence; at most both models' ``max_seq_len``."""
    mode: Literal["stream", "padded", "packed"] = "stream"
    """How examples become sequences: ``stream`` (all documents as one token stream cut into
    ``seq_length`` windows, for pre-training corpora), ``padded`` (one example per sequence,
    padded; an example never straddles two) or ``packed`` (whole examples packed into each
    sequence; attention never crosses examples and positions restart). ``padded`` and
    ``packed`` carry per-token loss masks (prompts and padding never count) and example ids."""
    overlong: Literal["refuse", "truncate"] = "refuse"
    """An example longer than ``seq_length`` in ``padded``/``packed`` mode: ``refuse`` (an
    error naming it, before the first step) or ``truncate`` (keep its first ``seq_length``
    tokens; the count is logged)."""
    shuffle: bool = True
    """Reshuffle the examples (windows in ``stream`` mode) every epoch, by ``train.seed`` and
    the epoch; ``false``: their stored order in every epoch. Epochs follow each other for
    ``train.steps`` steps."""
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
    choices: bool = False
    """``source: superglue`` in ``padded``/``packed`` mode: write each task example as a choice
    record (the evaluation prompt and every option; :mod:`methods.choices`), so task-stage
    methods work on option scores; ``false``: a prompt/completion record (prompt + gold answer)."""
    labels: bool = False
    """With ``choices``: give each choice record its gold label (for ``kd``'s hard term, ``lm``
    fine-tuning, ...). Off by default: GLMD's word-prediction distillation uses no labels."""


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
    log_to: list[str] = field(default_factory=lambda: ["jsonl"])
    """Metric sinks: ``jsonl`` (``metrics.jsonl``, always written), ``tensorboard`` (event files
    in ``dir/tensorboard``; extra ``gkd[tensorboard]``), ``wandb`` (Weights & Biases; extra
    ``gkd[wandb]``)."""
    wandb_project: str = "gkd"
    """W&B project of the run."""
    wandb_entity: str | None = None
    """W&B entity (team or user); default: the account's default."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """``offline``: no network, the run is written to ``dir/wandb/offline-run-*`` (upload later
    with ``wandb sync``); ``online``: streamed to the W&B server."""
    wandb_name: str | None = None
    """W&B display name; default: the name of ``dir``."""


@dataclass(kw_only=True)
class DistillConfig:
    """A distillation run: the two models, the methods, the layout, the data, the optimization
    and the outputs."""

    student: ModelConfig
    """The trained student."""
    teachers: list[ModelConfig] = field(default_factory=list)
    """The frozen teachers, in order (``Tap.teacher_index`` indexes them). One teacher is usually
    written ``teacher: {...}`` (YAML sugar for a one-element list); several are for the
    multi-teacher methods (tmkd, mt_bert, uncertainty, rl_kd, dgkd), each sharded like the first
    and sharing its vocabulary; single-teacher methods use the first. None: the student trains
    alone (GKD's ``pd`` first stage, or a teacher for the demo), with teacher-free methods only
    (``lm``)."""
    methods: list[MethodEntry]
    """Distillation methods, each ``{name: ..., weight: 1.0, <method parameters>}``, typed
    against the method's parameters when the config is loaded; the terms are weighted and summed
    (``gkd methods list`` shows the names)."""
    data: DataConfig
    """Training data."""
    output: OutputConfig
    """Run directory and checkpointing."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/pipeline/data parallel layout (teacher and student share it)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization of the student."""

    @property
    def teacher(self) -> ModelConfig | None:
        """The first teacher (the one single-teacher methods use), or None."""
        return self.teachers[0] if self.teachers else None

    def teacher_role(self, index: int) -> str:
        """How teacher ``index`` is named in messages: ``teacher`` when it is the only one,
        else ``teachers.N``."""
        return "teacher" if len(self.teachers) == 1 else f"teachers.{index}"

    def model_roles(self) -> list[tuple[str, ModelConfig]]:
        """``[(role, model)]``: the teachers, then the student."""
        roles = [(self.teacher_role(i), t) for i, t in enumerate(self.teachers)]
        return [*roles, ("student", self.student)]


SECTIONS: dict[str, type] = {
    "teacher": ModelConfig,
    "student": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "output": OutputConfig,
}
"""Config sections backed by a dataclass (``teacher`` is one element of ``teachers``; ``methods``
is typed by the methods registry)."""


def _section_names() -> list[str]:
    """The top-level keys a config may have (``teacher`` is sugar for ``teachers``)."""
    return ["teacher", *(f.name for f in dataclasses.fields(DistillConfig))]


def _config_error(err: FieldError) -> ConfigError:
    return ConfigError(str(err), field=err.field)


# ---------------------------------------------------------------------------------------------
# Field help (the docstring under each field; methods.typed.field_docs, as gkd methods show)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FieldHelp:
    """One row of the config reference."""

    key: str
    type: str
    default: str
    help: str


_METHOD_ROWS = [
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


def describe_section(name: str) -> list[FieldHelp]:
    """The reference of one section (``teacher``, ``train``, ...): key, type, default, help."""
    if name == "methods":
        return list(_METHOD_ROWS)
    if name == "teachers":
        return [
            dataclasses.replace(row, key=row.key.replace("teachers.", "teachers.N.", 1))
            for row in describe_section_of(ModelConfig, "teachers")
        ]
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section '{name}'{did_you_mean(name, _section_names())}")
    return describe_section_of(SECTIONS[name], name)


def describe_section_of(cls: type, name: str) -> list[FieldHelp]:
    """The reference rows of dataclass ``cls`` under the key prefix ``name``."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    return [
        FieldHelp(
            key=f"{name}.{f.name}",
            type=type_name(hints[f.name]),
            default=_default_text(f),
            help=docs.get(f.name, ""),
        )
        for f in dataclasses.fields(cls)
    ]


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        if f.default is None or isinstance(f.default, bool):
            return yaml.safe_dump(f.default).split("\n")[0]  # null, true, false as YAML spells them
        return repr(f.default).strip("'")
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


# ---------------------------------------------------------------------------------------------
# Building the typed config from YAML data (methods.typed; method entries by methods.pipeline)
# ---------------------------------------------------------------------------------------------


def _teachers(data: Mapping[str, Any]) -> list[ModelConfig]:
    """``teachers`` from ``teachers: [...]`` or its sugar ``teacher: {...}``; a ``null`` one is
    absent (config.yaml files written before ``teachers`` was the only field hold both keys, one
    of them ``null``)."""
    teacher, teachers = data.get("teacher"), data.get("teachers")
    if teacher is not None and teachers is not None:
        raise ConfigError(
            "the config has both teacher and teachers; give one teacher under 'teacher:' or a "
            "list under 'teachers:' (multi-teacher methods), not both",
            field="teachers",
        )
    from gkd_cli.cache_teacher import with_cached_arch  # a cached teacher's recorded fields

    if teacher is not None:
        return [typed_build(ModelConfig, with_cached_arch(teacher, "teacher"), "teacher")]
    if teachers is None:
        return []  # no teacher: the student trains alone
    if isinstance(teachers, list):
        teachers = [with_cached_arch(t, f"teachers.{i}") for i, t in enumerate(teachers)]
    return coerce(teachers, list[ModelConfig], "teachers")


def build_config(data: Any) -> DistillConfig:
    """The typed config from a parsed YAML mapping (no cross-field validation; see
    :func:`validate`)."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"the config must be a mapping of sections ({', '.join(_section_names())}), got "
            f"{describe_value(data)}"
        )
    sections = _section_names()
    for key in data:
        if key not in sections:
            raise ConfigError(
                f"unknown section '{key}'{did_you_mean(str(key), sections)}"
                f" (valid sections: {', '.join(sections)})",
                field=str(key),
            )
    kwargs: dict[str, Any] = {}
    try:
        for f in dataclasses.fields(DistillConfig):
            name = f.name
            if name == "teachers":
                kwargs[name] = _teachers(data)
            elif name == "methods":
                if name not in data:
                    raise ConfigError(
                        "methods is required: a list such as '- name: glmd' (gkd methods list)",
                        field="methods",
                    )
                kwargs[name] = parse_entries(data[name])
            elif name in data:
                value = data[name] if data[name] is not None else {}
                kwargs[name] = typed_build(SECTIONS[name], value, name)
            elif name in ("student", "data", "output"):
                raise ConfigError(f"section '{name}' is required", field=name)
    except FieldError as err:
        raise _config_error(err) from None
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
                f"{did_you_mean(parts[0], _section_names())}",
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
    validate_run: bool = True,
    build_methods: bool = True,
) -> DistillConfig:
    """Read, override, type-check and validate a config file. Relative paths in it are taken
    relative to the current directory and made absolute (the workers may run elsewhere).

    ``environ`` (e.g. ``os.environ``) lets validation check the world size of a torchrun or Slurm
    environment; ``check_paths=False`` skips the existence checks (``gkd plan`` on a login node);
    ``build_methods=False`` skips building the methods (the worker builds them itself, once, with
    :func:`gkd_cli.build.build_methods`); ``validate_run=False`` only reads and types the file (a
    saved ``config.yaml`` compared with a new run).
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
    if validate_run:
        validate(cfg, environ=environ, check_paths=check_paths, build_methods=build_methods)
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
    data: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "methods":
            data[f.name] = [entry.to_config() for entry in value]
        else:
            data[f.name] = to_plain(value)
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
    teachers = [
        dataclasses.replace(
            t, checkpoint=_absolute_or_none(t.checkpoint), cache=_absolute_or_none(t.cache)
        )
        for t in cfg.teachers
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
    return dataclasses.replace(cfg, teachers=teachers, student=student, data=data, output=output)


# ---------------------------------------------------------------------------------------------
# Validation across fields
# ---------------------------------------------------------------------------------------------


def reference_vocab_size(cfg: DistillConfig) -> int:
    """Size of the vocabulary the data's token ids index: the (first) teacher's, or the
    student's when it trains alone."""
    return (cfg.teacher or cfg.student).vocab_size


def validate(
    cfg: DistillConfig,
    *,
    environ: Mapping[str, str] | None = None,
    check_paths: bool = True,
    build_methods: bool = True,
) -> None:
    """Check everything that can be checked before launching; raise ``ConfigError`` on the first
    problem, naming the field and the fix. The methods are checked by building them
    (:func:`gkd_cli.build.build_methods`, what the workers call), unless ``build_methods`` is
    false."""
    _check_ranges(cfg)
    from gkd_cli.plan import check_layout

    check_layout(cfg.model_roles(), cfg.parallel)
    _check_batch(cfg)
    if environ is not None:
        from gkd_cli.launch import check_world_size

        check_world_size(cfg.parallel, environ)
    _check_sequence(cfg)
    _check_models(cfg)
    _check_vocab(cfg, check_paths=check_paths)
    from gkd_cli.data.formats import check_data_fields

    try:
        check_data_fields(cfg.data)
    except ValueError as error:
        raise ConfigError(str(error), field=str(error).split(":")[0].split(" ")[0]) from None
    if check_paths:
        _check_paths(cfg)
    from gkd_cli.data.choices import check_choice_config  # h15t: choice data

    check_choice_config(cfg)
    if not cfg.methods:
        raise ConfigError(
            "methods is empty; add at least one, e.g. '- name: glmd' (gkd methods list)",
            field="methods",
        )
    if build_methods:
        from gkd_cli.build import build_methods as build

        build(cfg)


def _positive(value: int | float, name: str, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value} must be {bound}", field=name)


def _check_ranges(cfg: DistillConfig) -> None:
    for role, m in cfg.model_roles():
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
    if t.logit_chunk_tokens is not None:
        _positive(t.logit_chunk_tokens, "train.logit_chunk_tokens")
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
    from gkd_cli.observe import check_observability

    check_observability(cfg)


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
    for role, model in cfg.model_roles():
        limit = model.max_seq_len
        if s > limit:
            raise ConfigError(
                f"data.seq_length={s} exceeds {role}.max_seq_len={limit}; shorten the sequences",
                field="data.seq_length",
            )


def _check_models(cfg: DistillConfig) -> None:
    student = cfg.student
    if student.cache is not None or any(t.cache is not None for t in cfg.teachers):
        from gkd_cli.cache_teacher import check_cache_fields

        check_cache_fields(cfg)  # a cached teacher needs no checkpoint
    for index, teacher in enumerate(cfg.teachers):
        role = cfg.teacher_role(index)
        if teacher.init == "random" and teacher.checkpoint is not None:
            raise ConfigError(
                f"{role}.init=random contradicts {role}.checkpoint; remove one of them",
                field=f"{role}.init",
            )
        if teacher.checkpoint is None and teacher.init != "random" and teacher.cache is None:
            raise ConfigError(
                f"{role}.checkpoint is required (a gkd checkpoint directory; gkd convert imports "
                f"Hugging Face models); set {role}.init=random only for tests and demos",
                field=f"{role}.checkpoint",
            )
        if teacher.vocab_size != cfg.teachers[0].vocab_size:
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
    for index, teacher in enumerate(cfg.teachers):
        if teacher.init_layers is not None:
            role = cfg.teacher_role(index)
            raise ConfigError(
                f"{role}.init_layers: only the student is initialized by truncation; remove it",
                field=f"{role}.init_layers",
            )
    if student.init_layers is not None and student.checkpoint is None:
        raise ConfigError(
            "student.init_layers needs student.checkpoint (the deeper checkpoint to truncate, "
            "e.g. the teacher's)",
            field="student.init_layers",
        )


def _check_vocab(cfg: DistillConfig, *, check_paths: bool) -> None:
    tv, sv = reference_vocab_size(cfg), cfg.student.vocab_size
    mapping = cfg.data.vocab_mapping
    if cfg.teacher is None and mapping is not None:
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
    from gkd_cli.vocab.compressed import check_mapping_for_run

    check_mapping_for_run(
        mapping, student_vocab_size=sv, teacher_vocab_size=tv, tp=cfg.parallel.tp,
        check_paths=check_paths,
    )  # fmt: skip


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
    for role, model in cfg.model_roles():
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
    from gkd_cli.data.tokenizer import check_tokenizer_fits

    role = cfg.teacher_role(0) if cfg.teachers else "student"
    check_tokenizer_fits(d.tokenizer, reference_vocab_size(cfg), role)
    if d.source == "corpus":
        if not d.train_files:
            raise ConfigError(
                "data.train_files is empty; list the training files (or set data.source=superglue)",
                field="data.train_files",
            )
        _check_files(d.train_files, "data.train_files")
    else:
        from gkd_cli.superglue.distill_data import check_task_files

        check_task_files(d.superglue_tasks, d.superglue_dir, d.superglue_split)
    _check_files(d.valid_files, "data.valid_files")


def _check_files(patterns: list[str], name: str) -> None:
    for i, pattern in enumerate(patterns):
        if not _expand(pattern):
            what = "matches no file" if glob.has_magic(pattern) else "does not exist"
            raise ConfigError(f"{name}.{i}: {pattern} {what}; fix the path", field=f"{name}.{i}")
