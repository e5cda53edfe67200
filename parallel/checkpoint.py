"""Atomic, resharding checkpoints on megatron-core dist checkpointing.

Layout of ``<output>/checkpoints``::

    step_0000100/
        dist/            megatron-core dist checkpoint: student weights (``model.*``), method modules
                         (``methods.*``, see parallel/method_modules.py), optimizer, scheduler, RNG
        meta.json        step, consumed samples, layout saved at, architectures, gkd version
        config.yaml      the resolved run config
        manifest.json    size and sha256 of every file above (written last)
    latest               name of the newest complete step folder
    .tmp-step_0000200/   a save in progress (never taken as latest; removed by the next save)

A save writes into ``.tmp-*``, then rank 0 writes the manifest, renames the folder into place and
replaces ``latest`` atomically; older folders beyond ``keep_last`` are removed. A folder without a
manifest is incomplete and ignored. Loading works at any TP/PP/DP layout (megatron's
``fully_reshardable`` optimizer format); RNG states are restored only at the layout they were saved
at.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{7})$")
MODEL_PREFIX = "model."
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or of another model."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            rel = path.relative_to(folder).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, folder / "manifest.json")


def verify_manifest(folder: Path, *, checksums: bool = True) -> None:
    """Raise :class:`CheckpointError` naming the first missing or damaged file."""
    manifest = folder / "manifest.json"
    if not manifest.exists():
        raise CheckpointError(
            f"{folder} is incomplete (no manifest.json): it was not fully written"
        )
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{manifest} is damaged ({exc}); restore it or use an older checkpoint"
        ) from exc
    for rel, info in files.items():
        path = folder / rel
        if not path.exists():
            raise CheckpointError(f"checkpoint file {path} is missing; use an older checkpoint")
        if path.stat().st_size != info["size"]:
            raise CheckpointError(
                f"checkpoint file {path} has {path.stat().st_size} bytes, expected {info['size']} "
                "(truncated or overwritten); use an older checkpoint"
            )
        if checksums and _sha256(path) != info["sha256"]:
            raise CheckpointError(
                f"checkpoint file {path} is damaged (sha256 mismatch); use an older checkpoint"
            )


def read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    if not path.exists():
        raise CheckpointError(f"{folder} is not a gkd checkpoint (no meta.json)")
    return json.loads(path.read_text())


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a step folder, a ``checkpoints`` root or a run output dir."""
    path = Path(path)
    if (path / "meta.json").exists():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_complete(root)
        if found is not None:
            return found
    raise CheckpointError(
        f"no complete gkd checkpoint at {path}: expected a folder with meta.json and manifest.json, "
        "or a run directory whose checkpoints/ holds one"
    )


def latest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``; the ``latest`` pointer first, else a scan."""
    if not root.is_dir():
        return None
    pointer = root / "latest"
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if (candidate / "manifest.json").exists():
            return candidate
        log.warning(
            "checkpoint pointer %s names %s, which is incomplete; scanning", pointer, candidate.name
        )
    steps = sorted(
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / "manifest.json").exists()
    )
    return steps[-1][1] if steps else None


@dataclass
class ExtraShardedState:
    """Trainable state saved beside the student's weights (the methods' modules): its ShardedTensors
    share the optimizer's parameter mapping with the student's. Keys must not start with
    ``model.``, so loading a checkpoint as a teacher or exporting it reads the student alone."""

    sharded_state_dict: Callable[[], dict]
    """``() -> {key: ShardedTensor}`` of this rank's part."""
    load: Callable[[dict], None]
    """Copies the loaded ``{key: tensor}`` back in."""


@dataclass
class MethodRuntimeState:
    """The methods' state between steps that is not a parameter (``methods.base.HasRuntimeState``),
    one picklable object per rank, saved as a ``ShardedObject`` keyed by (pp, tp, dp) rank like the
    RNG state and restored only at the same layout."""

    get: Callable[[], dict]
    load: Callable[[dict], None]


def _per_rank(key: str, layout: Layout, data):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        key,
        data,
        (layout.pp, layout.tp, layout.dp),
        (layout.pp_rank, layout.tp_rank, layout.dp_rank),
        replica_id=0,
    )


