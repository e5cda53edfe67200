"""Bad input is refused by `gkd distill` before anything heavy runs and with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gkd_cli.app import _prepare_output, app
from gkd_cli.config import load_config
from gkd_cli.errors import ConfigError
from parallel import checkpoint as ckpt

pytestmark = [pytest.mark.faults, pytest.mark.unit]
ASSETS = Path(__file__).resolve().parents[2] / "gkd_cli" / "assets"
TEACHER = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512, max_seq_len=64)
STUDENT = dict(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=512, max_seq_len=64)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from gkd_cli.data import train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([ASSETS / "demo_valid.txt"], 512, path)
    return path


def _cfg(tmp_path: Path, tokenizer: Path, **data) -> dict:
    return {
        "teacher": {**TEACHER, "init": "random"},
        "student": dict(STUDENT),
        "methods": [{"name": "lm"}],
        "parallel": {"tp": 1, "pp": 1, "dp": 1},
        "data": {
            "train_files": [str(ASSETS / "demo_valid.txt")],
            "tokenizer": str(tokenizer),
            "seq_length": 32,
            **data,
        },
        "train": {"steps": 2, "global_batch_size": 2, "micro_batch_size": 1},
        "output": {"dir": str(tmp_path / "out")},
    }


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(tmp_path: Path, cfg: dict | str, *needles: str, dry_run: bool = True) -> str:
    """Run ``gkd distill`` on ``cfg``: it must exit 2 with one error naming ``needles``, print no
    traceback and leave ``tmp_path`` as it was (no output dir, config.yaml, logs/ or probe)."""
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, ["distill", str(path), *(["--dry-run"] if dry_run else [])])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, (text, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error
    assert "Traceback" not in result.output and text.startswith("error: "), text
    for needle in needles:
        assert needle in text, (needle, text)
    assert not (tmp_path / "out").exists(), "a refused run wrote its output directory"
    assert _tree(tmp_path) == before, "a refused run wrote files"
    return text


@pytest.fixture
def no_launch(monkeypatch):
    """Refusals are tested without --dry-run (nothing may be written even on the real path); a
    config that is wrongly accepted fails here instead of starting workers."""
    import gkd_cli.app as app_module

    def launched(*args, **kwargs):
        raise AssertionError("bad input reached the launch")

    monkeypatch.setattr(app_module, "_run_preemptible", launched)


def test_good_config_passes(tmp_path, tokenizer):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_cfg(tmp_path, tokenizer)))
    result = CliRunner().invoke(app, ["distill", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output


def test_malformed_yaml(tmp_path):
    _refused(tmp_path, "student: {num_layers: 2\nmethods: [", "malformed YAML")


def test_wrong_type_and_unknown_key(tmp_path, tokenizer):
    cfg = _cfg(tmp_path, tokenizer)
    cfg["train"]["steps"] = "many"
    _refused(tmp_path, cfg, "train.steps")
    cfg = _cfg(tmp_path, tokenizer)
    cfg["train"]["stepz"] = 3
    _refused(tmp_path, cfg, "stepz")


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "is empty"),
        (b"caf\xe9 au lait\n", "not valid UTF-8"),
        (b"two words\n", "fewer than one sequence"),
    ],
    ids=["empty", "latin1", "short"],
)
def test_bad_corpus(tmp_path, tokenizer, content, needle):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    _refused(
        tmp_path,
        _cfg(tmp_path, tokenizer, train_files=[str(corpus)]),
        "data.train_files",
        needle,
        str(corpus),
    )


def test_tokenizer_larger_than_model_vocabulary(tmp_path, tokenizer):
    cfg = _cfg(tmp_path, tokenizer)
    cfg["teacher"]["vocab_size"] = cfg["student"]["vocab_size"] = 300
    _refused(tmp_path, cfg, "data.tokenizer", "512 tokens")


def _fake_checkpoint(tmp_path: Path, tokenizer: Path, **arch_changes) -> Path:
    """A gkd checkpoint folder: meta.json with the teacher's architecture, shard files, manifest."""
    folder = tmp_path / "teacher_ckpt" / "checkpoints" / "step_0000010"
    (folder / "dist").mkdir(parents=True)
    arch = vars(load_config_dict(tmp_path, tokenizer).teacher.arch())
    (folder / "meta.json").write_text(json.dumps({"step": 10, "arch": {**arch, **arch_changes}}))
    for i in range(2):
        (folder / "dist" / f"__{i}_0.distcp").write_bytes(bytes(range(256)) * 8)
    ckpt.write_manifest(folder)
    (folder.parent / "latest").write_text(folder.name)
    return folder


