"""The contract between the runtime (``parallel/``) and distillation methods.

A method declares the features (``Tap``) it needs from the teacher and the student, and computes
named loss terms from them. The runtime captures only what was requested, on the pipeline stage
that owns it, and calls :meth:`Method.compute` once per stage and microbatch with the features
available there. A method returns the terms it can compute from what it was given (an
intermediate-layer method on stage 0 sees only stage 0's layers; a logit method only runs where the
logits are, the last stage).

This module is pure torch: process groups arrive in :class:`LossContext`, nothing is read from
global state, megatron-core is never imported.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from methods.examples import (
    ExamplePooling,
    answer_positions,
    column_ids,
    count_examples,
    pool_by_example,
)

if TYPE_CHECKING:
    from methods.choices import ChoiceBatch


class Stage(str, enum.Enum):  # noqa: UP042 (keeps str() as it was)
    """Distillation stage a method applies to (GLMD's two stages)."""

    PRETRAIN = "pretrain"
    """Task-agnostic stage on a text corpus."""
    TASK = "task"
    """Task-specific stage on (prompt-formatted) task data."""


class Role(str, enum.Enum):  # noqa: UP042
    TEACHER = "teacher"
    STUDENT = "student"


class FeatureKind(str, enum.Enum):  # noqa: UP042
    """What a tap captures. Shapes are per tensor-parallel rank, megatron-core's layouts."""

    EMBEDDING = "embedding"
    """Embedding output (input to layer 0): ``[s, b, h]``, replicated over tp."""
    HIDDEN = "hidden"
    """Output of transformer layer ``layer``: ``[s, b, h]``, replicated over tp."""
    ATTENTION_SCORES = "attention_scores"
    """Pre-softmax scaled, masked attention scores of layer ``layer``: ``[b, heads/tp, s, s]``."""
    ATTENTION_PROBS = "attention_probs"
    """Attention probabilities of layer ``layer``: ``[b, heads/tp, s, s]``."""
    QUERY = "query"
    """Queries of layer ``layer`` after rotary embedding: ``[s, b, heads/tp, head_dim]``."""
    KEY = "key"
    """Keys of layer ``layer``: ``[s, b, query_groups/tp, head_dim]``."""
    VALUE = "value"
    """Values of layer ``layer``: ``[s, b, query_groups/tp, head_dim]``."""
    FINAL_NORM = "final_norm"
    """Output of the final norm (input of the output layer): ``[s, b, h]``."""
    LOGITS = "logits"
    """Output-layer logits, tokens flattened: ``[N, V/tp]``, vocab-sharded over tp_group.
    Token order matches ``LossContext.loss_mask`` and ``LossContext.labels``."""


PER_LAYER_KINDS = frozenset(
    {
        FeatureKind.HIDDEN,
        FeatureKind.ATTENTION_SCORES,
        FeatureKind.ATTENTION_PROBS,
        FeatureKind.QUERY,
        FeatureKind.KEY,
        FeatureKind.VALUE,
    }
)


@dataclass(frozen=True)
class Tap:
    """A request for one feature of one model.

    ``layer`` is the 0-based global index of a transformer layer for per-layer kinds and ``None``
    otherwise. ``teacher_index`` selects the teacher in multi-teacher runs.
    """

    role: Role
    kind: FeatureKind
    layer: int | None = None
    teacher_index: int = 0

    def __post_init__(self) -> None:
        if (self.kind in PER_LAYER_KINDS) != (self.layer is not None):
            raise ValueError(
                f"tap {self.kind.value} needs layer={'an int' if self.kind in PER_LAYER_KINDS else 'None'}"
            )

    def __str__(self) -> str:
        layer = "" if self.layer is None else f"[{self.layer}]"
        who = (
            self.role.value
            if self.role is Role.STUDENT or self.teacher_index == 0
            else f"teacher{self.teacher_index}"
        )
        return f"{who}.{self.kind.value}{layer}"


@dataclass(frozen=True)
class ModelInfo:
    """Architecture facts a method may need to validate itself or size its modules."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    """Real (unpadded) vocabulary size; logit columns at or beyond it are padding."""
    padded_vocab_size: int
    num_parameters: int = 0
    """Parameters of the whole model (``parallel.config.ModelArch.num_parameters``: the one count
    the planner and ``gkd convert`` use); 0 when unknown."""


@dataclass(frozen=True)
class BuildContext:
    """Everything a method may know when it is built, before any model exists.

    ``gkd distill``'s validation and every worker build the run's methods from the same entries and
    the same context (``methods.pipeline.build_pipeline``), so validation cannot disagree with the
    run. A method is never changed after it is built: a method whose behaviour depends on the stage
    or on the teachers reads them here (a classmethod ``from_context(params, ctx)``, which the
    registry calls instead of ``cls(**params)`` when the class has one)."""

    stage: Stage
    teachers: tuple[ModelInfo, ...] = ()
    """Every teacher's architecture, in config order (``Tap.teacher_index`` indexes them); empty
    for a run without a teacher."""
    student: ModelInfo | None = None
    tp: int = 1
    pp: int = 1
    build_inner: Callable[[Any], Method] | None = None
    """Builds a method from a nested method entry (a mapping ``{name: ..., <params>}`` or a parsed
    entry) in this same context: how a combiner gets its inner method without importing the
    registry. Set by the pipeline builder."""

    @property
    def teacher(self) -> ModelInfo | None:
        """The first teacher (the teacher of a single-teacher run), or None."""
        return self.teachers[0] if self.teachers else None


@dataclass
class LossContext:
    """Everything besides features that a method's ``compute`` may use.

    Token tensors are flattened the same way as the logits: ``N = s * b`` tokens of this
    microbatch on this data-parallel rank.
    """

    step: int
    """0-based optimizer step being computed."""
    total_steps: int
    stage: Stage
    loss_mask: torch.Tensor
    """``[N]`` float, 1.0 for tokens that count, 0.0 for padding and ignored positions. In
    example-aware batches (``data.mode: padded | packed``) position ``k`` counts when its label
    (the next token) is a target of the same example (a completion or assistant token, every
    token of plain text) and ``k`` is not padding: prompts, the boundary between two packed
    examples and padding never count."""
    labels: torch.Tensor | None
    """``[N]`` long next-token ids in the student's vocabulary (``lm`` and hard-label terms)."""
    vocab_start: int
    """Index of this tp rank's first logit column in the full (padded) vocabulary."""
    vocab_size: int
    """Number of real vocabulary entries; columns at or beyond it are masked out."""
    tp_group: dist.ProcessGroup | None = None
    """Tensor-parallel group the logits are sharded over (``None``: not sharded)."""
    dp_group: dist.ProcessGroup | None = None
    """Data-parallel group (for methods that gather negatives across the batch)."""
    teacher: ModelInfo | None = None
    student: ModelInfo | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    """Runtime-provided extras (e.g. ``sample_ids``); methods must not rely on keys they did not
    document."""
    token_mask: torch.Tensor | None = None
    """``[N]`` float, 1.0 for every non-padding position whether or not it has a label (GLMD
    distills at every such position); ``None`` means the same as ``loss_mask``. In
    example-aware batches: the ``loss_mask`` positions plus each example's last position when
    that token is a target (its prediction has no label), so prompts and padding never count."""

    example_ids: torch.Tensor | None = None
    """``[N]`` int64, s-major like ``labels``: the example each position belongs to, numbered
    ``0 .. E-1`` within this microbatch (in row order), ``-1`` on padding. An example never
    straddles rows. In ``data.mode: stream`` every row (window) is one example. ``None`` (unit
    tests, old callers): every row is one sample, as :meth:`segment_ids` says."""
    batch_size: int | None = None
    """``b``, the rows of this microbatch's ``[s, b]`` token grid (``N = s * b``); ``None`` when
    the caller did not say (then helpers take it from the features)."""
    choices: ChoiceBatch | None = None
    """Choice data (:mod:`methods.choices`): per example its group and option index, per group its
    label (``-1``: none); ``None`` unless the data are choice records (``data.choices``). Task-stage
    methods then work on option scores (:meth:`option_scores`)."""

    @property
    def distill_mask(self) -> torch.Tensor:
        """``[N]`` float mask of the positions a label-free method distills: ``token_mask`` when the
        runtime provides it, else ``loss_mask``."""
        return self.loss_mask if self.token_mask is None else self.token_mask

    # -- per-example helpers (methods.examples); all indices are flat s-major token indices

    def segment_ids(self, batch_size: int | None = None) -> torch.Tensor:
        """``[N]`` int64: ``example_ids`` when the runtime gives them, else each row's index
        (``k % b``: one segment per row, the per-window behaviour)."""
        if self.example_ids is not None:
            return self.example_ids
        b = batch_size or self.batch_size
        if b is None:
            raise ValueError("segment_ids needs batch_size when the context has no example_ids")
        return column_ids(self.loss_mask.numel(), b, self.loss_mask.device)

    def num_segments(self, batch_size: int | None = None) -> int:
        """``E``: examples in this microbatch (rows when there are no ``example_ids``)."""
        if self.example_ids is not None:
            return count_examples(self.example_ids)
        b = batch_size or self.batch_size
        if b is None:
            raise ValueError("num_segments needs batch_size when the context has no example_ids")
        return b

    def pool_examples(
        self,
        features: torch.Tensor,
        how: ExamplePooling = "mean",
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One vector per example (per row without ``example_ids``) from ``[s, b, h]`` features:
        ``([E, h], [E] bool valid)``. ``how``: ``first``, ``last`` or ``mean`` over the example's
        tokens where ``mask`` (``[N]`` or ``[s, b]``) is > 0; ``mask=None``: all its tokens."""
        b = features.shape[1] if features.dim() == 3 else self.batch_size
        ids = self.segment_ids(b)
        return pool_by_example(features, ids, how, mask=mask, num_examples=self.num_segments(b))

    def answer_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(last_prompt [E], first_target [E])``: per example, the flat index of the last
        context token (whose label is the first target token, e.g. a completion's first token)
        and of that first target token; ``-1`` for an example without targets. Needs
        ``batch_size``."""
        if self.batch_size is None:
            raise ValueError("answer_positions needs LossContext.batch_size")
        return answer_positions(
            self.segment_ids(),
            self.loss_mask,
            self.batch_size,
            num_examples=self.num_segments(),
        )

    def option_scores(self, logits: Any, *, normalize: bool = False) -> torch.Tensor:
        """``[G, K]`` option scores (sum of ``log p`` over each option's tokens; ``normalize``:
        per token) of one model's ``LOGITS`` feature; ``-inf`` for missing options
        (:func:`methods.choices.option_scores`)."""
        from methods.choices import option_scores

        return option_scores(logits, self, normalize=normalize)


@runtime_checkable
class Method(Protocol):
    """A distillation method: which features it needs, and the loss terms it computes."""

    name: ClassVar[str]
    stages: ClassVar[frozenset[Stage]]

    def taps(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[Tap]:
        """The features this method needs. Called once at build time; raise ``ValueError`` naming
        the config field and the fix when the models cannot provide them."""
        ...

    def compute(
        self, features: Mapping[Tap, torch.Tensor], ctx: LossContext
    ) -> dict[str, torch.Tensor]:
        """Loss terms (scalar tensors, unweighted) from the features available on this pipeline
        stage. Return ``{}`` when none of this method's features live here. Term names are short
        (``"kl"``, ``"hidden"``); the pipeline prefixes the method name."""
        ...


# Optional hooks. A method implements them when it needs to; the pipeline checks with isinstance.


@runtime_checkable
class WeightsTerms(Protocol):
    """A method whose terms are combined with internal weights (e.g. KD's soft and hard terms).

    Terms stay unweighted in ``compute``'s result (they are logged as they are); the pipeline
    multiplies each by ``term_weights(ctx)[term]`` (1.0 when absent) and by the method's weight."""

    def term_weights(self, ctx: LossContext) -> Mapping[str, float]: ...


@runtime_checkable
class HasModules(Protocol):
    """A method with trainable parameters of its own (e.g. a projection from student to teacher
    width). The runtime adds them to the optimizer and the checkpoint."""

    def modules(self) -> Mapping[str, torch.nn.Module]: ...


@runtime_checkable
class HasRuntimeState(Protocol):
    """A method that keeps state between steps that is not a parameter (e.g. rl_kd's selections,
    rewarded one step later). The runtime saves ``runtime_state()`` with each checkpoint, one
    object per rank (tensors and plain Python values, picklable), and hands it back to
    ``load_runtime_state`` when a run resumes at the same layout (tensor, pipeline and data
    parallel sizes); at another layout the method starts without it (the runtime logs that)."""

    def runtime_state(self) -> dict[str, Any]: ...

    def load_runtime_state(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class PlacesModules(Protocol):
    """A :class:`HasModules` method whose modules are used on one pipeline stage only.

    ``module_layers()`` maps a module name (a key of ``modules()``) to the global 0-based index of
    the *student* layer whose pipeline stage uses it (negative counts from the end: ``-1`` is the
    last layer, i.e. the stage with the logits). The runtime builds, trains and checkpoints such a
    module on that stage alone. Modules not listed here are replicated on every stage: their
    gradients are summed over the pipeline group, so the copies stay equal (correct wherever the
    method uses them, at the cost of one small all-reduce per step)."""

    def module_layers(self) -> Mapping[str, int]: ...


@runtime_checkable
class PairsLayers(Protocol):
    """A method that compares student layer ``s`` with teacher layer ``t`` in one loss term.

    Both layers must live on the same pipeline stage (features never cross stages); the config
    check (``methods.layer_mapping.check_pipeline``) refuses a pair that does not and proposes the
    nearest stage-aligned mapping."""

    def layer_pairs(self, teacher: ModelInfo, student: ModelInfo) -> Sequence[tuple[int, int]]:
        """``[(student_layer, teacher_layer), ...]``, global 0-based indices."""
        ...


class ForwardHandles(Protocol):
    """What the runtime lends a :class:`ForwardModifier` (implemented in ``parallel/``; plain torch
    objects only, so methods stay free of megatron-core).

    Hooks fire in training only; evaluation runs the unmodified models."""

    student_layers: Mapping[int, torch.nn.Module]
    """This pipeline stage's student transformer layers by global 0-based index. A layer is called
    with keyword arguments (``hidden_states`` ``[s, b, h]`` first) and returns a tuple whose first
    element is its output hidden states ``[s, b, h]``, replicated over tp."""
    teacher_layers: Sequence[Mapping[int, torch.nn.Module]]
    """The same for each teacher (frozen: ``requires_grad`` is off, but calling a layer with grad
    enabled lets gradients flow through its input)."""
    seed: int
    """The run's seed (``train.seed``); derive per-step random draws from it and the step so that
    every rank draws the same."""

    def step(self) -> tuple[int, int]:
        """``(step, total_steps)`` of the step being computed."""
        ...

    def microbatch(self) -> int:
        """Index of the microbatch being computed within the step (0-based)."""
        ...

    def is_training(self) -> bool:
        """True in training steps (hooks must do nothing otherwise)."""
        ...

    def double_batch(self) -> None:
        """Run every training microbatch twice in one pass: the model inputs become ``[x; x]``
        (``2b`` sequences; activations between pipeline stages double too). Methods see the first
        half as usual; the features of the second half arrive in ``ctx.extras["counterfactual"]``
        (same taps, same shapes). Hooks change the second half (an intervention)."""
        ...

    def perturb_embeddings(self, epsilon: float) -> None:
        """Make every training step two passes: the first forward/backward only records the
        gradient of the loss w.r.t. the student's embedding output (its parameter gradients are
        discarded); the second runs with the embedding output moved by ``epsilon`` along that
        gradient, normalized per sequence (``e + epsilon g / ||g||``), and its gradients update the
        student."""
        ...


@runtime_checkable
class ForwardModifier(Protocol):
    """A method that changes the forward pass (Theseus, DIITO, LRC-BERT). The runtime calls
    ``install`` once per model build, after the models exist and before the first step; the method
    registers torch hooks on the layers in ``handles`` and asks for the generic runtime features it
    needs (:meth:`ForwardHandles.double_batch`, :meth:`ForwardHandles.perturb_embeddings`)."""

    def install(self, handles: ForwardHandles) -> None: ...


def requires_single_stage(method: object) -> bool:
    """True when ``method`` declares ``requires_single_stage = True`` (it needs features of
    layers that pipeline parallelism would put on different stages): refused at ``parallel.pp > 1``."""
    return bool(getattr(method, "requires_single_stage", False))