def _model_and_extra(model, extra: ExtraShardedState | None) -> dict:
    model_sd = model.sharded_state_dict(prefix=MODEL_PREFIX)
    if extra is None:
        return model_sd
    more = extra.sharded_state_dict()
    clash = [k for k in more if k.startswith(MODEL_PREFIX) or k in model_sd]
    if clash:
        raise ValueError(
            f"extra checkpoint keys {clash[:3]} clash with the student's ({MODEL_PREFIX}*)"
        )
    return {**model_sd, **more}


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "cpu": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _rng_sharded(layout: Layout, data):
    return _per_rank("rng_state", layout, data)


def save_error_advice(err: OSError, root: Path) -> str:
    """What to do about a failed checkpoint write, by its errno (a full disk is one cause of many)."""
    import errno

    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"free space under {root} or raise the quota, or lower output.keep_last"
    if code == errno.EPIPE:
        return (
            "a pipe to a checkpoint writer closed (Broken pipe): the process was interrupted or a "
            "writer process died mid-save; check the other ranks' logs and rerun"
        )
    if code == errno.EIO:
        return f"the storage under {root} reported an I/O error: check the disk or file system, then rerun"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{root} is not writable (permissions or a read-only file system): fix that or set output.dir elsewhere"
    return f"fix the cause ({err.strerror or err}) and rerun"


def save(
    root: Path,
    *,
    step: int,
    model,
    optimizer,
    scheduler,
    layout: Layout,
    meta: dict,
    config_yaml: str,
    keep_last: int,
    extra_files: dict[str, Path] | None = None,
    method_modules: ExtraShardedState | None = None,
    method_state: MethodRuntimeState | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final folder. ``extra_files`` (name -> source)
    are copied into the checkpoint (e.g. the vocabulary mapping of a compressed student), so they
    travel with it and are covered by the manifest."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            log.warning("removing incomplete checkpoint %s left by an interrupted save", stale)
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.glob("step_*"):  # renamed into place only with a manifest: damaged since
            if STEP_DIR.match(stale.name) and not (stale / "manifest.json").exists():
                log.warning("removing incomplete checkpoint %s (no manifest.json)", stale)
                shutil.rmtree(stale, ignore_errors=True)
        (tmp / "dist").mkdir(parents=True)
    dist.barrier()
    model_sd = _model_and_extra(model, method_modules)
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_FORMAT),
        "scheduler": scheduler.state_dict(),
        "rng_state": _rng_sharded(layout, _rng_state()),
        "step": step,
    }
    if method_state is not None:
        state["method_state"] = _per_rank("method_state", layout, method_state.get())
    try:
        dist_checkpointing.save(state, str(tmp / "dist"), content_metadata=OPTIMIZER_FORMAT)
        dist.barrier()
        if rank == 0:
            meta = {
                **meta,
                "step": step,
                "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
                **({"method_state": True} if method_state is not None else {}),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            (tmp / "config.yaml").write_text(config_yaml)
            for name, source in (extra_files or {}).items():
                shutil.copyfile(source, tmp / name)
            write_manifest(tmp)
    except OSError as err:  # disk full, quota, I/O error: the folder stays .tmp-*, never latest
        previous = latest_complete(root)
        raise CheckpointError(
            f"writing checkpoint {final.name} on rank {rank} failed ({err}); the previous checkpoint "
            f"{previous.name if previous else '(none)'} is intact and a rerun resumes from it; "
            f"{save_error_advice(err, root)} (the partial {tmp.name} is removed by the next save)"
        ) from err
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / "latest")
        _prune(root, keep_last)
    dist.barrier()
    return final