def load_config_dict(tmp_path: Path, tokenizer: Path):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(_cfg(tmp_path, tokenizer)))
    return load_config(path)


def test_teacher_checkpoint_missing_shard(tmp_path, tokenizer):
    folder = _fake_checkpoint(tmp_path, tokenizer)
    (folder / "dist" / "__1_0.distcp").unlink()
    cfg = _cfg(tmp_path, tokenizer)
    cfg["teacher"].update(checkpoint=str(tmp_path / "teacher_ckpt"), init="checkpoint")
    _refused(tmp_path, cfg, "teacher.checkpoint", "__1_0.distcp", "is missing")


def test_teacher_checkpoint_truncated_shard(tmp_path, tokenizer):
    folder = _fake_checkpoint(tmp_path, tokenizer)
    shard = folder / "dist" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    cfg = _cfg(tmp_path, tokenizer)
    cfg["teacher"].update(checkpoint=str(tmp_path / "teacher_ckpt"), init="checkpoint")
    _refused(tmp_path, cfg, "teacher.checkpoint", "__0_0.distcp", "100 bytes")


def test_teacher_checkpoint_of_other_architecture(tmp_path, tokenizer):
    _fake_checkpoint(tmp_path, tokenizer, hidden_size=128)
    cfg = _cfg(tmp_path, tokenizer)
    cfg["teacher"].update(checkpoint=str(tmp_path / "teacher_ckpt"), init="checkpoint")
    _refused(
        tmp_path,
        cfg,
        "teacher.checkpoint",
        "another architecture",
        "hidden_size: checkpoint 128 vs config 64",
    )


@pytest.mark.parametrize(
    ("init_layers", "student_changes", "needles"),
    [
        ([0, 5], {"num_layers": 2}, ["student.init_layers", "layer(s) [5]", "with 2 layers"]),
        ("every:2", {"num_layers": 2}, ["student.init_layers", "layer(s) [3]", "valid: 0-1"]),
        ([0], {"num_layers": 2}, ["student.init_layers", "names 1 layers", "num_layers=2"]),
        ("last:1", {}, ["student.init_layers", "'first' or 'every:K'"]),
        ("first", {"hidden_size": 48}, ["another architecture", "hidden_size: checkpoint"]),
    ],
    ids=["out-of-range", "every-too-deep", "count-mismatch", "unknown-spec", "other-width"],
)
def test_student_truncation_refusals(tmp_path, tokenizer, init_layers, student_changes, needles):
    # the checkpoint holds the teacher's architecture (2 layers, hidden 64)
    _fake_checkpoint(tmp_path, tokenizer)
    cfg = _cfg(tmp_path, tokenizer)
    teacher_arch = {k: v for k, v in TEACHER.items() if k != "init"}
    cfg["student"] = {
        **teacher_arch,
        **student_changes,
        "checkpoint": str(tmp_path / "teacher_ckpt"),
        "init_layers": init_layers,
    }
    _refused(tmp_path, cfg, *needles)


def test_teacher_init_layers_and_truncation_without_checkpoint(tmp_path, tokenizer, no_launch):
    cfg = _cfg(tmp_path, tokenizer)
    cfg["teacher"]["init_layers"] = "first"
    _refused(tmp_path, cfg, "teacher.init_layers", "only the student")
    cfg = _cfg(tmp_path, tokenizer)
    cfg["student"]["init_layers"] = "first"
    _refused(tmp_path, cfg, "student.init_layers needs student.checkpoint")


