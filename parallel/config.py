"""Plain settings dataclasses of the runtime. No megatron-core import here: the CLI validates and
plans with these on a login node.

Each field's docstring is its help text (the CLI shows it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of ``multiple * tp_size`` so that every
    tensor-parallel shard of the embedding and output layer has the same, aligned width."""
    step = multiple * tp_size
    return int(math.ceil(vocab_size / step) * step)


@dataclass(kw_only=True)
class ModelArch:
    """Architecture of a GPT-style decoder (GPT-2 or Llama/Qwen family)."""

    num_layers: int
    """Number of transformer layers."""
    hidden_size: int
    """Model width."""
    num_attention_heads: int
    """Attention heads per layer."""
    vocab_size: int
    """Real vocabulary size (the tokenizer's). Padded to a multiple of 128 x TP inside the model."""
    max_seq_len: int = 1024
    """Longest sequence the model accepts (size of learned position embeddings)."""
    ffn_hidden_size: int | None = None
    """MLP width; default 4 x hidden_size (GeLU) or Llama's 8/3 x hidden rounded to 64 (SwiGLU)."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; default = num_attention_heads (plain MHA)."""
    kv_channels: int | None = None
    """Per-head width; default hidden_size / num_attention_heads."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    """Norm layer type."""
    norm_epsilon: float = 1e-5
    """Norm epsilon."""
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"
    """MLP activation: exact GeLU, GeLU's tanh approximation (GPT-2's ``gelu_new``) or SwiGLU
    (Llama/Qwen)."""
    position_embedding: Literal["learned", "rope"] = "learned"
    """Learned absolute positions (GPT-2) or rotary embeddings (Llama/Qwen)."""
    rotary_base: int = 10000
    """RoPE base (theta)."""
    tie_embeddings: bool = True
    """Share the input embedding and output layer weights."""
    add_bias_linear: bool = True
    """Biases in the attention projection and MLP linears."""
    add_qkv_bias: bool = False
    """Biases in the QKV projection only (Qwen2); ignored when add_bias_linear is true."""
    qk_layernorm: bool = False
    """Norm on queries and keys per head (Qwen3)."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling in Hugging Face's terms (``config.json`` ``rope_scaling`` without
    ``rope_theta``), e.g. ``{rope_type: llama3, factor: 8.0, low_freq_factor: 1.0,
    high_freq_factor: 4.0, original_max_position_embeddings: 8192}``; ``rope_type`` is
    ``linear``, ``llama3`` or ``yarn`` (see ``parallel/rope.py``). None: unscaled RoPE."""
    sliding_window: int | None = None
    """Sliding-window attention (Mistral v0.1, Qwen with ``use_sliding_window``): each token
    attends to itself and the ``sliding_window - 1`` tokens before it, in every layer. None: full
    causal attention."""

    @classmethod
    def gpt2(cls, **overrides: Any) -> ModelArch:
        return cls(**overrides)

    @classmethod
    def llama(cls, **overrides: Any) -> ModelArch:
        defaults: dict[str, Any] = {
            "normalization": "RMSNorm",
            "activation": "swiglu",
            "position_embedding": "rope",
            "tie_embeddings": False,
            "add_bias_linear": False,
        }
        return cls(**(defaults | overrides))

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return int(math.ceil(8 * self.hidden_size / 3 / 64) * 64)
        return 4 * self.hidden_size

    def padded_vocab(self, tp_size: int) -> int:
        return padded_vocab_size(self.vocab_size, tp_size)

    # --- parameter count: the one count of the planner, the model and the methods --------------

    def _norm_parameters(self, width: int) -> int:
        """Parameters of one norm over ``width`` features (LayerNorm has a bias, RMSNorm not)."""
        return width if self.normalization == "RMSNorm" else 2 * width

    def _layer_parameter_split(self) -> tuple[int, int]:
        """``(sharded, replicated)`` parameters of one transformer layer, as megatron-core shards
        it over tensor parallelism: the column/row-parallel linears and the column-parallel
        biases are split; the norms (q/k norms included) and the row-parallel biases replicated."""
        h, f, d = self.hidden_size, self.ffn_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.query_groups * d
        mlp_in = f * (2 if self.activation == "swiglu" else 1)  # SwiGLU: [gate; up]
        sharded = h * (q + 2 * kv) + q * h + h * mlp_in + f * h
        replicated = 2 * self._norm_parameters(h)
        if self.qk_layernorm:
            replicated += 2 * self._norm_parameters(d)
        if self.add_bias_linear:
            sharded += q + 2 * kv + mlp_in
            replicated += 2 * h  # biases of linear_proj and linear_fc2 (row parallel)
        elif self.add_qkv_bias:
            sharded += q + 2 * kv
        return sharded, replicated

    def layer_parameters(self, tp_size: int = 1) -> int:
        """Parameters of one transformer layer held by one of ``tp_size`` tensor ranks."""
        sharded, replicated = self._layer_parameter_split()
        return sharded // tp_size + replicated

    def embedding_parameters(self, tp_size: int = 1) -> int:
        """Parameters of the token embedding (or the output layer) on one of ``tp_size`` tensor
        ranks: its share of the padded vocabulary."""
        return self.padded_vocab(tp_size) * self.hidden_size // tp_size

    def stage_parameters(self, tp_size: int = 1, pp_size: int = 1, stage: int = 0) -> int:
        """Parameters one rank of pipeline stage ``stage`` holds at ``tp_size`` x ``pp_size``:
        its layers; on the first stage the embedding (and learned positions); on the last the
        final norm and the output layer, or, with tied embeddings and ``pp_size > 1``, its own
        copy of the embedding."""
        params = self.num_layers // pp_size * self.layer_parameters(tp_size)
        embedding = self.embedding_parameters(tp_size)
        if stage == 0:
            params += embedding
            if self.position_embedding == "learned":
                params += self.max_seq_len * self.hidden_size
        if stage == pp_size - 1:
            params += self._norm_parameters(self.hidden_size)  # final norm
            if not self.tie_embeddings or pp_size > 1:
                params += embedding
        return params

    def num_parameters(self, tp_size: int = 1) -> int:
        """Parameters of the whole model, each counted once (the vocabulary padded for
        ``tp_size``; the last stage's copy of a tied embedding not counted): what a TP1 x PP1
        model at that padding holds, ``stage_parameters(1, 1)`` with the vocabulary of
        ``tp_size``."""
        sharded, replicated = self._layer_parameter_split()
        total = self.num_layers * (sharded + replicated) + self._norm_parameters(self.hidden_size)
        total += self.padded_vocab(tp_size) * self.hidden_size * (1 if self.tie_embeddings else 2)
        if self.position_embedding == "learned":
            total += self.max_seq_len * self.hidden_size
        return total

    def check_attention(self, *, where: str) -> None:
        """Raise ``ValueError`` naming ``where`` when :attr:`rope_scaling` or
        :attr:`sliding_window` cannot be built."""
        from parallel import rope

        if self.rope_scaling is not None:
            if self.position_embedding != "rope":
                raise ValueError(
                    f"{where}.rope_scaling is set but {where}.position_embedding is "
                    f"{self.position_embedding!r}; RoPE scaling needs position_embedding: rope"
                )
            rope.check(self.rope_scaling, where=f"{where}.rope_scaling")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or window < 1):
            raise ValueError(
                f"{where}.sliding_window={window!r} must be a positive number of tokens (or null)"
            )

    def check_parallel(self, tp_size: int, pp_size: int, *, where: str) -> None:
        """Raise ``ValueError`` naming ``where`` (the config section) when this model cannot be
        sharded at ``tp_size`` x ``pp_size`` (or its RoPE scaling or sliding window is invalid:
        :meth:`check_attention`)."""
        self.check_attention(where=where)
        if self.hidden_size % self.num_attention_heads and self.kv_channels is None:
            raise ValueError(
                f"{where}.hidden_size={self.hidden_size} is not divisible by "
                f"{where}.num_attention_heads={self.num_attention_heads}; set {where}.kv_channels "
                "or pick a head count that divides the width"
            )
        if self.num_attention_heads % tp_size:
            raise ValueError(
                f"{where}.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"parallel.tp={tp_size}; use a tp that divides the head count"
            )
        if self.query_groups % tp_size:
            raise ValueError(
                f"{where}.num_query_groups={self.query_groups} is not divisible by "
                f"parallel.tp={tp_size}; use a tp that divides the number of key/value heads"
            )
        if self.num_attention_heads % self.query_groups:
            raise ValueError(
                f"{where}.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"{where}.num_query_groups={self.query_groups}"
            )
        if self.ffn_size % tp_size:
            raise ValueError(
                f"{where}.ffn_hidden_size={self.ffn_size} is not divisible by parallel.tp={tp_size}"
            )
        if self.num_layers % pp_size:
            raise ValueError(
                f"{where}.num_layers={self.num_layers} is not divisible by parallel.pp={pp_size}; "
                "use a pp that divides the layer count"
            )


@dataclass(kw_only=True)
class ParallelConfig:
    """How the job is laid out over processes."""

    tp: int = 1
    """Tensor-parallel size (shards heads, MLP width and vocabulary)."""
    pp: int = 1
    """Pipeline-parallel size (shards layers; teacher and student share the stages)."""
    dp: int = 1
    """Data-parallel size (replicas; the student's optimizer state is sharded over them, ZeRO-1)."""
    nnodes: int = 1
    """Number of nodes; processes per node = tp x pp x dp / nnodes."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside tensor-parallel groups."""
    timeout_minutes: float | None = None
    """Collective timeout; default 10 on CPU (gloo) and 30 on GPU (NCCL)."""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(kw_only=True)
class TrainConfig:
    """Optimization settings of the student."""

    steps: int = 100
    """Optimizer steps to run."""
    global_batch_size: int = 8
    """Sequences per optimizer step (= micro_batch_size x microbatches x dp)."""
    micro_batch_size: int = 1
    """Sequences per microbatch per data-parallel rank."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of decay."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping (0 disables)."""
    seed: int = 1234
    """Seed for initialization, dropout and data order."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute of the student (full recomputes whole layers)."""
    stage: Literal["pretrain", "task"] = "pretrain"
    """Distillation stage (methods declare which stages they apply to)."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    eval_every: int = 0
    """Run the validation set (``data.valid_files``) every N steps and at the last step, logging
    student LM loss and perplexity (and the teacher's, computed once) to every sink; 0: only
    at the end of the run (``eval.json``)."""
    eval_batches: int = 8
    """Global batches of the validation set each validation reads (at most; in order)."""
    best_metric: str | None = None
    """Validation metric that marks the best checkpoint (``valid/student_loss`` or
    ``valid/student_ppl``): a validation that improves it saves a checkpoint at that step and
    points ``checkpoints/best`` at it (kept by ``output.keep_last`` pruning). None: no marking."""
    best_mode: Literal["min", "max"] = "min"
    """Whether a lower (``min``) or higher (``max``) ``best_metric`` is better."""
    max_skipped_steps: int = 0
    """Steps whose loss or gradient is NaN/inf that may be skipped (no optimizer update) before the
    run stops; 0: the first such step stops the run, naming the step, the term and the rank."""
    logit_chunk_tokens: int | None = None
    """Tokens per chunk of the logit losses (the fused output layer's chunks, and the materialized
    path's). ``None``: from a byte budget for the chunk's logits buffers (16 MiB on CPU, 256 MiB
    on GPU: 64 and 512 tokens at V/tp = 32k with a teacher). Larger chunks run the output layer's
    matmuls faster and hold more memory (BENCHMARKS.md, "Fused output layer + loss")."""