def save_model_weights(folder: Path, *, model, meta: dict, config_yaml: str = "") -> Path:
    """Collective: a weights-only gkd checkpoint (no optimizer), e.g. an imported teacher.

    Written to ``folder.tmp`` then renamed; loadable by :func:`load_model_weights` and as a
    teacher at any layout."""
    from megatron.core import dist_checkpointing

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "dist").mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(
        {"model": model.sharded_state_dict(prefix=MODEL_PREFIX)}, str(tmp / "dist")
    )
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "weights_only": True}, indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
        write_manifest(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    dist.barrier()
    return folder


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
    try:  # the checkpoint ``best`` names (train.best_metric) is kept too
        best = (root / "best").read_text().strip()
    except OSError:
        best = None
    for _, path in steps[:-keep_last]:
        if path.name != best:
            shutil.rmtree(path, ignore_errors=True)


def load_training_state(
    folder: Path,
    *,
    model,
    optimizer,
    scheduler,
    layout: Layout,
    method_modules: ExtraShardedState | None = None,
    method_state: MethodRuntimeState | None = None,
) -> dict:
    """Collective: restore student weights, method modules, optimizer, scheduler (and the RNG and
    the methods' runtime state at the same layout)."""
    from megatron.core import dist_checkpointing

    meta = read_meta(folder)
    same_layout = meta.get("layout") == {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not inner.optimizer.state:
            # Without apex/TE, megatron's optimizer state_dict needs existing Adam states to
            # describe the layout it loads into; a zero-gradient step creates them (the load
            # overwrites them, and the model weights, right after).
            inner._init_optimizer_states_with_dummy_values()
    model_sd = _model_and_extra(model, method_modules)
    template = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=OPTIMIZER_FORMAT
        ),
    }
    if same_layout:
        template["rng_state"] = _rng_sharded(layout, None)
    restore_state = method_state is not None and meta.get("method_state", False)
    if restore_state and same_layout:
        template["method_state"] = _per_rank("method_state", layout, None)
    elif restore_state and dist.get_rank() == 0:
        log.warning(
            "the methods' state between steps (e.g. rl_kd's kept selections) is restored at the "
            "checkpoint's layout only (%s); this run starts without it",
            meta.get("layout"),
        )
    loaded = dist_checkpointing.load(template, str(folder / "dist"))
    student = {k: v for k, v in loaded["model"].items() if k.startswith(MODEL_PREFIX)}
    model.load_state_dict(_strip(student), strict=True)
    if method_modules is not None:
        method_modules.load(
            {k: v for k, v in loaded["model"].items() if not k.startswith(MODEL_PREFIX)}
        )
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    if method_state is not None and "method_state" in loaded:
        method_state.load(loaded["method_state"])
    return meta


def _strip(state: dict) -> dict:
    return {
        k[len(MODEL_PREFIX) :] if k.startswith(MODEL_PREFIX) else k: v for k, v in state.items()
    }


LAYER_KEY_PREFIX = MODEL_PREFIX + "decoder.layers."


def resolve_layer_map(
    spec: list[int] | str, *, student_layers: int, saved_layers: int
) -> list[int]:
    """The checkpoint layer (0-based) that each student layer starts from, for ``spec``:

    * a list of layer indices, one per student layer;
    * ``"first"``: the checkpoint's first ``student_layers`` layers (PKD, Sun et al. 2019, Sec. 4.1:
      "initialized with the first k layers");
    * ``"every:K"``: layers ``K-1, 2K-1, ...`` (the top layer of each group of ``K``, the layers
      PKD-Skip and uniform layer maps align with; ``every:2`` of 12 layers: 1, 3, ..., 11).

    ``ValueError`` naming the problem and the fix."""
    if isinstance(spec, str):
        text = spec.strip()
        if text == "first":
            layers = list(range(student_layers))
        elif text.startswith("every:") and text[len("every:") :].strip().isdigit():
            k = int(text[len("every:") :])
            if k < 1:
                raise ValueError(f"init_layers={spec!r}: K must be at least 1")
            layers = [(j + 1) * k - 1 for j in range(student_layers)]
        else:
            raise ValueError(
                f"init_layers={spec!r} is not a list of layer indices, 'first' or 'every:K'"
            )
    else:
        layers = [int(i) for i in spec]
    if len(layers) != student_layers:
        raise ValueError(
            f"init_layers names {len(layers)} layers but the student has num_layers="
            f"{student_layers}; give one checkpoint layer per student layer"
        )
    bad = [i for i in layers if not 0 <= i < saved_layers]
    if bad:
        raise ValueError(
            f"init_layers={spec!r} takes layer(s) {bad} of a checkpoint with {saved_layers} layers "
            f"(valid: 0-{saved_layers - 1})"
        )
    return layers


