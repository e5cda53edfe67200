"""What a model family is: the interface :mod:`parallel.families.llama` and
:mod:`parallel.families.gpt2` implement, the types they return, and the tensor-layout primitives
they share.

A family is one Hugging Face tensor layout and everything gkd needs to know about it: the
``architectures`` names of ``config.json`` it reads, how ``config.json`` maps onto a
:class:`~parallel.config.ModelArch` (and back), which Hugging Face tensor slices make each
megatron-core parameter of one rank (import), the inverse full-tensor reshapes (export), and the
megatron-core layer spec the model is built with. The drivers (:mod:`parallel.hf.spec`,
``layout``, ``files``, ``load``, ``export`` and :mod:`parallel.model`) ask the family and never
branch on which one it is.

Importing this module imports neither torch nor megatron-core (the CLI validates with it before
launching workers). The export hooks receive torch tensors and only call their methods.

megatron-core 0.16 conventions the tensor plans follow (``transformer/attention.py``
``get_query_key_value_tensors``, ``transformer/mlp.py``, ``tensor_parallel/layers.py``):

* ``linear_qkv`` (column parallel) holds, per query group, the group's query heads, then its key
  head, then its value head: rows ``[q_1 .. q_{h/g}, k, v]`` for each of the ``g`` groups, each
  head ``head_dim`` rows. Tensor parallelism splits the rows, so rank ``r`` holds groups
  ``[r g/tp, (r+1) g/tp)``. Plain multi-head attention is the case ``g = h``.
* ``linear_fc1`` with SwiGLU holds ``[gate; up]`` per rank: rank ``r``'s rows are its slice of the
  gate projection followed by its slice of the up projection (``silu(first half) * second half``).
* ``linear_proj`` and ``linear_fc2`` (row parallel) split their input columns; their biases are
  replicated. Norms and position embeddings are replicated.
* The vocabulary (embedding rows, output-layer rows) is padded to a multiple of 128 x tp and split
  in equal row blocks; padded rows hold zeros (the drivers handle the vocabulary).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from parallel.config import ModelArch

MlpActivation = Literal["silu", "gelu", "gelu_tanh"]

Range = tuple[int, int]


class HFConversionError(ValueError):
    """A Hugging Face checkpoint cannot be converted; the message names the file, the field and
    what to do."""


@dataclass(frozen=True, kw_only=True)
class HFModelSpec:
    """What ``config.json`` says about a model, in gkd's terms."""

    architecture: str
    """``config.json`` ``architectures[0]``, e.g. ``LlamaForCausalLM``."""
    model_type: str
    """``config.json`` ``model_type`` (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gpt2``)."""
    family: ModelFamily
    """The family that reads and writes its tensors (``family.name``: ``llama`` or ``gpt2``)."""
    arch: ModelArch
    """The megatron-core architecture gkd builds for it."""
    mlp_activation: MlpActivation
    """The exact MLP activation (``gelu_tanh`` for GPT-2's ``gelu_new``; see
    :func:`parallel.hf.load.apply_mlp_activation`)."""
    dtype: str | None
    """``config.json`` ``dtype``/``torch_dtype`` (e.g. ``bfloat16``), if given."""
    config: dict[str, Any] = field(repr=False)
    """The raw ``config.json``."""
    notes: tuple[str, ...] = ()
    """Facts a user should see (printed by ``gkd convert import-hf`` and kept in ``meta.json``)."""


def require(config: dict[str, Any], key: str, where: str) -> Any:
    """``config[key]``; :class:`HFConversionError` naming the key when it is missing."""
    if config.get(key) is None:
        raise HFConversionError(f"{where}: field '{key}' is missing")
    return config[key]


def config_dtype(config: dict[str, Any]) -> str | None:
    """``config.json`` ``dtype`` (``torch_dtype`` in older files)."""
    return config.get("dtype") or config.get("torch_dtype")


