"""``gkd convert``: Hugging Face checkpoints in and out.

* ``gkd convert import-hf HF_DIR --out CKPT [--tp N --pp N]``: checks the folder in this process
  (architecture, shards, tensor shapes, tokenizer; nothing heavy), then launches ``tp x pp`` local
  workers (``python -m parallel.hf.worker`` through torchrun's Python API) that each read only their
  slices and write a weights-only gkd checkpoint, usable as ``teacher.checkpoint`` at any layout.
* ``gkd convert import-gguf FILE.gguf --out CKPT [--tp N --pp N]``: checks the GGUF file in this
  process (architecture, tensor names, quantization types, shapes, length, tokenizer; nothing is
  dequantized), writes it dequantized as a Hugging Face folder in a staging folder
  (:mod:`parallel.hf.gguf`, one block of rows in memory at a time) and imports that as
  ``import-hf`` does.
* ``gkd convert export-hf CKPT --out HF_DIR``: loads the student of a gkd checkpoint in this
  process (TP1 x PP1) and writes ``config.json`` + ``model.safetensors`` that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads, plus the tokenizer.

A student trained on a compressed vocabulary (``gkd compress-vocab``) is exported with its
compressed vocabulary: its ids are the compressed ids. The export then holds
``vocab_mapping.safetensors`` and the compressed tokenizer in ``gkd_tokenizer/`` (load it with
``gkd_cli.data.load_tokenizer``) and no root ``tokenizer.json``, whose ids would not match.

The lead mounts :data:`convert_app` as ``gkd convert``. Input errors print as one red line and
exit with code 2; a failed worker prints its rank, traceback and log path and exits with 1.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gkd_cli.errors import GkdError, WorkerFailedError

convert_app = typer.Typer(
    help="Convert checkpoints between Hugging Face and gkd.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

WORKER_MODULE = "parallel.hf.worker"
MAPPING_FILE = "vocab_mapping.safetensors"
GKD_TOKENIZER_DIR = "gkd_tokenizer"
INPUT_ERROR_EXIT = 2


def _out() -> Console:
    return Console(highlight=False)


def _error_line(message: str) -> None:
    Console(stderr=True, highlight=False).print(
        Text(f"error: {message}", style="bold red"), soft_wrap=True
    )


def _is_checkpoint_error(err: Exception) -> bool:
    """parallel.checkpoint.CheckpointError (missing, incomplete or damaged checkpoint), matched
    without importing torch up front."""
    return any(
        c.__name__ == "CheckpointError" and c.__module__ == "parallel.checkpoint"
        for c in type(err).__mro__
    )


def _report_errors(fn):
    """Input errors (bad folders, options, checkpoints) as one red line, exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WorkerFailedError as err:
            _error_line(str(err))
            if err.log_path:
                Console(stderr=True, highlight=False).print(
                    Text(f"log of rank {err.rank}: {err.log_path}"), soft_wrap=True
                )
            raise typer.Exit(err.exit_code) from None
        except (GkdError, ValueError) as err:  # HFConversionError is a ValueError
            _error_line(str(err))
            raise typer.Exit(INPUT_ERROR_EXIT) from None
        except Exception as err:
            if not _is_checkpoint_error(err):
                raise
            _error_line(str(err))
            raise typer.Exit(INPUT_ERROR_EXIT) from None

    return wrapper


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise GkdError(f"--out {out} is a file; name a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise GkdError(f"--out {out} exists and is not empty; pass --overwrite or another folder")


# ---------------------------------------------------------------------------------------------
# import-hf
# ---------------------------------------------------------------------------------------------


def _summary_table(checkpoint, tp: int, pp: int) -> Table:
    spec, arch = checkpoint.spec, checkpoint.spec.arch
    files = sorted({t.file for t in checkpoint.tensors.values()})
    table = Table(
        title=f"Hugging Face model {checkpoint.path}", title_justify="left", show_header=False
    )
    table.add_column("field")
    table.add_column("value", overflow="fold")
    heads = f"{arch.num_attention_heads} ({arch.query_groups} key/value, head dim {arch.head_dim})"
    rows = [
        ("architecture", spec.architecture),
        ("layers x hidden", f"{arch.num_layers} x {arch.hidden_size} (MLP {arch.ffn_size})"),
        ("attention heads", heads),
        ("vocabulary", f"{arch.vocab_size} (padded to {arch.padded_vocab(tp)} at tp={tp})"),
        ("parameters", f"{arch.num_parameters(tp):,}"),
        ("weights", f"{checkpoint.weight_dtype}, {len(files)} file(s)"),
        (
            "tokenizer",
            f"{checkpoint.tokenizer_vocab_size} ids" if checkpoint.tokenizer_vocab_size else "-",
        ),
        ("layout", f"tp={tp} pp={pp} ({tp * pp} process(es))"),
    ]
    if arch.position_embedding == "rope":  # issue 16: RoPE details and the attention window
        scaling = ", ".join(f"{k}={v}" for k, v in (arch.rope_scaling or {}).items())
        rows.insert(
            3, ("rotary", f"theta {arch.rotary_base}" + (f"; {scaling}" if scaling else ""))
        )
        if arch.sliding_window is not None:
            rows.insert(4, ("sliding window", f"{arch.sliding_window} tokens, every layer"))
    for name, value in rows:
        table.add_row(name, Text(value))
    return table


def import_plan(hf_dir: Path, out: Path, *, tp: int, pp: int, dtype: str, log_dir: Path):
    """The launch plan of the import workers (a plain value): one node, ``tp x pp`` processes."""
    from gkd_cli.launch import plan_workers

    return plan_workers(
        entry_module=WORKER_MODULE,
        args=["--hf-dir", str(hf_dir.resolve()), "--out", str(out.resolve()),
              "--tp", str(tp), "--pp", str(pp), "--dtype", dtype],
        world_size=tp * pp,
        log_dir=log_dir,
        run_id="gkd-convert",
    )  # fmt: skip


@convert_app.command("import-hf")
@_report_errors
def import_hf(
    hf_dir: Annotated[
        Path,
        typer.Argument(
            help="Hugging Face model folder (config.json + safetensors).", show_default=False
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="gkd checkpoint folder to write.", show_default=False)
    ],
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel size of the import.")] = 1,
    pp: Annotated[int, typer.Option("--pp", help="Pipeline-parallel size of the import.")] = 1,
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto (as stored), float32, bfloat16 or float16.")
    ] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty --out.")
    ] = False,
) -> None:
    """Convert a Hugging Face model into a gkd checkpoint (loadable at any TP/PP layout)."""
    from parallel.hf import inspect_hf_dir
    from parallel.hf.spec import check_layout

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise GkdError(f"--dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
    checkpoint = inspect_hf_dir(hf_dir)
    check_layout(
        checkpoint.spec.arch,
        tp,
        pp,
        where=str(hf_dir / "config.json"),
        family=checkpoint.spec.family,
    )
    _check_out(out, overwrite)
    console = _out()
    console.print(_summary_table(checkpoint, tp, pp))
    for note in checkpoint.spec.notes:
        console.print(Text(f"note: {note}", style="yellow"), soft_wrap=True)

    from gkd_cli.launch import run_local

    log_dir = Path(tempfile.mkdtemp(prefix="gkd-convert-logs-"))
    plan = import_plan(hf_dir, out, tp=tp, pp=pp, dtype=dtype, log_dir=log_dir)
    with console.status(f"importing on {tp * pp} process(es) ..."):
        run_local(plan)  # a failure keeps the logs and names them
    shutil.rmtree(log_dir, ignore_errors=True)
    console.print(f"[green]wrote[/] {out} (gkd checkpoint, tp={tp} pp={pp}; loads at any layout)")


# ---------------------------------------------------------------------------------------------
# import-gguf
# ---------------------------------------------------------------------------------------------


def _gguf_summary_table(model, tp: int, pp: int) -> Table:
    arch, config = model.spec.arch, model.config
    table = Table(title=f"GGUF model {model.path}", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    quant = ", ".join(f"{n} x {q}" for q, n in sorted(model.quantization.items()))
    heads = f"{arch.num_attention_heads} ({arch.query_groups} key/value, head dim {arch.head_dim})"
    meta = model.tokenizer
    rows = [
        ("architecture", f"{model.architecture} -> {model.spec.architecture}"),
        ("layers x hidden", f"{arch.num_layers} x {arch.hidden_size} (MLP {arch.ffn_size})"),
        ("attention heads", heads),
        ("vocabulary", f"{arch.vocab_size} (padded to {arch.padded_vocab(tp)} at tp={tp})"),
        ("embeddings", "tied" if config["tie_word_embeddings"] else "untied"),
        ("tensors", quant),
        (
            "tokenizer",
            f"{meta['ggml.model']} ({len(meta['ggml.tokens'])} tokens, pre-tokenizer "
            f"{meta.get('ggml.pre', 'default')}), chat template: "
            + ("yes" if meta.get("chat_template") else "no"),
        ),
        ("layout", f"tp={tp} pp={pp} ({tp * pp} process(es))"),
    ]
    for name, value in rows:
        table.add_row(name, Text(value))
    return table


@convert_app.command("import-gguf")
@_report_errors
def import_gguf(
    gguf_file: Annotated[
        Path, typer.Argument(help="GGUF file (llama.cpp's format).", show_default=False)
    ],
    out: Annotated[
        Path, typer.Option("--out", help="gkd checkpoint folder to write.", show_default=False)
    ],
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel size of the import.")] = 1,
    pp: Annotated[int, typer.Option("--pp", help="Pipeline-parallel size of the import.")] = 1,
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="float32 (auto: dequantized weights), bfloat16 or float16."),
    ] = "auto",
    staging: Annotated[
        Path | None,
        typer.Option(
            "--staging",
            help="Folder for the dequantized Hugging Face copy (default: beside --out; removed "
            "afterwards; needs 4 bytes per parameter).",
            show_default=False,
        ),
    ] = None,
    keep_hf: Annotated[
        Path | None,
        typer.Option(
            "--keep-hf",
            help="Also keep the dequantized Hugging Face folder here (transformers loads it).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty --out.")
    ] = False,
) -> None:
    """Convert a GGUF file (weights dequantized, tokenizer and chat template included) into a gkd
    checkpoint, through a Hugging Face folder that import-hf reads."""
    from parallel.hf import inspect_hf_dir
    from parallel.hf.gguf import inspect_gguf, write_hf_folder
    from parallel.hf.spec import check_layout

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise GkdError(f"--dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
    model = inspect_gguf(gguf_file)
    check_layout(model.spec.arch, tp, pp, where=f"{gguf_file} (metadata)", family=model.spec.family)
    _check_out(out, overwrite)
    if keep_hf is not None:
        _check_out(keep_hf, overwrite)
    console = _out()
    console.print(_gguf_summary_table(model, tp, pp))
    for note in model.notes:
        console.print(Text(f"note: {note}", style="yellow"), soft_wrap=True)
    parent = staging if staging is not None else out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".gkd-gguf-", dir=parent))
    try:
        with console.status(f"dequantizing {gguf_file.name} into {stage} ..."):
            write_hf_folder(model, stage)
        inspect_hf_dir(stage)  # import-hf's own checks on what was written
        from gkd_cli.launch import run_local

        log_dir = Path(tempfile.mkdtemp(prefix="gkd-convert-logs-"))
        plan = import_plan(stage, out, tp=tp, pp=pp, dtype=dtype, log_dir=log_dir)
        with console.status(f"importing on {tp * pp} process(es) ..."):
            run_local(plan)
        shutil.rmtree(log_dir, ignore_errors=True)
        if keep_hf is not None:
            if keep_hf.exists():
                shutil.rmtree(keep_hf)
            shutil.move(str(stage), str(keep_hf))
            console.print(f"[green]wrote[/] {keep_hf} (Hugging Face folder, float32)")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    console.print(f"[green]wrote[/] {out} (gkd checkpoint, tp={tp} pp={pp}; loads at any layout)")