def _remap_layers(tree, layer_map: list[int], saved_layers: int):
    """``tree`` (a sharded state dict) with every per-layer entry pointing at the checkpoint layer
    ``layer_map[j]`` of ``saved_layers`` instead of layer ``j`` (megatron-core stacks a block's
    layers on a prepended axis 0: global offset = global layer number)."""
    import dataclasses

    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    def remap(leaf):
        if not getattr(leaf, "key", "").startswith(LAYER_KEY_PREFIX):
            return leaf
        if isinstance(leaf, ShardedTensor):
            if leaf.prepend_axis_num < 1:
                raise CheckpointError(f"{leaf.key}: no layer axis to remap")
            frag = leaf.axis_fragmentations
            return dataclasses.replace(
                leaf,
                global_shape=(saved_layers, *leaf.global_shape[1:]),
                global_offset=(layer_map[leaf.global_offset[0]], *leaf.global_offset[1:]),
                axis_fragmentations=None if frag is None else (saved_layers, *frag[1:]),
            )
        if isinstance(leaf, ShardedObject):
            return dataclasses.replace(
                leaf,
                global_shape=(saved_layers, *leaf.global_shape[1:]),
                global_offset=(layer_map[leaf.global_offset[0]], *leaf.global_offset[1:]),
            )
        if isinstance(leaf, ShardedTensorFactory):
            build = leaf.build_fn

            def remapped_build(*args, **kwargs):
                return _remap_layers(build(*args, **kwargs), layer_map, saved_layers)

            return dataclasses.replace(leaf, build_fn=remapped_build)
        return leaf

    if isinstance(tree, dict):
        return {k: _remap_layers(v, layer_map, saved_layers) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_remap_layers(v, layer_map, saved_layers) for v in tree]
    return remap(tree)


def load_model_weights(folder: Path, model, *, layer_map: list[int] | None = None) -> dict:
    """Collective: load only the model weights of a gkd checkpoint into ``model`` (any layout).

    ``layer_map`` (student initialized by truncating a deeper checkpoint): student layer ``j``
    loads checkpoint layer ``layer_map[j]``; embeddings, final norm and output layer load as they
    are, so every width must match (:func:`resolve_layer_map` builds the map)."""
    from megatron.core import dist_checkpointing

    meta = read_meta(folder)
    sharded = model.sharded_state_dict(prefix=MODEL_PREFIX)
    if layer_map is not None:
        saved_layers = int(meta.get("arch", {}).get("num_layers", 0))
        if saved_layers < 1:
            raise CheckpointError(f"{folder}/meta.json names no arch.num_layers to truncate from")
        sharded = _remap_layers(sharded, list(layer_map), saved_layers)
    # A truncated load reads some checkpoint layers and skips others: megatron's check that every
    # shard is read exactly once does not apply (each student parameter is still loaded: missing
    # keys are caught below).
    loaded = dist_checkpointing.load(
        {"model": sharded}, str(folder / "dist"), validate_access_integrity=layer_map is None
    )
    missing, unexpected = model.load_state_dict(_strip(loaded["model"]), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks weights {missing[:5]}")
    return meta


@dataclass
class TrainingCheckpoint:
    """This rank's part of a training run's checkpoint: the student, the methods' modules, the
    optimizer and the scheduler at one layout (:func:`save` and :func:`load_training_state` with
    them bound)."""

    model: torch.nn.Module
    """The student GPTModel (its keys get the ``model.`` prefix)."""
    optimizer: object
    scheduler: object
    layout: Layout
    method_modules: ExtraShardedState | None = None
    method_state: MethodRuntimeState | None = None

    def save(
        self,
        root: Path,
        *,
        step: int,
        meta: dict,
        config_yaml: str,
        keep_last: int,
        extra_files: dict[str, Path] | None = None,
    ) -> Path:
        """Collective: :func:`save` of this state; returns the final folder."""
        return save(
            root,
            step=step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            layout=self.layout,
            method_modules=self.method_modules,
            method_state=self.method_state,
            meta=meta,
            config_yaml=config_yaml,
            keep_last=keep_last,
            extra_files=extra_files,
        )

    def load(self, folder: Path) -> dict:
        """Collective: :func:`load_training_state` into this state; returns the checkpoint's meta."""
        return load_training_state(
            folder,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            layout=self.layout,
            method_modules=self.method_modules,
            method_state=self.method_state,
        )
