"""Text <-> token ids for a checkpoint: loading a tokenizer, encoding, decoding, streaming and chat templates.

A `Tokenizer` is built either from a Hugging Face folder (`tokenizer.json`, plus `tokenizer_config.json`,
`chat_template.jinja` and `generation_config.json` where present) or from the tokenizer metadata of a GGUF file,
which it turns into a `tokenizers.Tokenizer` the way transformers does (byte-level BPE for `gpt2` vocabularies,
SentencePiece-style BPE with byte fallback for `llama` ones), so both give the same ids. It renders chat templates
in a sandboxed jinja2 environment set up like transformers', and its `StreamDecoder` turns ids into text one token
at a time without ever emitting half a character. This module knows nothing about models, tensors or devices; it
depends only on `tokenizers`, `jinja2` and the standard library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from layerline.errors import CheckpointError, LayerlineError, UnsupportedModelError

if TYPE_CHECKING:
    import jinja2

    from layerline.gguf_file import GGUFFile

__all__ = ["StreamDecoder", "Tokenizer"]

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_GGUF_SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")  # same order

# GGUF token types, as gguf.TokenType numbers them.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Split regexes for byte-level vocabularies, keyed by `tokenizer.ggml.pre`: the same table transformers uses when it
# converts a GGUF tokenizer. Any other value gets ByteLevel's own GPT-2 regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# Names a message's reasoning may come under; templates read the first (and gpt-oss ones read `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a dict with "content", or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    content = value.get("content") if isinstance(value, Mapping) else None
    return content if isinstance(content, str) else None


def _added_token(value: Any, special: bool) -> AddedToken | None:
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=not special)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return AddedToken(
            value["content"],
            single_word=bool(value.get("single_word", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", not special)),
            special=bool(value.get("special", special)),
        )
    return None


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} {path} is not readable JSON: {e}") from None


def _generate_merges(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary with scores (best first), as transformers' `generate_merges` derives them."""
    merges: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _set_post_processor(
    backend: _Backend, bos: tuple[str, int] | None, eos: tuple[str, int] | None, add_bos: bool, add_eos: bool
) -> None:
    """Add BOS/EOS around encoded text the way transformers' `update_post_processor` does."""
    add_bos = add_bos and bos is not None
    add_eos = add_eos and eos is not None
    single = f"{bos[0] + ':0 ' if add_bos and bos else ''}$A:0{' ' + eos[0] + ':0' if add_eos and eos else ''}"
    pair = (
        f"{single}{' ' + bos[0] + ':1' if add_bos and bos else ''} $B:1{' ' + eos[0] + ':1' if add_eos and eos else ''}"
    )
    special: list[tuple[str, int]] = []
    if add_bos and bos:
        special.append(bos)
    if add_eos and eos and eos not in special:
        special.append(eos)
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


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