@dataclass(frozen=True)
class Piece:
    """Copy ``source[rows, cols]`` (transposed when ``transpose``) into the destination.

    The block (after the optional transpose) has ``n`` rows; they are written in chunks of
    ``chunk`` rows, chunk ``c`` at destination rows ``[offset + c stride, offset + c stride +
    chunk)``, all destination columns. ``chunk=None`` writes the block contiguously at ``offset``.
    """

    source: str
    """Hugging Face tensor name."""
    rows: Range | None = None
    """Source dim-0 range (``None``: all)."""
    cols: Range | None = None
    """Source dim-1 range of a 2-D source (``None``: all)."""
    transpose: bool = False
    """Transpose the 2-D block before placing it (GPT-2 ``Conv1D``)."""
    offset: int = 0
    """First destination row."""
    chunk: int | None = None
    """Rows per destination chunk (``None``: one contiguous block)."""
    stride: int = 0
    """Destination rows between the starts of consecutive chunks."""


def split(total: int, tp_rank: int, tp_size: int) -> Range:
    """Rank ``tp_rank``'s equal share ``[start, end)`` of ``total`` rows or columns."""
    size = total // tp_size
    return tp_rank * size, (tp_rank + 1) * size


def grouped_qkv(
    arch: ModelArch, tp_rank: int, tp_size: int, names: Sequence[str], suffix: str
) -> list[Piece]:
    """Pieces of a local ``linear_qkv`` weight or bias from separate q, k, v tensors (``names``
    are their prefixes, ``suffix`` is ``weight`` or ``bias``)."""
    d, groups = arch.head_dim, arch.query_groups
    per_group = arch.num_attention_heads // groups
    g0, g1 = split(groups, tp_rank, tp_size)
    stride = (per_group + 2) * d
    q, k, v = (n + suffix for n in names)
    return [
        Piece(q, rows=(g0 * per_group * d, g1 * per_group * d), chunk=per_group * d, stride=stride),
        Piece(k, rows=(g0 * d, g1 * d), offset=per_group * d, chunk=d, stride=stride),
        Piece(v, rows=(g0 * d, g1 * d), offset=(per_group + 1) * d, chunk=d, stride=stride),
    ]


def split_qkv(weight: Any, arch: ModelArch) -> tuple[Any, Any, Any]:
    """Export: megatron's grouped ``[q_1..q_{h/g}, k, v]`` rows (per group) of a full
    ``linear_qkv`` weight or bias -> full q, k, v tensors."""
    d, groups = arch.head_dim, arch.query_groups
    per_group = arch.num_attention_heads // groups
    grouped = weight.reshape(groups, per_group + 2, d, *weight.shape[1:])
    q = grouped[:, :per_group].reshape(groups * per_group * d, *weight.shape[1:])
    k = grouped[:, per_group].reshape(groups * d, *weight.shape[1:])
    v = grouped[:, per_group + 1].reshape(groups * d, *weight.shape[1:])
    return q, k, v


