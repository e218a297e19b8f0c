"""Text <-> token ids for a checkpoint: the `Tokenizer` a model is served with, and streaming detokenization.

A `Tokenizer` is built either from a Hugging Face folder (`tokenizer.json`, plus `tokenizer_config.json`,
`chat_template.jinja` and `generation_config.json` where present), which this module reads, or from the tokenizer
metadata of a GGUF file, which `gguf_tokenizer.py` turns into a `tokenizers.Tokenizer` the way transformers does,
so both give the same ids. It encodes, decodes and renders chat templates (through `chat_template.py`), and its
`StreamDecoder` turns ids into text one token at a time without ever emitting half a character. This module knows
nothing about models, tensors or devices, nor how GGUF tokenizers are rebuilt or chat templates sandboxed; it
depends only on `tokenizers`, those two modules, `errors.py` and the standard library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from layerline.chat_template import render_chat_template
from layerline.errors import CheckpointError, LayerlineError
from layerline.gguf_tokenizer import backend_from_gguf

if TYPE_CHECKING:
    from layerline.gguf_file import GGUFFile

__all__ = ["StreamDecoder", "Tokenizer"]

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


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

    def to_json(self) -> str:
        """Everything needed to rebuild this tokenizer elsewhere (a client), as plain JSON."""
        return json.dumps(
            {
                "backend": self.backend.to_str(),
                "bos_token_id": self.bos_token_id,
                "eos_token_ids": self.eos_token_ids,
                "pad_token_id": self.pad_token_id,
                "special_tokens": self.special_tokens,
                "chat_template": self.chat_template,
                "source": self.source,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """The inverse of `to_json`; malformed input is a CheckpointError."""
        try:
            d = json.loads(text)
            return cls(
                _Backend.from_str(d["backend"]),
                bos_token_id=d["bos_token_id"],
                eos_token_ids=[int(i) for i in d["eos_token_ids"]],
                pad_token_id=d["pad_token_id"],
                special_tokens={str(k): str(v) for k, v in d["special_tokens"].items()},
                chat_template=d["chat_template"],
                source=str(d["source"]),
            )
        except Exception as e:  # json, key and type errors, and tokenizers raises plain Exception
            raise CheckpointError(f"not a serialized layerline tokenizer: {type(e).__name__}: {e}") from None

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
        where = str(getattr(gguf, "path", "GGUF file"))
        parts = backend_from_gguf(gguf.metadata, where)
        return cls(
            parts.backend,
            bos_token_id=parts.bos_token_id,
            eos_token_ids=parts.eos_token_ids,
            pad_token_id=parts.pad_token_id,
            special_tokens=parts.special_tokens,
            chat_template=parts.chat_template,
            source=where,
        )

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
        source = chat_template if chat_template is not None else self.chat_template
        if source is None:
            raise LayerlineError(
                f"the tokenizer from {self.source} has no chat template; send a plain prompt instead of messages"
            )
        return render_chat_template(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            tools=tools,
            documents=documents,
            variables=template_kwargs,
        )

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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m layerline.tokenizer [--zlib] PATH`: print the JSON of PATH's tokenizer (`Tokenizer.to_json`;
    with --zlib, its UTF-8 bytes zlib-compressed), or its error on stderr with exit status 2. Stage servers build
    the tokenizer they serve this way, in a process of its own: the vocabulary's transient tens of MiB are then
    never theirs."""
    import sys
    import zlib

    args = list(sys.argv[1:] if argv is None else argv)
    compressed = "--zlib" in args
    args = [a for a in args if a != "--zlib"]
    if len(args) != 1:
        print("usage: python -m layerline.tokenizer [--zlib] PATH", file=sys.stderr)
        return 2
    try:
        text = Tokenizer.from_path(args[0]).to_json()
    except LayerlineError as e:
        print(e, file=sys.stderr)
        return 2
    if compressed:
        sys.stdout.buffer.write(zlib.compress(text.encode("utf-8"), 6))
    else:
        sys.stdout.write(text)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
