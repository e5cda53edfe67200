"""Chat examples: render messages with the tokenizer's own chat template, mask assistant turns.

The template is the ``chat_template`` of the tokenizer's ``tokenizer_config.json`` (or its
``chat_template.jinja``; a list of named templates uses the one named ``default``). It is rendered
as transformers' ``apply_chat_template`` renders it: Jinja2's immutable sandbox with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that
keeps non-ASCII characters, the globals ``raise_exception`` and ``strftime_now``, the variables
``messages``, ``bos_token``, ``eos_token`` and ``add_generation_prompt=False``. The rendered text is
tokenized without adding special tokens (the template writes them), as transformers does.

Which tokens are targets (the assistant turns):

- a template with ``{% generation %} ... {% endgeneration %}`` blocks (the form TRL's
  ``assistant_only_loss`` and transformers' ``return_assistant_tokens_mask`` need) marks exactly
  the text rendered inside those blocks;
- any other template: for each assistant message ``k``, the text between the rendering of
  ``messages[:k]`` with ``add_generation_prompt=True`` (everything up to where the model starts to
  answer) and the rendering of ``messages[:k+1]`` (its answer and end-of-turn marker, and whatever
  the template writes right after it, usually a newline) is the answer. This needs a template
  whose rendering of a prefix of the conversation is a prefix of the rendering of the whole (true
  of ChatML/SmolLM2, Llama-3 and most templates; not of templates that rewrite earlier turns, such
  as those dropping past reasoning): otherwise the example is refused with its file and line, and
  the fix is to add ``{% generation %}`` blocks to the template.

A token is a target when its character span overlaps an assistant span (as transformers maps
``{% generation %}`` spans with ``char_to_token``). No end-of-document token is appended: the
template's end-of-turn marker ends the answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from typing import Any

import numpy as np

from gkd_cli.data.tokenizer import Tokenizer


def _jinja():
    try:
        import jinja2
    except ImportError:  # pragma: no cover - jinja2 comes with torch
        raise ValueError("chat data needs jinja2: pip install jinja2") from None
    return jinja2


def _make_environment():
    jinja2 = _jinja()
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(Extension):
        """``{% generation %}...{% endgeneration %}``: records the character span of its output."""

        tags = {"generation"}

        def __init__(self, environment: Any) -> None:
            super().__init__(environment)
            self.rendered: list[str] | None = None
            self.spans: list[tuple[int, int]] = []

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_generation", [])
            return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _generation(self, caller):
            text = caller()
            if self.rendered is not None:
                start = sum(len(chunk) for chunk in self.rendered)
                self.spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationTracker, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    tracker = next(e for e in env.extensions.values() if isinstance(e, GenerationTracker))
    return env, tracker


def select_template(template_config: dict[str, Any], source: str) -> str:
    """The chat template string of a tokenizer's ``template_config``; ``ValueError`` naming the
    file and the fix when there is none."""
    template = template_config.get("chat_template")
    origin = template_config.get("origin") or f"the tokenizer_config.json next to {source}"
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise ValueError(
                f"{origin}: chat_template lists templates {sorted(map(str, named))} but none "
                "named 'default'; chat data is rendered with the default template"
            )
    if not isinstance(template, str) or not template.strip():
        raise ValueError(
            f"chat data needs the tokenizer's chat template, but {origin} has no chat_template "
            f"(tokenizer {source}); use the tokenizer folder of an instruction-tuned model (its "
            'tokenizer_config.json holds one), or add a "chat_template" string to that file'
        )
    return template


class ChatRenderer:
    """Renders and tokenizes chat examples with one template (picklable: rebuilt from its
    arguments in pool workers)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        origin: str = "<template>",
    ) -> None:
        self.tokenizer = tokenizer
        self.template_text = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.origin = origin
        env, self._tracker = _make_environment()
        jinja2 = _jinja()
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(
                f"{origin}: the chat template is not valid Jinja (line {error.lineno}: "
                f"{error.message})"
            ) from None
        self.tracks_generation = bool(_GENERATION_TAG.search(template))

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> ChatRenderer:
        config = tokenizer.template_config
        template = select_template(config, tokenizer.source)
        return cls(
            tokenizer,
            template,
            bos_token=config.get("bos_token"),
            eos_token=config.get("eos_token"),
            origin=config.get("origin", tokenizer.source),
        )

    def __reduce__(self):
        return (
            _rebuild_renderer,
            (self.tokenizer, self.template_text, self.bos_token, self.eos_token, self.origin),
        )

    def identity(self) -> dict[str, Any]:
        """What decides the rendering (for cache keys)."""
        text = json.dumps([self.template_text, self.bos_token, self.eos_token])
        return {"template_sha256": hashlib.sha256(text.encode()).hexdigest()}

    # -- rendering ----------------------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages`` (as ``apply_chat_template(tokenize=False)``)."""
        return self._render(messages, add_generation_prompt)[0]

    def _render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, where: str = ""
    ) -> tuple[str, list[tuple[int, int]]]:
        jinja2 = _jinja()
        variables = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
        }
        tracker = self._tracker
        tracker.rendered, tracker.spans = [], []
        try:
            for chunk in self._template.generate(**variables):
                tracker.rendered.append(chunk)
            return "".join(tracker.rendered), list(tracker.spans)
        except jinja2.TemplateError as error:
            prefix = f"{where}: " if where else ""
            raise ValueError(
                f"{prefix}the chat template ({self.origin}) refused this conversation: {error}"
            ) from None
        finally:
            tracker.rendered = None

    def assistant_spans(
        self, messages: list[dict[str, Any]], where: str = ""
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant answers."""
        text, spans = self._render(messages, False, where)
        if self.tracks_generation:
            return text, spans
        spans = []
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self._render(messages[:k], True, where)[0]
            through = self._render(messages[: k + 1], False, where)[0]
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    f"{where}: the chat template ({self.origin}) does not render this "
                    f"conversation's prefix up to message {k} as a prefix of the whole, so the "
                    "assistant answers cannot be located; add {% generation %} ... "
                    "{% endgeneration %} around the assistant content in the template (as TRL's "
                    "assistant_only_loss needs), or fix the conversation"
                )
            spans.append((len(before), len(through)))
        return text, spans

    def encode(
        self, messages: list[dict[str, Any]], where: str = ""
    ) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation and its 0/1 target mask (assistant turns)."""
        text, spans = self.assistant_spans(messages, where)
        ids, offsets = self.tokenizer.encode_offsets(text)
        if not ids:
            raise ValueError(f"{where}: the chat template renders this conversation as nothing")
        mask = spans_to_mask(offsets, spans)
        if not mask[1:].any():
            raise ValueError(
                f"{where}: no assistant token to train on after rendering (the template "
                f"{self.origin} writes no assistant text for this conversation)"
            )
        return list(ids), mask.tolist()


def _rebuild_renderer(tokenizer, template, bos_token, eos_token, origin) -> ChatRenderer:
    return ChatRenderer(
        tokenizer, template, bos_token=bos_token, eos_token=eos_token, origin=origin
    )


_GENERATION_TAG = re.compile(r"\{%-?\+?\s*generation\s*[-+]?%\}")


def spans_to_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """``uint8`` mask: 1 for each token whose character span ``[start, end)`` overlaps one of
    ``spans`` (an empty token span counts when its position lies inside one)."""
    starts = np.asarray([o[0] for o in offsets], dtype=np.int64)
    ends = np.asarray([o[1] for o in offsets], dtype=np.int64)
    mask = np.zeros(len(offsets), dtype=np.uint8)
    for a, b in spans:
        if b <= a:
            continue
        overlap = (starts < b) & (ends > a)
        empty = (starts == ends) & (starts >= a) & (starts < b)
        mask[overlap | empty] = 1
    return mask