def test_output_dir_of_another_run_is_refused(tmp_path, tokenizer):
    cfg = load_config_dict(tmp_path, tokenizer)
    out = Path(cfg.output.dir)
    out.mkdir()
    other = yaml.safe_load((tmp_path / "plain.yaml").read_text())
    other["train"]["lr"] = 0.123
    (out / "config.yaml").write_text(yaml.safe_dump(other))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError, match="already holds another run"):
        _prepare_output(cfg, None)
    assert sorted(p.name for p in out.iterdir()) == before


# ---------------------------------------------------------------------------------------------
# Issue 20, defect 6: bad input that used to crash a worker or be silently accepted. Each case runs
# the real `gkd distill` without --dry-run: refused with exit 2, naming the field and the fix.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, needles",
    [
        # softmax(z / T) needs T > 0; T = 0 used to fail in a worker at step 1
        ({"name": "glmd", "temperature": 0}, ["methods.0", "glmd.temperature=0.0", "must be > 0"]),
        ({"name": "kd", "temperature": -2.0}, ["methods.0", "kd.temperature=-2.0", "must be > 0"]),
        # a schedule is checked at every value it takes (its ends)
        (
            {"name": "forward_kl", "temperature": {"type": "linear", "start": 2.0, "end": 0.0}},
            ["forward_kl.temperature", "must be > 0"],
        ),
        ({"name": "kd", "hard_weight": -1}, ["kd.hard_weight=-1.0", "must be >= 0"]),
        ({"name": "jsd", "beta": 1.5}, ["jsd.beta=1.5", "must be in [0, 1]"]),  # an interpolation
        ({"name": "skew_kl", "alpha": -0.1}, ["skew_kl.alpha=-0.1", "must be in [0, 1]"]),
        ({"name": "topk_kd", "k": 0}, ["topk_kd.k=0", "must be >= 1"]),
        ({"name": "pkd", "alpha": 2.0}, ["pkd.alpha=2.0", "must be in [0, 1]"]),
        (
            {"name": "lm", "weight": {"type": "step", "boundaries": [1], "values": [1.0, -0.5]}},
            ["methods.0.weight", "must be >= 0"],
        ),
    ],
    ids=[
        "glmd-T0",
        "kd-Tneg",
        "T-schedule-to-0",
        "neg-weight",
        "jsd-beta",
        "skew-alpha",
        "topk-k0",
        "pkd-alpha",
        "neg-weight-schedule",
    ],
)
def test_method_parameter_out_of_range(tmp_path, tokenizer, no_launch, method, needles):
    cfg = _cfg(tmp_path, tokenizer)
    cfg["methods"] = [method]
    _refused(tmp_path, cfg, *needles, dry_run=False)


def test_jsonl_text_field_not_a_string(tmp_path, tokenizer, no_launch):
    corpus = tmp_path / "c.jsonl"
    good = json.dumps({"text": (ASSETS / "demo_valid.txt").read_text()[:4000]})
    corpus.write_text(f"{good}\n{json.dumps({'text': 42})}\n")
    cfg = _cfg(tmp_path, tokenizer, train_files=[str(corpus)], format="jsonl")
    _refused(
        tmp_path,
        cfg,
        "data.train_files",
        f"{corpus}:2",
        "'text' is a number (42), not a string",
        dry_run=False,
    )


def test_jsonl_text_field_missing_names_the_keys(tmp_path, tokenizer, no_launch):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"body": "some words", "id": 3}) + "\n")
    cfg = _cfg(tmp_path, tokenizer, train_files=[str(corpus)], format="jsonl")
    _refused(
        tmp_path, cfg, f"{corpus}:1", "no field 'text'", "'body'", "data.text_field", dry_run=False
    )