# ---------------------------------------------------------------------------------------------
# export-hf
# ---------------------------------------------------------------------------------------------


def find_vocab_mapping(folder: Path, config: dict[str, Any]) -> Path | None:
    """The compressed-vocabulary mapping of a checkpoint: in its folder, its run directory
    (``<run>/checkpoints/step_N``), or the run config's ``data.vocab_mapping``."""
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / MAPPING_FILE).is_file():
            return candidate / MAPPING_FILE
    configured = (config.get("data") or {}).get("vocab_mapping")
    if configured and Path(configured).is_file():
        return Path(configured)
    return None


def _run_config(folder: Path) -> dict[str, Any]:
    import yaml

    path = folder / "config.yaml"
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GkdError(f"{path} is not valid YAML ({err})") from None
    return loaded if isinstance(loaded, dict) else {}


def _tokenizer_source(folder: Path, meta: dict, config: dict, explicit: Path | None) -> Path | None:
    if explicit is not None:
        if not explicit.exists():
            raise GkdError(f"--tokenizer {explicit} does not exist")
        return explicit
    for value in (meta.get("tokenizer"), (config.get("data") or {}).get("tokenizer")):
        if value and Path(value).exists():
            return Path(value)
    return None


def stage_compressed_tokenizer(
    tokenizer_path: Path | None, mapping_path: Path, stage: Path
) -> Path | None:
    """Write the compressed tokenizer (ids = the student's) into ``stage``; ``None`` without a
    tokenizer."""
    from gkd_cli.data.tokenizer import load_tokenizer
    from gkd_cli.vocab import compress_tokenizer

    if tokenizer_path is None:
        return None
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.is_compressed:
        tokenizer.save(stage)
        return stage
    return compress_tokenizer(tokenizer, mapping_path, stage, overwrite=True)