class ModelFamily(ABC):
    """One Hugging Face tensor layout. Subclasses fill the class attributes and the abstract
    methods; one instance per family is registered in :mod:`parallel.families`.

    Tensor names on the megatron side are local layer-spec names (``decoder.layers.<i>.<...>``,
    ``embedding.word_embeddings.weight``, ...). Hugging Face names may carry a ``prefix`` that the
    family detects in a folder's tensor names (:meth:`tensor_prefix`)."""

    name: ClassVar[str]
    """Short name (``llama``, ``gpt2``)."""
    architectures: ClassVar[Mapping[str, str]]
    """``config.json`` ``architectures`` names this family reads -> their ``model_type``."""
    aliases: ClassVar[Mapping[str, str]] = {}
    """Architectures with the layout of another one of the family (``MistralForCausalLM`` ->
    ``LlamaForCausalLM``): an imported model keeps its own name on export."""
    position_embedding: ClassVar[Literal["learned", "rope"]]
    """The :attr:`ModelArch.position_embedding` of this family's models: how an architecture
    that did not come from Hugging Face finds its family (export, error messages)."""
    hf_keys: ClassVar[Mapping[str, str]]
    """``config.json`` key of each ModelArch field errors may name (at least ``num_layers``,
    ``hidden_size``, ``num_attention_heads``, ``num_query_groups``, ``ffn_hidden_size``,
    ``kv_channels``, ``vocab_size``)."""

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    # --- config.json <-> ModelArch --------------------------------------------------------------

    @abstractmethod
    def spec_from_config(
        self, config: dict[str, Any], architecture: str, where: str
    ) -> HFModelSpec:
        """The model a parsed ``config.json`` describes; :class:`HFConversionError` naming
        ``where`` and the ``config.json`` key for what this family cannot represent."""

    @abstractmethod
    def export_problems(self, arch: ModelArch) -> list[str]:
        """Why no architecture of this family represents ``arch`` exactly (empty: one does)."""

    @abstractmethod
    def export_architecture(self, arch: ModelArch) -> str:
        """The ``architectures`` name written for ``arch`` (no :meth:`export_problems`)."""

    @abstractmethod
    def export_config(
        self,
        arch: ModelArch,
        config: dict[str, Any],
        *,
        architecture: str,
        mlp_activation: MlpActivation | None,
        from_source: bool,
    ) -> None:
        """Write the structural ``config.json`` fields of ``arch`` into ``config`` (which holds
        the source model's other fields when ``from_source``)."""

    # --- tensor map ------------------------------------------------------------------------------

    def tensor_prefix(self, tensor_names: Mapping[str, object] | Sequence[str]) -> str:
        """Prefix of the Hugging Face tensor names in a folder (empty by default)."""
        return ""

    @abstractmethod
    def embedding_name(self, prefix: str = "") -> str:
        """Hugging Face name of the token embedding."""

    @abstractmethod
    def expected_shapes(self, arch: ModelArch, prefix: str = "") -> dict[str, tuple[int, ...]]:
        """Every Hugging Face tensor the conversion reads, token embedding first, except
        ``lm_head`` (the drivers add it for untied models), with the full shape ``config.json``
        implies."""

    @abstractmethod
    def layer_plan(
        self, arch: ModelArch, layer: int, tp_rank: int, tp_size: int, prefix: str
    ) -> dict[str, list[Piece]]:
        """Import: the pieces of every parameter of global decoder layer ``layer`` on tensor
        rank ``tp_rank`` (names relative to the layer: ``self_attention.linear_qkv.weight``)."""

    @abstractmethod
    def first_stage_tensors(self, prefix: str = "") -> dict[str, str]:
        """Replicated tensors of the first pipeline stage besides the token embedding: megatron
        name -> Hugging Face name (GPT-2's position embedding)."""

    @abstractmethod
    def last_stage_tensors(self, prefix: str = "") -> dict[str, str]:
        """Replicated tensors of the last pipeline stage besides the output layer: megatron name ->
        Hugging Face name (the final norm)."""

    @abstractmethod
    def export_layer(self, sd: Mapping[str, Any], arch: ModelArch, layer: int) -> dict[str, Any]:
        """Export: the Hugging Face tensors of decoder layer ``layer`` (names as
        ``save_pretrained`` writes them, :attr:`export_prefix` included) from a full TP1 x PP1
        state dict ``sd``."""

    export_prefix: ClassVar[str] = ""
    """Prefix of the exported Hugging Face names (``transformer.``: ``GPT2LMHeadModel``)."""

    # --- megatron-core ---------------------------------------------------------------------------

    def layer_spec(self, arch: ModelArch, *, use_te: bool) -> Any:
        """megatron-core's layer spec for ``arch``: its GPT layer with Transformer Engine modules
        (``use_te``) or the local (torch) one. Imports megatron-core."""
        from megatron.core.models.gpt import gpt_layer_specs as specs

        if use_te:
            return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
        return specs.get_gpt_layer_local_spec(
            qk_layernorm=arch.qk_layernorm, normalization=arch.normalization
        )
