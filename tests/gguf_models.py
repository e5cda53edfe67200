"""Tiny GGUF files for the GGUF import tests, written the way llama.cpp's converter writes them.

A randomly initialized transformers model (Llama with grouped-query attention and an untied
output, or Qwen2 with q/k/v biases and tied embeddings) is written with ``gguf.GGUFWriter``:
llama.cpp's tensor names, its ``{arch}.*`` metadata keys, Llama's query/key rows permuted as
``convert_hf_to_gguf.py`` does (``reshape(heads, 2, d/2, ...).swapaxes(1, 2)``, written here from
that definition), norms in F32, the embedding in F16, attention matrices in Q8_0 and MLP matrices
in Q4_1, and a byte-level BPE tokenizer trained on a few sentences with ``tokenizers``. transformers
reads these files itself (``from_pretrained(dir, gguf_file=...)``), which is the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEXT = (
    "The quick brown fox jumps over the lazy dog. Distillation moves knowledge from a large "
    "teacher into a small student. In 2023, 17 models were compared; the best scored 91.5 points! "
    "Tensor and pipeline parallelism shard the model across ranks.\n\nQuestion: is it true? Answer: yes."
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' "
    "}}{% endif %}"
)


def train_tokenizer(vocab_size: int = 300) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, llama.cpp token types, merges) of a byte-level BPE trained on :data:`TEXT`."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, types, merges


def _randomize(model, seed: int) -> None:
    """Unit-scale weights (transformers' 0.02 init gives logits near zero)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                fan_in = 1 if "embed" in name else param.shape[1]
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
            elif "norm" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's query/key row order (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}"


def _qtype(gguf, name: str):
    q = gguf.GGMLQuantizationType
    if name.endswith(".bias") or "norm" in name:
        return q.F32
    if name == "token_embd.weight":
        return q.F16
    if ".attn_" in name or name == "output.weight":
        return q.Q8_0
    return q.Q4_1


def write_gguf(
    path: Path,
    kind: str = "llama",
    *,
    seed: int = 0,
    tokenizer: bool = True,
    tokenizer_model: str = "gpt2",
    architecture: str | None = None,
    qtypes=None,
) -> dict:
    """Write a tiny ``kind`` (``llama`` or ``qwen2``) GGUF at ``path``; returns its facts."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokens, types, merges = train_tokenizer()
    vocab = len(tokens)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    _randomize(model, seed)
    arch = architecture or kind
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {kind}")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(16)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    if tokenizer:
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(0)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        name = _gguf_name(hf_name)
        data = tensor.detach().to(torch.float32).numpy()
        if kind == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            data = llama_cpp_permute(data, 4)
        elif kind == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            data = llama_cpp_permute(data, 2)
        qtype = (qtypes or {}).get(name, _qtype(gguf, name))
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"vocab": vocab, "tokens": tokens, "kind": kind}


def reference_logits(path: Path, tokens):
    """transformers' own GGUF loading and float32 forward of ``tokens`` ``[b, s]``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(tokens).logits.double()