def _token_name(value: Any) -> str | None:
    """A ``tokenizer_config.json`` special token: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def template_bos(json_file: Path) -> str | None:
    """The special token the tokenizer's post-processor puts before every text (Llama's ``<s>``,
    Llama 3's ``<|begin_of_text|>``), or ``None`` (GPT-2-style byte-level tokenizers add none)."""
    from tokenizers import Tokenizer as RawTokenizer

    try:
        raw = RawTokenizer.from_file(str(json_file))
    except Exception:
        return None
    bare = raw.encode("a", add_special_tokens=False).ids
    full = raw.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return raw.id_to_token(full[0]) if start == 1 else None
    return None


def _hf_tokenizer_config(tokenizer_path: Path) -> dict[str, Any] | None:
    """A minimal ``tokenizer_config.json`` so that ``AutoTokenizer`` loads a bare
    ``tokenizer.json`` (special tokens from gkd's tokenizer roles; BOS only where the tokenizer
    adds one)."""
    from gkd_cli.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except ValueError:
        return None
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    json_file = tokenizer_path / "tokenizer.json" if tokenizer_path.is_dir() else tokenizer_path
    bos = template_bos(json_file)
    if bos is not None:
        config["bos_token"] = bos
    for role, token_id in (
        ("eos_token", tokenizer.eos_id),
        ("pad_token", tokenizer.pad_id),
        ("unk_token", tokenizer.unk_id),
    ):
        token = tokenizer.id_to_token(token_id) if token_id is not None else None
        if token is not None:
            config[role] = token
    return config


