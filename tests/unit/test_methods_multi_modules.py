"""Method modules on pipeline stages (parallel/method_modules.py): placement, replication flags and
layout-independent checkpoint keys (global shapes, one main replica), without process groups."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from parallel.method_modules import MethodModules, stage_of_layer

pytestmark = pytest.mark.unit


class _Method:
    """Three modules: one per student layer (placed), one shared (replicated), one sharded over tp."""

    def __init__(self, tp: int) -> None:
        self.tp = tp

    def modules(self):
        sharded = torch.nn.Linear(4, 8 // self.tp)
        sharded.weight.tensor_model_parallel = True
        sharded.weight.partition_dim = 0
        sharded.bias.tensor_model_parallel = True
        sharded.bias.partition_dim = 0
        return {
            "proj_l0": torch.nn.Linear(4, 6),
            "proj_l3": torch.nn.Linear(4, 6),
            "shared": torch.nn.Linear(4, 4),
            "heads": sharded,
        }

    def module_layers(self):
        return {"proj_l0": 0, "proj_l3": 3, "heads": -1}


@dataclass
class _Entry:
    name: str
    method: object


def _build(pp_rank: int, *, pp: int = 2, tp: int = 2, tp_rank: int = 0) -> MethodModules:
    return MethodModules(
        [_Entry("m", _Method(tp))], student_layers=4, pp=pp, pp_rank=pp_rank, tp_rank=tp_rank, dp_rank=0, seed=1,
        device=torch.device("cpu"), dtype=torch.float32,
    )  # fmt: skip


def test_stage_of_layer_follows_megatrons_even_split():
    assert [stage_of_layer(layer, 4, 2) for layer in range(4)] == [0, 0, 1, 1]
    assert stage_of_layer(-1, 4, 2) == 1


def test_placed_modules_live_on_their_stage_and_shared_ones_everywhere():
    first, last = _build(0), _build(1)
    assert set(first.by_method["m"]) == {"proj_l0", "shared"}
    assert set(last.by_method["m"]) == {"proj_l3", "shared", "heads"}
    assert not any(getattr(p, "shared", False) for p in first.parameters())
    shared_last = {n for n, p in last.named_parameters() if getattr(p, "shared", False)}
    assert shared_last == {
        "by_method.m.shared.weight",
        "by_method.m.shared.bias",
    }  # counted once in the norm
    assert len(last.replicated_parameters()) == 2


def test_initialization_is_the_same_on_every_stage_and_layout():
    a, b = _build(0), _build(1, tp_rank=1)
    assert torch.equal(a.by_method["m"]["shared"].weight, b.by_method["m"]["shared"].weight)


def test_checkpoint_keys_are_global_and_saved_once():
    sharded = {}
    for pp_rank in (0, 1):
        for tp_rank in (0, 1):
            sd = _build(pp_rank, tp_rank=tp_rank).sharded_state_dict(tp=2)
            for key, tensor in sd.items():
                sharded.setdefault(key, []).append(tensor)
    assert set(sharded) == {
        f"methods.m.{n}.{p}"
        for n in ("proj_l0", "proj_l3", "shared", "heads")
        for p in ("weight", "bias")
    }
    for key, tensors in sharded.items():
        main = [t for t in tensors if all(i == 0 for i in t.replica_id)]
        if ".heads." in key:  # tp-sharded: one main piece per tp rank, global shape 8
            assert len(main) == 2 and tensors[0].global_shape[0] == 8
            assert sorted(t.global_offset[0] for t in main) == [0, 4]
        else:
            assert len(main) == 1, key
