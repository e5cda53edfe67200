"""``gkd compress-vocab`` through CliRunner: the mapping it writes (checked against a plain
reference: frequencies counted here, balanced per-shard selection, dot-product nearest neighbour
in float64, both selections' coverage at equal student size), the Rich summary, the teacher readers (Hugging Face folder, gkd checkpoint folder) and
bad input as one red line with exit code 2 and nothing written."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from gkd_cli.data.documents import iter_documents
from gkd_cli.data.tokenizer import load_tokenizer, train_bpe
from gkd_cli.superglue import verbalizer_tokens
from gkd_cli.vocab import load_teacher_embedding, read_mapping

pytestmark = [
    pytest.mark.unit,
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

REPO = Path(__file__).resolve().parents[2]
VOCAB = 1024
HIDDEN = 16
runner = CliRunner()


def cli_app() -> typer.Typer:
    """The real ``gkd`` app once it mounts compress-vocab; until then the command alone."""
    from gkd_cli import app as gkd_app

    names = {c.name or c.callback.__name__ for c in gkd_app.app.registered_commands}
    if "compress-vocab" in names:
        return gkd_app.app
    from gkd_cli.compress import compress_vocab_command

    app = typer.Typer(add_completion=False)
    app.callback()(lambda: None)
    app.command("compress-vocab")(compress_vocab_command)
    return app


def run(*args):
    return runner.invoke(cli_app(), ["compress-vocab", *map(str, args)], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    text = (REPO / "gkd_cli" / "assets" / "demo_corpus.txt").read_text(encoding="utf-8")
    corpus = root / "corpus.txt"
    corpus.write_text(text[:120_000], encoding="utf-8")
    tokenizer_path = root / "tokenizer.json"
    tokenizer = train_bpe([corpus], VOCAB, tokenizer_path)
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(VOCAB + 16, HIDDEN, generator=generator)  # HF-style extra rows
    teacher = root / "hf_teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"vocab_size": VOCAB + 16}))
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": embedding}, str(teacher / "model.safetensors"))
    return root, corpus, tokenizer_path, tokenizer, embedding, teacher


def _counts(tokenizer, files):
    counter = Counter()
    for file in files:
        for document in iter_documents(file):
            counter.update(tokenizer.encode(document))
    return np.array([counter.get(i, 0) for i in range(tokenizer.vocab_size)], dtype=np.int64)


def _forced(tokenizer, extra=()):
    ids = set(tokenizer.special_ids)
    for word in [*verbalizer_tokens(), *extra]:
        ids |= set(tokenizer.encode(word))
        if not word[0].isspace():
            ids |= set(tokenizer.encode(" " + word))
    return ids


def _balanced_reference(counts, forced, keep, teacher_padded, tp):
    width, quota = teacher_padded // tp, keep // tp
    kept = set()
    for rank in range(tp):
        ids = range(rank * width, min((rank + 1) * width, len(counts)))
        mine = [i for i in ids if i in forced]
        others = sorted((i for i in ids if i not in forced), key=lambda i: (-counts[i], i))
        kept |= set(mine) | set(others[: quota - len(mine)])
    return kept


def _one_red_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_compress_with_hf_teacher(setup, tmp_path):
    root, corpus, tokenizer_path, tokenizer, embedding, teacher = setup
    keep_file = tmp_path / "keep.txt"
    keep_file.write_text("zebra\n\n quixotic\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run(
        "--tokenizer", tokenizer_path, "--corpus", corpus, "--keep", "0.5", "--teacher", teacher,
        "--out", out, "--tp", "2", "--force-keep", "xylophone", "--force-keep-file", keep_file,
        "--student-hidden", "32", "--workers", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    mapping = read_mapping(
        out / "vocab_mapping.safetensors", expected_tokenizer_hash=tokenizer.hash
    )
    # balanced: V' is exactly the keep size at tp=2, no padding slots
    assert mapping.compressed_vocab_size == 512 == mapping.num_kept
    assert mapping.tp == 2 and mapping.teacher_vocab_padded == 1280  # roundup(1040, 256)
    counts = _counts(tokenizer, [corpus])
    forced = _forced(tokenizer, ["xylophone", "zebra", " quixotic"])
    expected = _balanced_reference(counts, forced, 512, 1280, 2)
    assert set(np.flatnonzero(mapping.kept_mask).tolist()) == expected
    # each dropped token maps to the kept non-special token of largest dot product (the default,
    # GLMD's similarity)
    candidates = np.array(sorted(expected - set(tokenizer.special_ids)))
    emb = embedding.double().numpy()
    dropped = np.flatnonzero(~mapping.kept_mask)
    nearest = candidates[np.argmax(emb[dropped] @ emb[candidates].T, axis=1)]
    assert np.array_equal(mapping.comp_to_orig[mapping.orig_to_comp[dropped]], nearest)
    # coverage of both selections at this student size (512 ids = 256 per shard): the global one
    # is the longest prefix of (forced, then by count) with at most 256 ids in either shard
    order = sorted(forced) + sorted(
        (i for i in range(len(counts)) if i not in forced), key=lambda i: (-counts[i], i)
    )
    per_shard, prefix = [0, 0], []
    for i in order:
        per_shard[i // 640] += 1
        if max(per_shard) > 256:
            break
        prefix.append(i)
    same = json.loads((out / "vocab_report.json").read_text())["equal_size"]
    assert same["global_kept"] == len(prefix) and same["balanced_kept"] == 512
    assert same["global_coverage"] == pytest.approx(counts[prefix].sum() / counts.sum())
    assert same["balanced_coverage"] == pytest.approx(counts[sorted(expected)].sum() / counts.sum())
    assert same["balanced_unseen_kept"] == sum(counts[i] == 0 for i in expected - forced)
    assert "at this student size" in result.stdout
    # the summary
    for words in ("Vocabulary compression", "512 ids at tp=2", "tokens/s", "coverage",
                  "Most frequent dropped tokens", "student.vocab_size=512"):  # fmt: skip
        assert words in result.stdout, result.stdout
    kept_share = counts[sorted(expected)].sum() / counts.sum()
    assert f"{100 * kept_share:.2f}% of corpus tokens" in result.stdout
    report = json.loads((out / "vocab_report.json").read_text())
    assert report["parameters"]["parameters_saved"] == (1024 - 512) * 32
    assert report["selection"] == "balanced"
    compressed = load_tokenizer(out / "tokenizer")
    assert compressed.vocab_size == 512
    assert (
        compressed.encode("the cat") == mapping.orig_to_comp[tokenizer.encode("the cat")].tolist()
    )


def test_global_selection_and_glob(setup, tmp_path):
    root, corpus, tokenizer_path, tokenizer, _, teacher = setup
    out = tmp_path / "out"
    result = run(
        "--tokenizer", tokenizer_path, "--corpus", str(root / "corp*.txt"), "--keep", "256",
        "--teacher", teacher, "--out", out, "--selection", "global", "--similarity", "dot",
        "--workers", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    mapping = read_mapping(out / "vocab_mapping.safetensors")
    counts = _counts(tokenizer, [corpus])
    forced = _forced(tokenizer)
    others = sorted((i for i in range(VOCAB) if i not in forced), key=lambda i: (-counts[i], i))
    assert set(np.flatnonzero(mapping.kept_mask).tolist()) == forced | set(
        others[: 256 - len(forced)]
    )


def test_map_to_unk_without_teacher_and_more_files(setup, tmp_path):
    root, corpus, tokenizer_path, tokenizer, _, _ = setup
    second = tmp_path / "more.jsonl"
    second.write_text(json.dumps({"body": "zebra zebra zebra quokka"}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run(
        "--tokenizer", tokenizer_path, "--corpus", corpus, second, "--keep", "0.25",
        "--map-to-unk", "--out", out, "--text-field", "body", "--format", "auto",
        "--workers", "0", "--tp", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    mapping = read_mapping(out / "vocab_mapping.safetensors")
    dropped = np.flatnonzero(~mapping.kept_mask)
    assert (mapping.orig_to_comp[dropped] == mapping.orig_to_comp[tokenizer.unk_id]).all()
    report = json.loads((out / "vocab_report.json").read_text())
    assert report["corpus"]["num_documents"] == len(list(iter_documents(corpus))) + 1


def _gkd_checkpoint(
    folder: Path,
    weight: torch.Tensor,
    vocab_size: int,
    key: str = "model.embedding.word_embeddings.weight",
) -> Path:
    """A folder shaped like a gkd checkpoint (the real one is read in the e2e test)."""
    import torch.distributed.checkpoint as dcp

    from parallel.checkpoint import write_manifest

    step = folder / "checkpoints" / "step_0000003"
    (step / "dist").mkdir(parents=True)
    dcp.save(
        {key: weight, "model.other": torch.zeros(3)},
        storage_writer=dcp.FileSystemWriter(str(step / "dist")),
        no_dist=True,
    )
    (step / "dist" / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (step / "meta.json").write_text(json.dumps({"arch": {"vocab_size": vocab_size}, "step": 3}))
    write_manifest(step)
    (folder / "checkpoints" / "latest").write_text(step.name)
    return step


def test_gkd_checkpoint_teacher(setup, tmp_path):
    _, corpus, tokenizer_path, _, embedding, _ = setup
    # 256 padding rows beyond the real 1024 (the padding of the layout a checkpoint was saved at)
    weight = torch.cat([embedding[:VOCAB], torch.zeros(256, HIDDEN)])
    step = _gkd_checkpoint(tmp_path / "run", weight, VOCAB)
    loaded = load_teacher_embedding(tmp_path / "run")
    assert loaded.path == step and loaded.vocab_size == VOCAB and loaded.source == "gkd"
    assert torch.equal(loaded.weight, weight)
    result = run(
        "--tokenizer", tokenizer_path, "--corpus", corpus, "--keep", "0.5", "--teacher",
        tmp_path / "run", "--out", tmp_path / "out", "--workers", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        read_mapping(tmp_path / "out" / "vocab_mapping.safetensors").teacher_vocab_padded == VOCAB
    )


def test_bad_inputs_one_red_line_exit_2_nothing_written(setup, tmp_path):
    root, corpus, tokenizer_path, tokenizer, embedding, teacher = setup
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    other = tmp_path / "other_teacher"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"vocab_size": 4096}))
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(4096, 4)}, str(other / "model.safetensors"))
    small = tmp_path / "small_teacher"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    save_file({"transformer.wte.weight": torch.zeros(1000, 4)}, str(small / "model.safetensors"))
    broken = tmp_path / "broken_teacher"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))
    (broken / "model.safetensors").write_bytes(b"\x00" * 20)
    damaged_ckpt = tmp_path / "damaged"
    step = _gkd_checkpoint(damaged_ckpt, embedding[:VOCAB].clone(), VOCAB)
    shard = next((step / "dist").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    stage_without_embedding = tmp_path / "later_stage"
    _gkd_checkpoint(stage_without_embedding, embedding[:VOCAB].clone(), VOCAB, key="model.other2")
    base = ["--tokenizer", tokenizer_path, "--corpus", corpus, "--workers", "0"]
    cases = [
        (["--keep", "1024", "--teacher", teacher], "not smaller than the vocabulary"),
        (["--keep", "1.5", "--teacher", teacher], "strictly between 0 and 1"),
        (["--keep", "0.5", "--teacher", other], "not the teacher's"),
        (["--keep", "0.5", "--teacher", small], "not the teacher's"),
        (["--keep", "0.5", "--teacher", broken], "model.safetensors is unreadable"),
        (["--keep", "0.5", "--teacher", damaged_ckpt], "has 100 bytes"),
        (["--keep", "0.5", "--teacher", stage_without_embedding], "holds no tensor"),
        (["--keep", "0.5", "--teacher", tmp_path / "nowhere"], "does not exist"),
        (["--keep", "0.5"], "--teacher is required"),
        (["--keep", "0.5", "--teacher", teacher, "--multiple", "64"], "multiple of 128"),
        (["--keep", "0.5", "--teacher", teacher, "--similarity", "l1"], "similarity must be"),
        (["--keep", "0.5", "--teacher", teacher, "--selection", "best"], "selection must be"),
        (
            ["--keep", "0.5", "--teacher", teacher, "--corpus", str(tmp_path / "x*.txt")],
            "matches no file",
        ),  # fmt: skip
        (
            ["--keep", "0.5", "--teacher", teacher, "--tokenizer", tmp_path / "no.json"],
            "does not exist",
        ),  # fmt: skip
    ]
    for args, message in cases:
        result = run(*base, *args, "--out", tmp_path / "out")
        assert result.exit_code == 2, (args, result.output)
        assert message in _one_red_line(result), (args, result.stderr)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), args
    result = run("--tokenizer", tokenizer_path, "--corpus", empty, "--keep", "0.5", "--map-to-unk",
                 "--out", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 2 and "empty" in _one_red_line(result)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(setup, tmp_path):
    _, corpus, tokenizer_path, _, _, teacher = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["--tokenizer", tokenizer_path, "--corpus", corpus, "--keep", "0.5", "--teacher",
            teacher, "--out", out, "--workers", "0"]  # fmt: skip
    result = run(*args)
    assert result.exit_code == 2 and "not empty" in _one_red_line(result)
    assert (out / "precious.txt").read_text() == "keep me"
    result = run(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "precious.txt").exists() and (out / "vocab_mapping.safetensors").is_file()