def special_token_ids(
    tokenizer_path: Path, tokenizer_config: dict[str, Any] | None
) -> dict[str, int | None]:
    """``bos_token_id`` / ``eos_token_id`` for the exported ``config.json``: the ids of the
    tokens that ``tokenizer_config`` (the one shipped with the export) names, else gkd's
    end-of-document token and the BOS the tokenizer's template adds. ``bos_token_id`` is
    written as null when the tokenizer has no BOS, so transformers' defaults (Llama: 1 and 2)
    never name an unrelated token."""
    from gkd_cli.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    config = tokenizer_config or {}
    json_file = tokenizer_path / "tokenizer.json" if tokenizer_path.is_dir() else tokenizer_path
    bos_name = (
        _token_name(config.get("bos_token")) if "bos_token" in config else template_bos(json_file)
    )
    eos_name = _token_name(config.get("eos_token"))
    bos = tokenizer.token_to_id(bos_name) if bos_name else None
    eos = tokenizer.token_to_id(eos_name) if eos_name else None
    return {"bos_token_id": bos, "eos_token_id": eos if eos is not None else tokenizer.eos_id}


def _compressed_special_ids(
    compressed: Path, original: Path | None, orig_to_comp
) -> dict[str, int | None]:
    """The special ids of a compressed-vocabulary export, in compressed ids."""
    from gkd_cli.data.tokenizer import load_tokenizer

    bos = None
    if original is not None:
        json_file = original / "tokenizer.json" if original.is_dir() else original
        name = template_bos(json_file) if json_file.suffix == ".json" else None
        original_id = load_tokenizer(original).token_to_id(name) if name else None
        bos = int(orig_to_comp[original_id]) if original_id is not None else None
    return {"bos_token_id": bos, "eos_token_id": load_tokenizer(compressed).eos_id}


