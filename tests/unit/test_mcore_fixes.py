"""parallel.mcore_fixes: each work-around applies to the megatron-core releases that need it."""

import importlib.metadata

import pytest

from parallel import mcore_fixes

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("version", "release"),
    [
        ("0.16.1", (0, 16, 1)),
        ("0.19.2", (0, 19, 2)),
        ("0.20", (0, 20, 0)),
        ("0.20.0rc1", (0, 20, 0)),
        ("0.19.2+cu130", (0, 19, 2)),
    ],
)
def test_release_reads_major_minor_patch(version, release):
    assert mcore_fixes._release(version) == release


def test_release_rejects_a_non_version():
    with pytest.raises(ValueError, match="not a megatron-core release"):
        mcore_fixes._release("main")


def test_a_fix_applies_below_the_release_that_fixed_it(monkeypatch):
    monkeypatch.setitem(mcore_fixes.FIXED_IN, "shared_step_tensor", "0.20.0")
    assert mcore_fixes.needed("shared_step_tensor", "0.16.1")
    assert mcore_fixes.needed("shared_step_tensor", "0.19.2")
    assert not mcore_fixes.needed("shared_step_tensor", "0.20.0")
    assert not mcore_fixes.needed("shared_step_tensor", "0.21.1")


def test_every_fix_applies_to_the_checked_releases():
    # All three bugs are present from 0.16.1 through 0.19.2 (the upstream code is unchanged).
    for fix in mcore_fixes.FIXED_IN:
        for version in ("0.16.1", "0.19.2", importlib.metadata.version("megatron-core")):
            assert mcore_fixes.needed(fix, version), (fix, version)


def test_apply_wraps_the_distributed_optimizer_once(monkeypatch):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    names = (
        "_set_main_param_and_optimizer_states",
        "load_state_dict",
        "sharded_param_state_fully_reshardable",
    )
    for name in names:
        monkeypatch.setattr(DistributedOptimizer, name, getattr(DistributedOptimizer, name))
    monkeypatch.setattr(mcore_fixes, "_applied", False)
    before = {name: getattr(DistributedOptimizer, name) for name in names}
    mcore_fixes.apply()
    wrapped = {name: getattr(DistributedOptimizer, name) for name in names}
    assert all(wrapped[name] is not before[name] for name in names)
    mcore_fixes.apply()
    assert {name: getattr(DistributedOptimizer, name) for name in names} == wrapped


def test_apply_skips_a_fix_from_the_release_that_fixed_it(monkeypatch):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict
    monkeypatch.setattr(DistributedOptimizer, "load_state_dict", original)
    for name in ("_set_main_param_and_optimizer_states", "sharded_param_state_fully_reshardable"):
        monkeypatch.setattr(DistributedOptimizer, name, getattr(DistributedOptimizer, name))
    monkeypatch.setattr(mcore_fixes, "_applied", False)
    monkeypatch.setitem(mcore_fixes.FIXED_IN, "shared_step_tensor", "0.0.1")
    mcore_fixes.apply()
    assert DistributedOptimizer.load_state_dict is original
