"""Building a `tokenizers.Tokenizer` from the tokenizer metadata of a GGUF file, the way transformers converts one.

`backend_from_gguf` reads the `tokenizer.ggml.*` fields (tokens, token types, merges or scores, special token ids,
BOS/EOS flags, the pre-tokenizer name and the chat template) and builds the matching backend: byte-level BPE with
the split regex `tokenizer.ggml.pre` names for `gpt2` vocabularies, SentencePiece-style BPE with byte fallback for
`llama` ones (merges derived from scores where the file has none, with the Gemma and Phi-3 variants), control and
user-defined tokens added, and BOS/EOS placed by a post-processor, so ids match transformers' tokenizer for the same
file. This module deliberately knows nothing about how GGUF files are parsed (it takes the metadata as a mapping),
about Hugging Face tokenizer folders, or about encoding, decoding and chat templates, which `tokenizer.py` and
`chat_template.py` do with what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from layerline.errors import CheckpointError, UnsupportedModelError

__all__ = ["GGUFTokenizerParts", "backend_from_gguf", "end_of_generation"]

# The special tokens a chat template sees, and the GGUF metadata key of each one's id.
_SPECIAL_KEYS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}

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
    backend: Backend, bos: tuple[str, int] | None, eos: tuple[str, int] | None, add_bos: bool, add_eos: bool
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


@dataclass(frozen=True)
class GGUFTokenizerParts:
    """What a GGUF file says about its tokenizer: the built backend and the settings around it."""

    backend: Backend
    bos_token_id: int | None
    eos_token_ids: list[int]  # EOS, then end-of-turn and end-of-message where set (llama.cpp stops on all of them)
    pad_token_id: int | None
    special_tokens: dict[str, str | None]  # bos_token, eos_token, unk_token, pad_token -> token string or None
    chat_template: str | None


def backend_from_gguf(metadata: Mapping[str, Any], where: str) -> GGUFTokenizerParts:
    """Build the tokenizer GGUF `metadata` describes in its `tokenizer.ggml.*` fields.

    `where` names the file in error messages. A missing or malformed field is a `CheckpointError`; a tokenizer
    model other than `gpt2` or `llama` is an `UnsupportedModelError`.
    """
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{where}: metadata field 'tokenizer.ggml.tokens' is missing or not a list of strings")
    kind = metadata.get("tokenizer.ggml.model")
    if not isinstance(kind, str):
        raise CheckpointError(f"{where}: metadata field 'tokenizer.ggml.model' is missing")
    token_types = metadata.get("tokenizer.ggml.token_type") or []
    if token_types and len(token_types) != len(tokens):
        raise CheckpointError(
            f"{where}: 'tokenizer.ggml.token_type' has {len(token_types)} entries for {len(tokens)} tokens"
        )
    merges_meta = metadata.get("tokenizer.ggml.merges")
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

    architecture = metadata.get("general.architecture")
    byte_level = kind == "gpt2"
    if byte_level:
        backend, vocab = _byte_level_backend(tokens, merges, metadata.get("tokenizer.ggml.pre"))
        add_bos_default = False
    elif kind == "llama":
        if merges is None:
            scores = metadata.get("tokenizer.ggml.scores")
            if not isinstance(scores, list) or len(scores) != len(tokens):
                raise CheckpointError(
                    f"{where}: a 'llama' tokenizer needs 'tokenizer.ggml.merges' or one "
                    f"'tokenizer.ggml.scores' entry per token"
                )
        else:
            scores = None
        backend, vocab = _sentencepiece_backend(tokens, merges, scores, architecture, metadata)
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
        value = metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(tokens):
            return value
        return None

    ids = {name: meta_id(key) for name, key in _SPECIAL_KEYS.items()}
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

    add_bos = metadata.get("tokenizer.ggml.add_bos_token")
    add_eos = metadata.get("tokenizer.ggml.add_eos_token")
    bos_id, eos_id = ids["bos_token"], ids["eos_token"]
    _set_post_processor(
        backend,
        (names["bos_token"], bos_id) if names["bos_token"] is not None and bos_id is not None else None,
        (names["eos_token"], eos_id) if names["eos_token"] is not None and eos_id is not None else None,
        add_bos_default if add_bos is None else bool(add_bos),
        bool(add_eos) if add_eos is not None else False,
    )
    eos_ids = end_of_generation(metadata)
    template = metadata.get("tokenizer.chat_template")
    return GGUFTokenizerParts(
        backend,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        pad_token_id=ids["pad_token"],
        special_tokens=names,
        chat_template=template if isinstance(template, str) else None,
    )


# What llama.cpp stops generating on besides EOS (llama-vocab.cpp): the end-of-turn, end-of-message and
# fill-in-the-middle ids the file names, and any token spelled as one of these markers, which is how a Gemma
# file's `<end_of_turn>`, a Phi-3 file's `<|end|>` or a Qwen file's `<|im_end|>` and `<|endoftext|>` end a reply
# although the file's EOS id is another token.
_END_KEYS = ("eot_token_id", "eom_token_id", "fim_pad_token_id", "fim_rep_token_id", "fim_sep_token_id")
_END_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "</s>",
        "<eos>",
    }
)


def end_of_generation(metadata: Mapping[str, Any]) -> list[int]:
    """The ids a generation from this file stops on: EOS first (`Tokenizer.eos_token_id`), then the others by id."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else []

    def named(key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}")
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and 0 <= value
            and (not tokens or value < len(tokens))
        ):
            return value
        return None

    eos = named("eos_token_id")
    ends = {i for i in (named(k) for k in _END_KEYS) if i is not None}
    ends.update(i for i, text in enumerate(tokens) if text in _END_TEXTS)
    first = [eos] if eos is not None else []
    return first + sorted(ends - set(first))


def _byte_level_backend(
    tokens: list[str], merges: list[tuple[str, str]] | None, pre: Any
) -> tuple[Backend, dict[str, int]]:
    """GPT-2 style byte-level BPE. Tokens written in plain text instead of the byte alphabet are respelled."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = index
    backend = Backend(
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


def _sentencepiece_backend(
    tokens: list[str],
    merges: list[tuple[str, str]] | None,
    scores: list[float] | None,
    architecture: Any,
    meta: Mapping[str, Any],
) -> tuple[Backend, dict[str, int]]:
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
        backend = Backend(
            models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, dropout=None, byte_fallback=True)
        )
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        return backend, vocab
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    if architecture == "phi3":
        # Phi-3 adds its prefix space in a normalizer rather than in the pre-tokenizer.
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend, vocab
