"""Work-arounds for megatron-core bugs that hit gkd's configurations (not CPU-specific).

Found in 0.16.1; all three are still there in 0.19.2, the newest release checked (upstream code
unchanged; without each fix tests/dist/test_resume_matrix.py fails there), so each applies to every
release in gkd's supported range until :data:`FIXED_IN` names the release that fixed it (then it is
skipped from that release on).

* Loading a ``fully_reshardable`` distributed-optimizer checkpoint with torch's native Adam (no
  apex or Transformer Engine, e.g. on CPU) fails with ``KeyError: 'step'``: the loader copies every
  per-parameter optimizer state, but torch's Adam keeps ``step`` there and the checkpoint restores
  ``step`` separately (from the param groups). Skip keys the checkpoint does not carry per
  parameter; ``step`` is then restored by megatron's own code path.

* The same load gives every parameter's Adam state the *same* ``step`` tensor object; torch's Adam
  increments ``step`` in place once per parameter, so after a resume the bias correction of every
  parameter advances N times per step and resumed runs diverge from uninterrupted ones. Give each
  parameter its own copy after loading.

* Saving a ``fully_reshardable`` checkpoint slices each parameter's optimizer state (and its fp32
  copy, which the load writes back into the weights) out of "world tensors" at the parameter's
  index in the gradient buffer, but ``get_parameter_state_dp_zero`` builds those tensors without
  the padding between buckets. With more than one bucket (pipeline parallelism puts the tied
  embedding in a bucket of its own) every parameter after a padded bucket end is saved shifted,
  partly zero-filled ("param range exceeds unpadded buffer"), and a resume restores a corrupted
  student (the model weights themselves are saved correctly). Lay the world tensors out in buffer
  index space, padding included, while that format is built.

Applied once by :func:`apply`; each fix names the upstream function it wraps.
"""

from __future__ import annotations

import importlib.metadata
import re

import torch

#: The first megatron-core release that fixed each bug upstream; None: not fixed in any release
#: checked (0.16.1 to 0.19.2). A fix is applied only to older releases.
FIXED_IN: dict[str, str | None] = {
    "step_not_in_checkpoint": None,
    "shared_step_tensor": None,
    "unpadded_world_tensors": None,
}

_applied = False


def _release(version: str) -> tuple[int, int, int]:
    """``"0.19.2"`` -> ``(0, 19, 2)``; pre-release and local suffixes (``rc1``, ``+cu``) dropped."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"not a megatron-core release: {version!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def needed(fix: str, version: str | None = None) -> bool:
    """Whether ``fix`` (a :data:`FIXED_IN` key) applies to megatron-core ``version`` (default:
    the installed one)."""
    fixed_in = FIXED_IN[fix]
    if fixed_in is None:
        return True
    if version is None:
        version = importlib.metadata.version("megatron-core")
    return _release(version) < _release(fixed_in)


def apply() -> None:
    global _applied
    if _applied:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if needed("step_not_in_checkpoint"):
        _skip_missing_step(DistributedOptimizer)
    if needed("shared_step_tensor"):
        _private_steps(DistributedOptimizer)
    if needed("unpadded_world_tensors"):
        _world_tensors_in_buffer_space(DistributedOptimizer)
    _applied = True


def _skip_missing_step(DistributedOptimizer) -> None:
    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states_skipping_step(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            step = state.pop("step", None)
            try:
                return original(self, model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_skipping_step


def _private_steps(DistributedOptimizer) -> None:
    original_load = DistributedOptimizer.load_state_dict

    def load_state_dict_with_private_steps(self, state_dict):
        result = original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].detach().clone()
        return result

    DistributedOptimizer.load_state_dict = load_state_dict_with_private_steps


def _world_tensors_in_buffer_space(DistributedOptimizer) -> None:
    original_reshardable = DistributedOptimizer.sharded_param_state_fully_reshardable

    def fully_reshardable_in_buffer_space(self, *args, **kwargs):
        compact = self.get_parameter_state_dp_zero  # bound method

        def expanded(**options):
            return _buffer_space(self, compact(**options))

        self.get_parameter_state_dp_zero = expanded
        try:
            return original_reshardable(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_zero

    DistributedOptimizer.sharded_param_state_fully_reshardable = fully_reshardable_in_buffer_space


def _buffer_space(optimizer, state: dict | None) -> dict | None:
    """``get_parameter_state_dp_zero``'s world tensors (``[sum of buckets' unpadded numel]``,
    buckets back to back) re-laid out as ``[buffer.numel]`` with bucket ``b`` at its start index
    ``buffer.bucket_indices[b][0]``, so ``param_index_map`` ranges index them correctly."""
    if state is None:
        return None
    for gbuf_idx, by_dtype in state.items():
        if not isinstance(gbuf_idx, int):
            continue  # "buckets_coalesced"
        buffer = optimizer.buffers[gbuf_idx]
        # 0.16.1 names Adam's two; later releases list the optimizer's own (Lion has one).
        state_keys = getattr(optimizer, "optimizer_state_keys", ("exp_avg", "exp_avg_sq"))
        for world in by_dtype.values():
            for key in ("param", *state_keys):
                compact = world.get(key)
                if compact is None:
                    continue
                full = torch.zeros(buffer.numel, dtype=compact.dtype, device=compact.device)
                offset = 0
                for (start, _), bucket in zip(buffer.bucket_indices, buffer.buckets, strict=True):
                    n = bucket.numel_unpadded
                    full[start : start + n] = compact[offset : offset + n]
                    offset += n
                world[key] = full
    return state
