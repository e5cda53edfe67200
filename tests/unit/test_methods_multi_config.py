"""Config checks for multi-teacher runs and for methods against the pipeline layout (before
launch, with the reason)."""

from __future__ import annotations

import pytest
import yaml

from gkd_cli.config import dump_config, load_config_text
from gkd_cli.errors import ConfigError

pytestmark = pytest.mark.unit

TEACHER = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=256, init="random")
STUDENT = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=256)


def config(**changes) -> dict:
    cfg = {
        "teacher": TEACHER,
        "student": STUDENT,
        "methods": [{"name": "glmd"}],
        "parallel": {"tp": 1, "pp": 2},
        "data": {"tokenizer": "tok.json", "train_files": ["x.txt"], "seq_length": 16},
        "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2},
        "output": {"dir": "/tmp/gkd-test-run"},
    }
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not None}


def load(cfg: dict):
    return load_config_text(yaml.safe_dump(cfg), check_paths=False)


def test_teachers_list_loads_dumps_and_reloads():
    cfg = load(
        config(
            teacher=None,
            teachers=[TEACHER, {**TEACHER, "hidden_size": 48}],
            methods=[{"name": "tmkd", "method": {"name": "kd", "hard_weight": 0}}],
            train={"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "stage": "task"},
        )
    )
    assert [t.hidden_size for t in cfg.teachers] == [64, 48]
    again = load_config_text(dump_config(cfg), check_paths=False)
    assert again == cfg


def test_teacher_and_teachers_together_are_refused():
    with pytest.raises(ConfigError, match="both teacher and teachers"):
        load(config(teachers=[TEACHER]))


def test_teachers_must_share_a_vocabulary():
    with pytest.raises(ConfigError, match="teachers.1.vocab_size=300"):
        load(config(teacher=None, teachers=[TEACHER, {**TEACHER, "vocab_size": 300}]))


def test_single_stage_method_is_refused_at_pp2_saying_why():
    cfg = config(
        methods=[{"name": "alp_kd"}],
        train={"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "stage": "task"},
    )
    with pytest.raises(ConfigError, match=r"methods\.0 \(alp_kd\).*parallel.pp=1"):
        load(cfg)
    load({**cfg, "parallel": {"tp": 1, "pp": 1}})


def test_layer_pair_across_stages_is_refused_with_the_nearest_aligned_mapping():
    # student layer 0 (stage 0) <- teacher layer 3 (stage 1) at pp=2
    with pytest.raises(ConfigError) as info:
        load(config(methods=[{"name": "tinybert", "layer_map": [3, 3]}]))
    message = str(info.value)
    assert "student layer 0" in message and "teacher layer 3" in message
    assert "layer_map: [1, 3]" in message
    load(config(methods=[{"name": "tinybert", "layer_map": [1, 3]}]))


def test_combiner_checks_its_inner_method_per_teacher():
    cfg = config(
        teacher=None,
        teachers=[TEACHER, TEACHER],
        methods=[{"name": "tmkd", "method": {"name": "tinybert", "layer_map": [3, 3]}}],
    )
    with pytest.raises(ConfigError, match="teacher 0"):
        load(cfg)


def test_forward_changing_method_needs_a_teacher():
    with pytest.raises(ConfigError, match="needs a teacher"):
        load(
            config(
                teacher=None,
                methods=[{"name": "theseus"}],
                train={"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "stage": "task"},
            )
        )


def test_theseus_needs_equal_widths():
    with pytest.raises(ConfigError, match="hidden_size"):
        load(
            config(
                methods=[{"name": "theseus"}],
                train={"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "stage": "task"},
            )
        )
