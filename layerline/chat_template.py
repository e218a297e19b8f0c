"""Rendering chat templates: a conversation and its settings in, the prompt text a model expects out.

`render_chat_template` compiles a template (cached by its source) in a jinja2 sandbox set up like transformers'
(`raise_exception`, `strftime_now`, a `tojson` filter that keeps non-ASCII, `{% generation %}` blocks, loop
controls, a `namespace` that refuses private names) and renders it with the messages, tools, documents, special
token strings and any extra variables. Everything handed to the template is first copied down to JSON-like values,
and a message's reasoning is offered under every field name templates read it from. This module deliberately knows
nothing about vocabularies, token ids or where a template was found: the caller passes the template source and the
special token strings, and gets back text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from layerline.errors import LayerlineError

if TYPE_CHECKING:
    import jinja2

__all__ = ["render_chat_template"]

# Names a message's reasoning may come under; templates read the first (and gpt-oss ones read `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _plain(value: Any) -> Any:
    """A copy of template input made only of JSON-like values, so the sandbox never sees a rich object's methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


_TEMPLATE_CACHE: dict[str, jinja2.Template] = {}


def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in an environment like transformers' (same globals, filters and extensions)."""
    cached = _TEMPLATE_CACHE.get(source)
    if cached is not None:
        return cached
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it just renders."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return str(caller())

    class _TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class _Namespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        template = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise LayerlineError(f"the chat template does not compile: {e}") from None
    if len(_TEMPLATE_CACHE) > 16:
        _TEMPLATE_CACHE.clear()
    _TEMPLATE_CACHE[source] = template
    return template


def render_chat_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """Render `messages` with the chat template `source`, as transformers' `apply_chat_template(tokenize=False)`.

    The template sees `messages`, `add_generation_prompt`, `tools`, `documents`, the `special_tokens` (`bos_token`,
    `eos_token`, ...) and `variables`, which override special tokens of the same name. Messages' None fields are
    dropped. Errors in the template, including its own `raise_exception(...)` calls, come back as `LayerlineError`.
    """
    import jinja2

    if not messages:
        raise LayerlineError("cannot apply a chat template to an empty conversation")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise LayerlineError(f"chat messages must be dicts, got {type(message).__name__}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    context: dict[str, Any] = {**special_tokens, **_plain(dict(variables or {}))}
    template = _compile_template(source)
    try:
        return template.render(
            messages=chat,
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **context,
        )
    except jinja2.exceptions.TemplateError as e:
        raise LayerlineError(f"chat template error: {e}") from None