class Tokenizer:
    """A loaded tokenizer: `encode`/`decode`, chat templates and streaming detokenization.

    Build it with `from_path`, `from_hf_folder` or `from_gguf`. `backend` is the underlying `tokenizers.Tokenizer`.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None,
        special_tokens: Mapping[str, str | None],
        chat_template: str | None,
        source: str,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(dict.fromkeys(int(i) for i in eos_token_ids))
        self.pad_token_id = pad_token_id
        # Token strings the chat template sees as `bos_token`, `eos_token`, ... (only those that are set).
        self.special_tokens: dict[str, str] = {k: v for k, v in special_tokens.items() if v is not None}
        self.chat_template = chat_template
        self.source = source
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._byte_ids: frozenset[int] | None = None
        self._special_ids: frozenset[int] | None = None

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id (the one tokenizer_config / GGUF names), or None."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    # ---- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """A folder -> `from_hf_folder`; a `.gguf` file -> `from_gguf`; a `tokenizer.json` file -> its folder."""
        p = os.fspath(path)
        if os.path.isdir(p):
            return cls.from_hf_folder(p)
        if os.path.isfile(p):
            if p.lower().endswith(".gguf"):
                from layerline.gguf_file import GGUFFile

                return cls.from_gguf(GGUFFile(p))
            if os.path.basename(p) == "tokenizer.json":
                return cls.from_hf_folder(os.path.dirname(os.path.abspath(p)))
            raise CheckpointError(f"cannot load a tokenizer from {p}: expected a folder or a .gguf file")
        raise CheckpointError(f"tokenizer path not found: {p}")

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json` with the settings of `tokenizer_config.json` (special tokens, BOS, chat template)."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise CheckpointError(f"tokenizer folder not found: {folder}")
        tokenizer_file = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise CheckpointError(f"{folder} has no tokenizer.json (layerline needs the fast-tokenizer file)")
        try:
            with open(tokenizer_file, encoding="utf-8") as f:
                text = f.read()
            json.loads(text)
            backend = _Backend.from_str(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"tokenizer file {tokenizer_file} is not readable JSON: {e}") from None
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed tokenizer
            raise CheckpointError(f"tokenizer file {tokenizer_file} is not a valid tokenizer: {e}") from None

        config: dict[str, Any] = {}
        config_file = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config_file):
            loaded = _read_json(config_file, "tokenizer config")
            if not isinstance(loaded, dict):
                raise CheckpointError(f"tokenizer config {config_file} is not a JSON object")
            config = loaded

        # Tokens tokenizer_config.json lists in `added_tokens_decoder` but tokenizer.json lacks, then the named
        # special tokens, are added as special tokens (as transformers does) so text spelling them encodes to one id.
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        decoder_entries = config.get("added_tokens_decoder")
        if isinstance(decoder_entries, Mapping):
            extra = []
            for _, entry in sorted(decoder_entries.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
                token = _added_token(entry, special=True)
                if (
                    token is not None
                    and token.content not in present
                    and backend.token_to_id(token.content) is not None
                ):
                    extra.append(token)
                    present.add(token.content)
            if extra:
                backend.add_tokens(extra)
        names: dict[str, str | None] = {name: _token_content(config.get(name)) for name in _SPECIAL_NAMES}
        named_missing = []
        for name in _SPECIAL_NAMES:
            content = names[name]
            if content is None or content in present:
                continue
            if backend.token_to_id(content) is None:
                continue  # transformers would append a new token; layerline keeps the vocabulary the model has
            token = _added_token(config.get(name), special=True) or AddedToken(content, special=True, normalized=False)
            token.special = True
            named_missing.append(token)
            present.add(content)
        if named_missing:
            backend.add_special_tokens(named_missing)

        def token_id(name: str) -> int | None:
            content = names[name]
            return backend.token_to_id(content) if content is not None else None

        # BOS/EOS come from tokenizer.json's post-processor alone: like transformers 5, `add_bos_token` and
        # `add_eos_token` in tokenizer_config.json are ignored when there is a tokenizer.json.
        bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
        eos_ids = [eos_id] if eos_id is not None else []
        generation_file = os.path.join(folder, "generation_config.json")
        if os.path.isfile(generation_file):
            generation = _read_json(generation_file, "generation config")
            extra_eos = generation.get("eos_token_id") if isinstance(generation, dict) else None
            if isinstance(extra_eos, int):
                eos_ids.append(extra_eos)
            elif isinstance(extra_eos, list):
                eos_ids.extend(i for i in extra_eos if isinstance(i, int))

        chat_template: str | None = None
        template_file = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(template_file):
            try:
                with open(template_file, encoding="utf-8") as f:
                    chat_template = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise CheckpointError(f"chat template {template_file} is not readable: {e}") from None
        else:
            chat_template = cls._default_template(config.get("chat_template"))

        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            pad_token_id=token_id("pad_token"),
            special_tokens=names,
            chat_template=chat_template,
            source=folder,
        )

    @staticmethod
    def _default_template(value: Any) -> str | None:
        """tokenizer_config's `chat_template`: a string, or a list of named templates of which we take "default"."""
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
            default = named.get("default")
            return default if isinstance(default, str) else None
        return None

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata."""
        meta = gguf.metadata
        where = getattr(gguf, "path", "GGUF file")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise CheckpointError(
                f"{where}: metadata field 'tokenizer.ggml.tokens' is missing or not a list of strings"
            )
        kind = meta.get("tokenizer.ggml.model")
        if not isinstance(kind, str):
            raise CheckpointError(f"{where}: metadata field 'tokenizer.ggml.model' is missing")
        token_types = meta.get("tokenizer.ggml.token_type") or []
        if token_types and len(token_types) != len(tokens):
            raise CheckpointError(
                f"{where}: 'tokenizer.ggml.token_type' has {len(token_types)} entries for {len(tokens)} tokens"
            )
        merges_meta = meta.get("tokenizer.ggml.merges")
        merges: list[tuple[str, str]] | None = None
        if merges_meta is not None:
            if not isinstance(merges_meta, list):
                raise CheckpointError(f"{where}: metadata field 'tokenizer.ggml.merges' is not a list")
            merges = []
            for m in merges_meta:
                left, sep, right = str(m).partition(" ")
                if not sep:
                    raise CheckpointError(f"{where}: 'tokenizer.ggml.merges' holds {m!r}, which is not 'left right'")
                merges.append((left, right))

        architecture = meta.get("general.architecture")
        byte_level = kind == "gpt2"
        if byte_level:
            backend, vocab = cls._gguf_byte_level(tokens, merges, meta.get("tokenizer.ggml.pre"))
            add_bos_default = False
        elif kind == "llama":
            if merges is None:
                scores = meta.get("tokenizer.ggml.scores")
                if not isinstance(scores, list) or len(scores) != len(tokens):
                    raise CheckpointError(
                        f"{where}: a 'llama' tokenizer needs 'tokenizer.ggml.merges' or one "
                        f"'tokenizer.ggml.scores' entry per token"
                    )
            else:
                scores = None
            backend, vocab = cls._gguf_sentencepiece(tokens, merges, scores, architecture, meta)
            add_bos_default = True
        else:
            raise UnsupportedModelError(
                f"{where}: GGUF tokenizer model {kind!r} is not supported (layerline supports 'gpt2' and 'llama')"
            )

        # Control tokens become special added tokens and user-defined ones plain added tokens, so that text spelling
        # them (e.g. "<|im_start|>" in a rendered chat) encodes to their one id. In a byte-level vocabulary a
        # "control" token spelled outside the byte alphabet is a mislabel, and skipped, as transformers does.
        alphabet = set(_bytes_to_unicode().values()) if byte_level else None
        control = [
            AddedToken(tok, normalized=False, special=True)
            for tok, typ in zip(tokens, token_types, strict=False)
            if typ == _TOKEN_TYPE_CONTROL and (alphabet is None or set(tok) <= alphabet)
        ]
        if control:
            backend.add_special_tokens(control)
        user_defined = [
            AddedToken(tok, normalized=False, special=False)
            for tok, typ in zip(tokens, token_types, strict=False)
            if typ == _TOKEN_TYPE_USER_DEFINED and tok in vocab
        ]
        if user_defined:
            backend.add_tokens(user_defined)

        def meta_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(tokens):
                return value
            return None

        ids = {name: meta_id(key) for name, key in zip(_SPECIAL_NAMES, _GGUF_SPECIAL_KEYS, strict=True)}
        names: dict[str, str | None] = {name: tokens[i] if i is not None else None for name, i in ids.items()}
        # The named special tokens are special too (transformers adds them), where the vocabulary has them.
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        named = [
            AddedToken(content, normalized=False, special=True)
            for content in dict.fromkeys(c for c in names.values() if c is not None)
            if content not in present and backend.token_to_id(content) is not None
        ]
        if named:
            backend.add_special_tokens(named)

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        add_eos = meta.get("tokenizer.ggml.add_eos_token")
        bos_id, eos_id = ids["bos_token"], ids["eos_token"]
        _set_post_processor(
            backend,
            (names["bos_token"], bos_id) if names["bos_token"] is not None and bos_id is not None else None,
            (names["eos_token"], eos_id) if names["eos_token"] is not None and eos_id is not None else None,
            add_bos_default if add_bos is None else bool(add_bos),
            bool(add_eos) if add_eos is not None else False,
        )
        # llama.cpp stops on end-of-turn / end-of-message tokens as well as on EOS.
        eos_ids = [i for i in (eos_id, meta_id("eot_token_id"), meta_id("eom_token_id")) if i is not None]
        template = meta.get("tokenizer.chat_template")
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            pad_token_id=ids["pad_token"],
            special_tokens=names,
            chat_template=template if isinstance(template, str) else None,
            source=str(where),
        )

    @staticmethod
    def _gguf_byte_level(
        tokens: list[str], merges: list[tuple[str, str]] | None, pre: Any
    ) -> tuple[_Backend, dict[str, int]]:
        """GPT-2 style byte-level BPE. Tokens written in plain text instead of the byte alphabet are respelled."""
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab: dict[str, int] = {}
        for index, token in enumerate(tokens):
            if not set(token) <= alphabet:
                token = "".join(spelling[b] for b in token.encode("utf-8"))
            vocab[token] = index
        backend = _Backend(
            models.BPE(
                vocab=vocab,
                merges=merges or [],
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        )
        split = _BYTE_LEVEL_SPLITS.get(pre) if isinstance(pre, str) else None
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        backend.decoder = decoders.ByteLevel()
        return backend, vocab

    @staticmethod
    def _gguf_sentencepiece(
        tokens: list[str],
        merges: list[tuple[str, str]] | None,
        scores: list[float] | None,
        architecture: Any,
        meta: Mapping[str, Any],
    ) -> tuple[_Backend, dict[str, int]]:
        """SentencePiece-style BPE with byte fallback (`<0xNN>` tokens), spaces spelled "▁"."""
        gemma = architecture in ("gemma", "gemma2", "gemma3")
        if gemma:
            # Gemma files store tokens made of several spaces as real spaces; its merges follow file order.
            tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        vocab = {token: index for index, token in enumerate(tokens)}
        if merges is None:
            if gemma:
                ranking: dict[str, float] = {token: -float(index) for index, token in enumerate(tokens)}
            else:
                assert scores is not None
                ranking = {token: float(score) for token, score in zip(tokens, scores, strict=True)}
            merges = _generate_merges(vocab, ranking)
        if gemma:
            unk_id = meta.get("tokenizer.ggml.unknown_token_id")
            unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else "<unk>"
            backend = _Backend(
                models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, dropout=None, byte_fallback=True)
            )
            backend.normalizer = normalizers.Replace(" ", "\u2581")
            backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
            backend.decoder = decoders.Sequence(
                [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            )
            return backend, vocab
        backend = _Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        if architecture == "phi3":
            # Phi-3 adds its prefix space in a normalizer rather than in the pre-tokenizer.
            backend.normalizer = normalizers.Sequence(
                [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
            )
        else:
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        return backend, vocab

    # ---- encoding and decoding -----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; with `add_special_tokens`, BOS/EOS are added only where the tokenizer says so."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids` (no clean-up of spaces before punctuation is ever applied)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """An incremental decoder: push ids one at a time and get back the new text."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def _stream_token_sets(self) -> tuple[frozenset[int], frozenset[int]]:
        """(byte-fallback ids, special ids), computed once; StreamDecoder uses them to know when to wait."""
        if self._byte_ids is None:
            found = (self.backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
            self._byte_ids = frozenset(i for i in found if i is not None)
        if self._special_ids is None:
            self._special_ids = frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)
        return self._byte_ids, self._special_ids

    # ---- chat templates ------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` with the model's chat template, as transformers' `apply_chat_template(tokenize=False)`.

        The template sees `messages`, `add_generation_prompt`, `tools`, `documents`, the special token strings
        (`bos_token`, `eos_token`, ...) and any `template_kwargs`. Errors in the template, including its own
        `raise_exception(...)` calls, come back as `LayerlineError`.
        """
        import jinja2

        source = chat_template if chat_template is not None else self.chat_template
        if source is None:
            raise LayerlineError(
                f"the tokenizer from {self.source} has no chat template; send a plain prompt instead of messages"
            )
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
        variables: dict[str, Any] = {**self.special_tokens, **_plain(template_kwargs)}
        template = _compile_template(source)
        try:
            return template.render(
                messages=chat,
                tools=_plain(list(tools)) if tools is not None else None,
                documents=_plain(list(documents)) if documents is not None else None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as e:
            raise LayerlineError(f"chat template error: {e}") from None

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Ids of the rendered chat. BOS is not added again: the template writes whatever special tokens it wants."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False
        )


class StreamDecoder:
    """Turns generated ids into text incrementally.

    `push(id)` returns the text that id adds. A character whose bytes are split over several tokens is held back
    until it is complete, so no delta ever ends in a U+FFFD that later tokens would have completed. The
    concatenation of every delta and `flush()` equals `tokenizer.decode(all ids)`. Each push decodes only a short
    window of recent ids (the last emitted token onwards), so the cost per token does not grow with the text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._byte_ids, self._special_ids = tokenizer._stream_token_sets()
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window: the ids before it are settled
        self._read = 0  # ids before this have been emitted

    @property
    def ids(self) -> list[int]:
        """Every id pushed so far."""
        return list(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _window(self) -> tuple[str, str]:
        return self._decode(self._ids[self._prefix : self._read]), self._decode(self._ids[self._prefix :])

    def _in_byte_run(self) -> bool:
        """Whether the last id that reaches the decoder is a byte-fallback token (`<0xNN>`).

        The decoder turns a run of byte tokens into text only if the whole run is valid UTF-8, and into one U+FFFD
        per byte otherwise, so text from an unfinished run could still change. Ids that decode to nothing (skipped
        special tokens, ids outside the vocabulary) do not end a run.
        """
        for i in reversed(self._ids[self._read :]):
            if (self._skip and i in self._special_ids) or self._tokenizer.id_to_token(i) is None:
                continue
            return i in self._byte_ids
        return False

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly "")."""
        self._ids.append(int(token_id))
        if self._byte_ids and self._in_byte_run():
            return ""
        settled, text = self._window()
        if len(text) <= len(settled) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(settled) :]

    def flush(self) -> str:
        """The text still held back (an incomplete character comes out as U+FFFD, as `decode` gives it)."""
        if self._read == len(self._ids):
            return ""
        settled, text = self._window()
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(settled) :]