def test_jsonl_bad_line_beyond_the_preflight_scan_is_named_by_the_tokenizer(tmp_path, tokenizer):
    """Corpora larger than preflight.SCAN_BYTES are parsed only up to it at launch; the workers
    tokenize the rest before the first step and fail naming the file and line."""
    from gkd_cli.data import build_token_stream, load_tokenizer
    from gkd_cli.data.documents import check_format

    corpus = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(2000)]
    lines.append(json.dumps({"text": ["a", "list"]}))
    corpus.write_text("\n".join(lines) + "\n")
    check_format(corpus, "jsonl", "text", limit_bytes=4096)  # the line lies beyond the scan
    with pytest.raises(ValueError, match=rf"{corpus}:2001: field 'text' is a list"):
        check_format(corpus, "jsonl", "text", limit_bytes=1 << 20)
    with pytest.raises(ValueError, match=rf"{corpus}:2001: field 'text' is a list .*not a string"):
        build_token_stream(
            [corpus], load_tokenizer(str(tokenizer)), tmp_path / "cache", fmt="jsonl"
        )
    assert not list((tmp_path / "cache").glob("tokens-*")), "a failed build left a cache"


@pytest.mark.parametrize("where", ["proc", "under_file", "is_file"])
def test_output_dir_that_cannot_be_created(tmp_path, tokenizer, no_launch, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = {"proc": "/proc/gkd-run", "under_file": str(blocker / "run"), "is_file": str(blocker)}[
        where
    ]
    needle = {
        "proc": "/proc does not accept new folders",
        "under_file": f"{blocker} is a file",
        "is_file": "is a file, not a folder",
    }[where]
    cfg = _cfg(tmp_path, tokenizer)
    cfg["output"]["dir"] = out
    _refused(tmp_path, cfg, "output.dir", needle, dry_run=False)
    assert not Path("/proc/gkd-run").exists()


@pytest.mark.parametrize("duplicate", ["section", "key"])
def test_yaml_duplicate_keys(tmp_path, tokenizer, no_launch, duplicate):
    text = yaml.safe_dump(_cfg(tmp_path, tokenizer), sort_keys=False)
    if duplicate == "section":  # a second train: section used to replace the first silently
        text += "train:\n  lr: 0.1\n"
        key = "train:"
    else:
        text = text.replace("train:\n", "train:\n  lr: 0.5\n  lr: 0.1\n", 1)
        key = "  lr:"
    first, second = [i for i, line in enumerate(text.splitlines(), 1) if line.startswith(key)]
    needles = [f"key '{key.strip(' :')}' is given twice (first on line {first})"]
    _refused(tmp_path, text, f"cfg.yaml:{second}:", *needles, "merge the two", dry_run=False)


def test_text_format_on_json_lines(tmp_path, tokenizer, no_launch):
    corpus = tmp_path / "c.jsonl"
    words = (ASSETS / "demo_valid.txt").read_text().split()
    corpus.write_text(
        "".join(
            json.dumps({"text": " ".join(words[i : i + 50])}) + "\n" for i in range(0, 2000, 50)
        )
    )
    cfg = _cfg(tmp_path, tokenizer, train_files=[str(corpus)])  # format defaults to text
    _refused(
        tmp_path,
        cfg,
        "data.train_files",
        str(corpus),
        "is JSON lines",
        "data.format: jsonl",
        dry_run=False,
    )


def test_corpus_of_control_bytes(tmp_path, tokenizer, no_launch):
    corpus = tmp_path / "garbage.txt"
    corpus.write_bytes(bytes(i % 32 for i in range(50_000)))  # valid UTF-8, but not text
    _refused(
        tmp_path,
        _cfg(tmp_path, tokenizer, train_files=[str(corpus)]),
        "data.train_files",
        str(corpus),
        "looks binary",
        "control characters",
        dry_run=False,
    )


def test_utf16_corpus_says_reencode(tmp_path, tokenizer, no_launch):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes((ASSETS / "demo_valid.txt").read_text().encode("utf-16"))  # with its BOM
    _refused(
        tmp_path,
        _cfg(tmp_path, tokenizer, train_files=[str(corpus)]),
        "data.train_files",
        "is UTF-16",
        "iconv -f utf-16 -t utf-8",
        dry_run=False,
    )


def test_gzip_corpus_says_decompress(tmp_path, tokenizer, no_launch):
    import gzip

    corpus = tmp_path / "c.txt.gz"
    corpus.write_bytes(gzip.compress((ASSETS / "demo_valid.txt").read_bytes()))
    text = _refused(
        tmp_path,
        _cfg(tmp_path, tokenizer, train_files=[str(corpus)]),
        "data.train_files",
        "gzip-compressed",
        f"gunzip -k {corpus}",
        dry_run=False,
    )
    assert "iconv" not in text


def test_teacher_checkpoint_that_is_a_file(tmp_path, tokenizer, no_launch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    cfg = _cfg(tmp_path, tokenizer)
    cfg["teacher"].update(checkpoint=str(weights), init="checkpoint")
    text = _refused(
        tmp_path,
        cfg,
        "teacher.checkpoint",
        f"{weights} is a file",
        "expected a folder",
        "config.json",
        dry_run=False,
    )
    assert "does not exist" not in text


def test_sequence_parallel_needs_seq_length_divisible_by_tp(tmp_path, tokenizer, no_launch):
    cfg = _cfg(tmp_path, tokenizer, seq_length=30)
    cfg["parallel"] = {"tp": 4, "pp": 1, "dp": 1, "sequence_parallel": True}
    _refused(tmp_path, cfg, "data.seq_length=30 is not a multiple of 4", "28 or 32", dry_run=False)


def test_sequence_parallel_refuses_forward_changing_methods(tmp_path, tokenizer, no_launch):
    cfg = _cfg(tmp_path, tokenizer)
    cfg["parallel"] = {"tp": 2, "pp": 1, "dp": 1, "sequence_parallel": True}
    cfg["methods"] = [{"name": "lrc_bert"}]
    cfg["train"]["stage"] = "task"  # lrc_bert is a task-stage method (validation builds it)
    _refused(
        tmp_path,
        cfg,
        "methods.0 (lrc_bert) changes the forward pass",
        "parallel.sequence_parallel=false",
        dry_run=False,
    )


def test_refusal_through_the_installed_command(tmp_path, tokenizer):
    """The same refusal through the `gkd` console script in a fresh process (no CliRunner)."""
    import subprocess
    import sys

    cfg = _cfg(tmp_path, tokenizer)
    cfg["methods"] = [{"name": "glmd", "temperature": 0}]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    gkd = Path(sys.executable).with_name("gkd")
    result = subprocess.run(
        [str(gkd), "distill", str(path)], capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and "glmd.temperature=0.0 must be > 0" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_worker_resolves_the_layer_map_from_a_run_directory(tmp_path, tokenizer):
    from gkd_cli.config import load_config
    from gkd_cli.worker import _student_layer_map

    _fake_checkpoint(tmp_path, tokenizer, num_layers=12)
    cfg = _cfg(tmp_path, tokenizer)
    cfg["student"] = {
        **{k: v for k, v in TEACHER.items()},
        "num_layers": 6,
        "checkpoint": str(tmp_path / "teacher_ckpt"),  # a run directory: its latest checkpoint
        "init_layers": "every:2",
    }
    path = tmp_path / "trunc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # PKD-Skip's layers of a 12-layer teacher for a 6-layer student (Sun et al. 2019): 2, 4, ..., 12
    assert _student_layer_map(load_config(path)) == [1, 3, 5, 7, 9, 11]
    cfg["student"]["init_layers"] = "first"
    path.write_text(yaml.safe_dump(cfg))
    assert _student_layer_map(load_config(path)) == [0, 1, 2, 3, 4, 5]
