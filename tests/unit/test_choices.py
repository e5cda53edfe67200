"""Choice data at the task stage (methods.choices, gkd_cli.data.choices).

References are independent of the code under test: option log-likelihoods from a plain forward of
the prompt and option strings alone; the class-score terms written from GLMKD's equations
(distill/distill_model.py, GLMStudent.pre_loss's finetune branch) with plain math on hand-made
scores; groups counted from the records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gkd_cli.data.batching import step_microbatches
from gkd_cli.data.build import build_example_store
from gkd_cli.data.choices import ChoiceRows, prepare_sources
from gkd_cli.data.formats import DataSource, choice_payload
from gkd_cli.data.tokenizer import train_bpe
from methods import choices as ch
from methods.base import LossContext, Stage
from methods.logit_common import STUDENT_LOGITS, TEACHER_LOGITS
from methods.prediction import GLMD, KD, PD, AnnealingKD, ContinuationKD, KDParams

pytestmark = pytest.mark.unit

RECORDS = [
    {"prompt": "The cat sat on the", "options": [" mat", " moon", " dog"], "label": 0},
    {"prompt": "Is the sky blue?\nAnswer:", "options": [" no", " yes"], "label": 1},
    {"prompt": "It rained, so", "options": [" we stayed in", " the sun was out"], "label": 0},
    {"prompt": "Two plus two is", "options": [" four", " five"], "label": 0},
    {"prompt": "Paris is in", "options": [" France", " Spain", " Italy"], "label": 0},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    text = folder / "corpus.txt"
    text.write_text("\n\n".join(r["prompt"] + "".join(r["options"]) for r in RECORDS) * 4)
    return train_bpe([text], 300)


def _rows(tmp_path, tokenizer, mode="padded", seq_length=40, records=RECORDS):
    path = tmp_path / "choices.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    sources, groups = prepare_sources([DataSource(path=str(path))], tmp_path / "expanded")
    assert groups is not None
    store = build_example_store(
        sources, tokenizer, tmp_path / "store", max_length=seq_length, overlong="refuse"
    )
    return ChoiceRows(store, seq_length, groups, mode=mode, seed=0, shuffle=False, pad_id=0)


class ToyLM(torch.nn.Module):
    """A tiny causal LM: logits_t = W [mean(E x_0..x_t); E x_t; P pos_t]."""

    def __init__(self, vocab: int, width: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, width, generator=g, dtype=torch.float64))
        self.pos = torch.nn.Parameter(torch.randn(64, width, generator=g, dtype=torch.float64))
        self.out = torch.nn.Parameter(
            torch.randn(vocab, 3 * width, generator=g, dtype=torch.float64)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [n] -> [n, V]
        e = self.emb[tokens]
        mean = e.cumsum(0) / torch.arange(1, len(tokens) + 1, dtype=e.dtype).unsqueeze(1)
        return torch.cat([mean, e, self.pos[: len(tokens)]], -1) @ self.out.t()


def _batch_logits(model: ToyLM, micro: dict) -> torch.Tensor:
    """[s*b, V] s-major logits of a collated microbatch, each example run on its own tokens (what
    the block-diagonal mask and restarting positions give)."""
    tokens, ids = micro["tokens"][:, :-1], micro["example_ids"]
    b, s = tokens.shape
    out = torch.zeros(b, s, model.out.shape[0], dtype=torch.float64)
    for r in range(b):
        for e in ids[r].unique().tolist():
            if e < 0:
                continue
            where = torch.nonzero(ids[r] == e).squeeze(1)
            out[r, where] = model(tokens[r, where])
    return out.transpose(0, 1).reshape(s * b, -1)


def _ctx(micro: dict, vocab: int, step: int = 0, total: int = 10) -> LossContext:
    b = micro["tokens"].shape[0]
    return LossContext(
        step=step,
        total_steps=total,
        stage=Stage.TASK,
        loss_mask=micro["loss_mask"].t().reshape(-1).double(),
        labels=micro["tokens"][:, 1:].t().reshape(-1),
        vocab_start=0,
        vocab_size=vocab,
        token_mask=micro["token_mask"].t().reshape(-1).double(),
        example_ids=micro["example_ids"].t().reshape(-1),
        batch_size=b,
        choices=micro["choices"],
    )


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_option_scores_equal_the_log_likelihood_of_each_option_alone(tmp_path, tokenizer, mode):
    rows = _rows(tmp_path, tokenizer, mode=mode)
    vocab = tokenizer.vocab_size
    model = ToyLM(vocab)
    micro = rows.collate([rows.row(0, i) for i in range(rows.rows_in_epoch(0))])
    ctx = _ctx(micro, vocab)
    scores = ch.option_scores(_batch_logits(model, micro), ctx)
    normalized = ch.option_scores(_batch_logits(model, micro), ctx, normalize=True)
    # reference: log p(option | prompt) from a forward of the two strings alone
    expected = torch.full((len(RECORDS), 3), float("-inf"), dtype=torch.float64)
    per_token = expected.clone()
    for g, record in enumerate(RECORDS):
        prompt = tokenizer.encode_batch_framed([record["prompt"]])[0]
        for k, option in enumerate(record["options"]):
            answer = tokenizer.encode_batch([option])[0]
            tokens = torch.tensor(prompt + answer)
            logp = torch.log_softmax(model(tokens), -1)
            total = sum(logp[len(prompt) - 1 + j, answer[j]] for j in range(len(answer)))
            expected[g, k] = total
            per_token[g, k] = total / len(answer)
    assert micro["choices"].labels.tolist() == [r["label"] for r in RECORDS]
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(normalized, per_token, rtol=0, atol=1e-10)


def test_label_logprobs_ignore_padding_columns_and_match_the_fused_head_input():
    from methods.fused_head import HeadInput

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(10, 4, generator=g, dtype=torch.float64)  # 8 real columns + 2 padding
    labels = torch.tensor([0, 3, 7, 1, 2, 5])
    rows = torch.tensor([1, 2, 4])
    logits = hidden @ weight.t()
    expected = torch.log_softmax(logits[:, :8], -1)[rows, labels[rows]]
    kw = dict(vocab_start=0, vocab_size=8, tp_group=None)
    torch.testing.assert_close(ch.label_logprobs(logits, labels, rows, **kw), expected)
    fused = ch.label_logprobs(HeadInput(hidden, weight), labels, rows, **kw)
    torch.testing.assert_close(fused, expected)


S = torch.tensor([[1.0, 2.0, float("-inf")], [0.5, -0.3, 0.1]], dtype=torch.float64)
T = torch.tensor([[0.2, 1.5, float("-inf")], [1.0, 0.0, -1.0]], dtype=torch.float64)
LABELS = torch.tensor([1, 2])


def _softmax(xs, temp=1.0):
    e = [math.exp(x / temp) for x in xs]
    return [v / sum(e) for v in e]


def test_class_terms_follow_glmkd_equations_on_hand_made_scores():
    s = [[1.0, 2.0], [0.5, -0.3, 0.1]]
    t = [[0.2, 1.5], [1.0, 0.0, -1.0]]
    temp = 2.0
    # soft ce (GLMKD default): mean_g -sum_k softmax(t/T)_k log softmax(s/T)_k
    ce = (
        sum(
            -sum(
                p * math.log(q) for p, q in zip(_softmax(tg, temp), _softmax(sg, temp), strict=True)
            )
            for sg, tg in zip(s, t, strict=True)
        )
        / 2
    )
    kl = sum(
        sum(p * math.log(p / q) for p, q in zip(_softmax(tg, temp), _softmax(sg, temp), strict=True))
        for sg, tg in zip(s, t, strict=True)
    ) / 2 * temp**2  # fmt: skip
    hard = -(math.log(_softmax(s[0])[1]) + math.log(_softmax(s[1])[2])) / 2
    mse = sum((a - 0.5 * b) ** 2 for sg, tg in zip(s, t, strict=True) for a, b in zip(sg, tg, strict=True)) / 5  # fmt: skip
    assert ch.class_soft(S, T, "ce", temp).item() == pytest.approx(ce, rel=1e-12)
    assert ch.class_soft(S, T, "kl", temp).item() == pytest.approx(kl, rel=1e-12)
    assert ch.class_hard(S, LABELS).item() == pytest.approx(hard, rel=1e-12)
    assert ch.class_soft(S, T, "mse", teacher_scale=0.5).item() == pytest.approx(mse, rel=1e-12)


def _fake_scores(monkeypatch):
    monkeypatch.setattr(ch, "pair_scores", lambda logits, ctx, normalize=False: (S, T))
    return LossContext(
        step=3,
        total_steps=10,
        stage=Stage.TASK,
        loss_mask=torch.ones(4),
        labels=torch.zeros(4, dtype=torch.long),
        vocab_start=0,
        vocab_size=8,
        choices=ch.ChoiceBatch(
            torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 2]), LABELS
        ),
    )


def test_task_stage_methods_use_the_class_scores(monkeypatch):
    ctx = _fake_scores(monkeypatch)
    feats = {STUDENT_LOGITS: torch.zeros(4, 8), TEACHER_LOGITS: torch.zeros(4, 8)}
    kd = KD(KDParams(temperature=10.0)).compute(feats, ctx)
    p = [_softmax(x, 10.0) for x in ([0.2, 1.5], [1.0, 0.0, -1.0])]
    q = [_softmax(x, 10.0) for x in ([1.0, 2.0], [0.5, -0.3, 0.1])]
    soft = sum(-sum(a * math.log(b) for a, b in zip(pg, qg, strict=True)) for pg, qg in zip(p, q, strict=True)) / 2  # fmt: skip
    assert kd["soft"].item() == pytest.approx(soft, rel=1e-12)
    assert kd["hard"].item() == pytest.approx(ch.class_hard(S, LABELS).item(), rel=1e-12)
    pd_soft = PD().compute(feats, ctx)["soft"].item()
    assert pd_soft == pytest.approx(ch.class_soft(S, T, "ce", 1.0).item(), rel=1e-12)
    # Annealing-KD, tau_max 7 at step 3 of 10: T = ceil(0.7 * 7) = 5, Phi = 1 - 4/7
    phi = 1 - 4 / 7
    mse = AnnealingKD().compute(feats, ctx)["mse"].item()
    assert mse == pytest.approx(ch.class_soft(S, T, "mse", teacher_scale=phi).item(), rel=1e-12)
    # Continuation-KD, tau_max 10 at step 3 of 10: T = 7, Phi = 0.4; group mse vs margin x Phi
    phi = 1 - 6 / 10
    g0 = ((1.0 - phi * 0.2) ** 2 + (2.0 - phi * 1.5) ** 2) / 2
    g1 = ((0.5 - phi) ** 2 + 0.3**2 + (0.1 + phi) ** 2) / 3
    soft = (g0 * (g0 > phi) + g1 * (g1 > phi)) / 2
    terms = ContinuationKD().compute(feats, ctx)
    assert terms["soft"].item() == pytest.approx(soft, rel=1e-12)
    glmd_soft = ch.GLMDSoft().compute(feats, ctx)["soft"].item()
    assert glmd_soft == pytest.approx(ch.class_soft(S, T, "ce", 1.0).item(), rel=1e-12)


def test_hard_terms_refuse_data_without_labels(monkeypatch):
    ctx = _fake_scores(monkeypatch)
    ctx.choices = ch.ChoiceBatch(
        ctx.choices.group_ids, ctx.choices.option_index, torch.tensor([-1, -1])
    )
    feats = {STUDENT_LOGITS: torch.zeros(4, 8), TEACHER_LOGITS: torch.zeros(4, 8)}
    with pytest.raises(ValueError, match="data.labels: true"):
        KD().compute(feats, ctx)
    assert set(KD(KDParams(hard_weight=0.0)).compute(feats, ctx)) == {"soft"}


@pytest.mark.parametrize("dp", [1, 2])
def test_batching_never_splits_a_group(tmp_path, tokenizer, dp):
    records = [
        {"prompt": f"Question {i} is", "options": [" a", " b", " c"][: 2 + i % 2], "label": None}
        for i in range(12)
    ]
    rows = _rows(tmp_path, tokenizer, mode="packed", seq_length=100, records=records)
    assert rows.rows_in_epoch(0) < len(records)  # several groups share a row
    seen = []
    for step in range(3):
        for rank in range(dp):
            for micro_rows in step_microbatches(rows, step, 4, rank, dp, 2 // dp):
                micro = rows.collate([rows.row(e, r) for e, r in micro_rows])
                c = micro["choices"]
                assert c.labels.tolist() == [-1] * c.num_groups  # no labels in the data
                # the store examples of each local group: one record, all of its options
                index = micro["example_index"].reshape(-1)
                starts = torch.ones_like(index, dtype=torch.bool)
                starts[1:] = index[1:] != index[:-1]
                examples = index[starts & (index >= 0)]
                for g in range(c.num_groups):
                    mine = examples[c.group_ids == g].tolist()
                    record = {int(rows.group[e]) for e in mine}
                    assert len(record) == 1
                    (r,) = record
                    assert sorted(c.option_index[c.group_ids == g].tolist()) == list(
                        range(len(records[r]["options"]))
                    )
                    seen.append((step, r))
    # every step sees whole records, the same ones whatever the data-parallel size
    assert len(seen) == len(set(seen)) and len(seen) >= 3 * 4


def test_glmd_distills_only_at_the_answer_positions_which_never_see_an_option(tmp_path, tokenizer):
    rows = _rows(tmp_path, tokenizer, mode="packed", seq_length=80)
    micro = rows.collate([rows.row(0, i) for i in range(rows.rows_in_epoch(0))])
    ctx = _ctx(micro, tokenizer.vocab_size)
    answer = ch.group_answer_rows(ctx)
    assert answer.numel() == len(RECORDS)  # one position per record, not per option
    tokens = micro["tokens"][:, :-1].t().reshape(-1)
    ids = ctx.example_ids
    b = ctx.batch_size
    for g, flat in enumerate(answer.tolist()):
        e, r = int(ids[flat]), flat % b
        # the context of the answer position: its example's tokens up to it
        context = [int(tokens[k]) for k in range(r, flat + 1, b) if int(ids[k]) == e]
        prompt = tokenizer.encode_batch_framed([RECORDS[g]["prompt"]])[0]
        assert context == prompt
    # the glmd term at the task stage is the masked KL at exactly those positions
    mask = ch.group_answer_mask(ctx)
    assert mask.sum().item() == len(RECORDS) and mask[answer].eq(1).all()
    logits = torch.randn(tokens.numel(), tokenizer.vocab_size, dtype=torch.float64)
    teacher = torch.randn_like(logits)
    feats = {STUDENT_LOGITS: logits, TEACHER_LOGITS: teacher}
    got = GLMD().compute(feats, ctx)["kl"]
    temp = 15.0
    p = torch.softmax(teacher[answer] / temp, -1)
    ref = (p * (p.log() - torch.log_softmax(logits[answer] / temp, -1))).sum(-1).mean() * temp**2
    torch.testing.assert_close(got, ref)


def test_choice_records_are_validated_with_file_and_line():
    source = DataSource(path="x.jsonl")
    assert choice_payload({"prompt": "p", "options": ["a", "b"], "label": None}, source, "x:1") == (
        "p", ["a", "b"], None,
    )  # fmt: skip
    for bad, words in [
        ({"prompt": "p", "options": ["a"]}, "at least two"),
        ({"prompt": "p", "options": ["a", ""]}, "option 1"),
        ({"prompt": "p", "options": ["a", "b"], "label": 2}, "label 2"),
        ({"prompt": 3, "options": ["a", "b"]}, "prompt"),
    ]:
        with pytest.raises(ValueError, match=words) as info:
            choice_payload(bad, source, "x.jsonl:7")
        assert "x.jsonl:7" in str(info.value)


def test_a_group_longer_than_a_sequence_is_refused(tmp_path, tokenizer):
    record = RECORDS[0]  # each option fits 20 tokens, the three together do not
    lengths = [len(tokenizer.encode_batch_framed([record["prompt"] + o])[0]) + 1 for o in record["options"]]  # fmt: skip
    assert max(lengths) <= 20 < sum(lengths)
    with pytest.raises(ValueError, match=r"choices.jsonl:1: the 3 options .*data.seq_length=20"):
        _rows(tmp_path, tokenizer, seq_length=20, records=[record])


def test_overlong_truncate_leaves_out_the_records_that_do_not_fit(tmp_path, tokenizer):
    """``data.overlong: truncate`` on choice data: a record whose options do not fit one sequence
    together is left out whole (never cut: that would change its option scores); the others are
    batched as before, in the same relative order."""
    from gkd_cli.data.build import build_example_store

    path = tmp_path / "choices.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    sources, groups = prepare_sources([DataSource(path=str(path))], tmp_path / "expanded")
    store = build_example_store(sources, tokenizer, tmp_path / "store")  # no length limit
    lengths = [
        sum(len(tokenizer.encode_batch_framed([r["prompt"]])[0]) + len(tokenizer.encode_batch([o])[0]) + 1
            for o in r["options"])
        for r in RECORDS
    ]  # fmt: skip
    seq = sorted(lengths)[2]  # the two longest records do not fit
    over = [g for g, n in enumerate(lengths) if n > seq]
    assert len(over) >= 1
    with pytest.raises(ValueError, match="data.overlong: truncate"):
        ChoiceRows(store, seq, groups, mode="padded", seed=0, shuffle=False, pad_id=0)
    rows = ChoiceRows(store, seq, groups, mode="padded", seed=0, shuffle=False, pad_id=0,
                      overlong="truncate")  # fmt: skip
    kept = [g for g in range(len(RECORDS)) if g not in over]
    assert rows.units() == len(kept) and rows.left_out == len(over)
    seen = [
        int(rows.group[int(r.example_ids[0])])
        for r in (rows.row(0, i) for i in range(rows.rows_in_epoch(0)))
    ]
    assert seen == kept  # fmt: skip
    shuffled = ChoiceRows(store, seq, groups, mode="packed", seed=1, shuffle=True, pad_id=0,
                          overlong="truncate")  # fmt: skip
    assert sorted(shuffled.order(0).tolist()) == kept


def test_superglue_choice_records_carry_no_label_unless_asked():
    from gkd_cli.superglue.distill_data import TaskText

    text = TaskText(
        task="CB", example_id="0", text="", labeled=True, prompt="P", answer=" yes",
        options=(" no", " yes"), label=1,
    )  # fmt: skip
    assert text.choice_record(labels=False) == {"prompt": "P", "options": [" no", " yes"], "label": None}  # fmt: skip
    assert text.choice_record(labels=True)["label"] == 1
    assert np.asarray([1]).size == 1


RECIPE = Path(__file__).resolve().parents[2] / "gkd_cli" / "configs" / "glmd"


def test_the_glmd_recipe_configs_load_and_keep_labels_out_of_the_distillation():
    from gkd_cli.config import load_config

    names = sorted(p.name for p in RECIPE.glob("*.yaml"))
    assert names == ["1_pretrain.yaml", "2_teacher_task.yaml", "3_task_glmd.yaml", "4_task_soft.yaml"]  # fmt: skip
    cfgs = {n: load_config(RECIPE / n, check_paths=False) for n in names}
    assert [str(cfgs[n].train.stage) for n in names] == ["pretrain", "task", "task", "task"]
    assert cfgs["2_teacher_task.yaml"].teacher is None and cfgs["2_teacher_task.yaml"].data.labels
    for n in ("3_task_glmd.yaml", "4_task_soft.yaml"):
        assert cfgs[n].data.choices and not cfgs[n].data.labels
    assert [e.name for e in cfgs["4_task_soft.yaml"].methods] == ["glmd_soft"]


def test_methods_that_need_labels_are_refused_before_launch_without_them():
    from gkd_cli.config import ConfigError, load_config

    path = RECIPE / "3_task_glmd.yaml"
    with pytest.raises(ConfigError, match=r"methods.0 \(kd\).*data.labels: true"):
        load_config(path, ["methods=[{name: kd}]"], check_paths=False)
    load_config(path, ["methods=[{name: kd, hard_weight: 0}]"], check_paths=False)
    with pytest.raises(ConfigError, match="data.mode: padded or packed"):
        load_config(path, ["data.mode=stream"], check_paths=False)
    with pytest.raises(ConfigError, match="glmd_soft"):
        load_config(path, ["methods=[{name: glmd_soft}]", "data.choices=false"], check_paths=False)


def test_methods_that_relate_positions_are_refused_on_choice_data():
    from gkd_cli.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.choices"):
        load_config(RECIPE / "3_task_glmd.yaml", ["methods=[{name: sid}]"], check_paths=False)


def _choice_run(tmp_path, tokenizer, method, records, seq_length=40, extra=()):
    from gkd_cli.config import load_config

    folder = tokenizer.save(tmp_path / "tok")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_config(
        RECIPE / "3_task_glmd.yaml",
        [
            f"methods=[{{name: {method}}}]", "data.source=corpus", "data.choices=false",
            "data.format=jsonl", f"data.train_files=[{data}]", f"data.tokenizer={folder}",
            f"data.seq_length={seq_length}", "teacher.max_seq_len=64", "student.max_seq_len=64",
            "data.overlong=refuse",
            *extra,
        ],
        check_paths=False,
    )  # fmt: skip


def test_choice_data_problems_are_refused_before_launch(tmp_path, tokenizer):
    """The launch-time checks of what the workers would refuse at the first step or at the
    dataset build: glmd_soft without choice records, and a record whose options do not fit one
    sequence (the count written here from the tokenizer, as the builder frames each option)."""
    from gkd_cli.config import ConfigError
    from gkd_cli.preflight import check_choice_data

    check_choice_data(_choice_run(tmp_path, tokenizer, "glmd_soft", RECORDS))  # fits: no error
    plain = [{"prompt": r["prompt"], "completion": r["options"][0]} for r in RECORDS]
    with pytest.raises(ConfigError, match=r"methods.0 \(glmd_soft\).*needs choice data"):
        check_choice_data(_choice_run(tmp_path, tokenizer, "glmd_soft", plain))
    check_choice_data(_choice_run(tmp_path, tokenizer, "glmd", plain))  # glmd needs no choices

    def count(record):
        framed = len(tokenizer.encode_batch_framed([record["prompt"]])[0])
        return sum(framed + len(tokenizer.encode_batch([o])[0]) + 1 for o in record["options"])

    record, short = RECORDS[0], RECORDS[3]
    tokens = count(record)
    assert count(short) < tokens
    cfg = _choice_run(tmp_path, tokenizer, "glmd", [short, record], seq_length=tokens - 1)
    with pytest.raises(ConfigError, match=rf"train.jsonl:2: the 3 options .* {tokens} tokens"):
        check_choice_data(cfg)
    check_choice_data(_choice_run(tmp_path, tokenizer, "glmd", [record], seq_length=tokens))
    truncate = ["data.overlong=truncate"]  # the workers leave the record out instead
    check_choice_data(
        _choice_run(tmp_path, tokenizer, "glmd", [short, record], tokens - 1, truncate)
    )