@convert_app.command("export-hf")
@_report_errors
def export_hf(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="gkd checkpoint: a step folder, a checkpoints/ folder or a run directory.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Hugging Face folder to write.", show_default=False)
    ],
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype", help="auto (the checkpoint's precision), float32, bfloat16 or float16."
        ),
    ] = "auto",
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer",
            help="Tokenizer to ship (default: the run's data.tokenizer).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty --out.")
    ] = False,
) -> None:
    """Write a gkd checkpoint's student as a Hugging Face model folder."""
    from parallel.checkpoint import resolve
    from parallel.hf.export import export_hf as export_checkpoint
    from parallel.hf.export import read_arch
    from parallel.hf.files import tokenizer_vocab_size
    from parallel.hf.spec import hf_architecture_for

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise GkdError(f"--dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
    folder = resolve(checkpoint)
    arch, meta = read_arch(folder)
    architecture = hf_architecture_for(arch)
    _check_out(out, overwrite)
    config = _run_config(folder)
    mapping_path = find_vocab_mapping(folder, config)
    tokenizer_path = _tokenizer_source(folder, meta, config, tokenizer)
    console = _out()
    extra_files: dict[str, Path] = {}
    extra_config: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gkd-export-") as tmp:
        staged_tokenizer: Path | str | None = None  # None: the checkpoint's own tokenizer/ folder
        if mapping_path is not None:
            from gkd_cli.vocab import read_mapping

            mapping = read_mapping(mapping_path)
            if mapping.compressed_vocab_size != arch.vocab_size:
                raise GkdError(
                    f"vocabulary mapping {mapping_path} has {mapping.compressed_vocab_size} compressed "
                    f"ids but the checkpoint's student has vocab_size={arch.vocab_size}; it belongs to "
                    "another run"
                )
            extra_files[MAPPING_FILE] = mapping_path
            extra_config.update(
                gkd_vocab_mapping=MAPPING_FILE, gkd_original_vocab_size=mapping.vocab_size
            )
            compressed = stage_compressed_tokenizer(
                tokenizer_path, mapping_path, Path(tmp) / GKD_TOKENIZER_DIR
            )
            if compressed is not None:
                extra_files[GKD_TOKENIZER_DIR] = compressed
                extra_config["gkd_tokenizer"] = GKD_TOKENIZER_DIR
                extra_config.update(
                    _compressed_special_ids(compressed, tokenizer_path, mapping.orig_to_comp)
                )
            staged_tokenizer = ""  # the original tokenizer's ids are not the model's
        elif tokenizer_path is not None:
            json_file = (
                tokenizer_path / "tokenizer.json" if tokenizer_path.is_dir() else tokenizer_path
            )
            size = tokenizer_vocab_size(json_file) if json_file.suffix == ".json" else None
            if size is not None and size > arch.vocab_size:
                raise GkdError(
                    f"tokenizer {tokenizer_path} has {size} ids but the student's vocab_size is "
                    f"{arch.vocab_size}; pass the run's tokenizer with --tokenizer"
                )
            staged_tokenizer = tokenizer_path
            if tokenizer_path.is_file() and tokenizer_path.name != "tokenizer.json":
                extra_files["tokenizer.json"] = tokenizer_path
                staged_tokenizer = ""
            shipped_config = (
                tokenizer_path / "tokenizer_config.json" if tokenizer_path.is_dir() else None
            )
            hf_config = None
            if shipped_config is not None and shipped_config.is_file():
                hf_config = json.loads(shipped_config.read_text())
            elif json_file.name == "tokenizer.json" and json_file.is_file():
                hf_config = _hf_tokenizer_config(tokenizer_path)
                if hf_config is not None:
                    path = Path(tmp) / "tokenizer_config.json"
                    path.write_text(json.dumps(hf_config, indent=2) + "\n")
                    extra_files["tokenizer_config.json"] = path
            if json_file.name == "tokenizer.json" and json_file.is_file():
                extra_config.update(special_token_ids(tokenizer_path, hf_config))
        with console.status(f"exporting {folder} as {architecture} ..."), warnings.catch_warnings():
            # megatron-core warns at import about missing apex/Transformer Engine (irrelevant here)
            warnings.filterwarnings("ignore", module=r"megatron\..*|torch\..*|parallel\..*")
            written = export_checkpoint(
                folder,
                out,
                dtype=dtype,
                tokenizer=staged_tokenizer,
                extra_files=extra_files,
                extra_config=extra_config,
                overwrite=overwrite,
            )
    files = sorted(p.name for p in written.iterdir())
    console.print(f"[green]wrote[/] {written} ({architecture}): {', '.join(files)}", soft_wrap=True)
    if mapping_path is not None:
        console.print(
            Text(
                f"note: the model uses the compressed vocabulary ({arch.vocab_size} ids); its "
                f"tokenizer is {GKD_TOKENIZER_DIR}/ (gkd_cli.data.load_tokenizer) and "
                f"{MAPPING_FILE} maps the ids",
                style="yellow",
            ),
            soft_wrap=True,
        )
