"""Each family's chat template from its GGUF file, rendered and tokenized as transformers does from the same file,
and the tokens a reply ends on as llama.cpp stops on them.

The templates are the ones the families publish (Gemma 2's and Gemma 3's turn markers with the assistant called
`model`, Phi-3's `<|user|>` ... `<|end|>`, Qwen 2.5's ChatML with its default system prompt, Qwen 3's with its
thinking blocks and `enable_thinking`), written into tokenizer-only GGUF files made here with the `gguf` package.
A reply ends on EOS and on the markers llama.cpp's vocabulary loader treats as end of generation, which for Gemma
(`<end_of_turn>`) and Phi-3 (`<|end|>`) are not the file's EOS token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from layerline.errors import LayerlineError
from layerline.gguf_file import GGUFFile
from layerline.gguf_tokenizer import end_of_generation
from layerline.tokenizer import Tokenizer
from tiny_models import byte_tokenizer, write_spm_gguf

GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

QWEN2_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

GEMMA_MARKERS = (("<start_of_turn>", 3), ("<end_of_turn>", 3), ("<start_of_image>", 3))
PHI3_MARKERS = (("<|system|>", 3), ("<|user|>", 3), ("<|assistant|>", 3), ("<|end|>", 3))

# family -> (template, the marker a reply ends on, what the generation prompt ends with)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "gemma2": (GEMMA2_TEMPLATE, "<end_of_turn>", "<start_of_turn>model\n"),
    "gemma3": (GEMMA3_TEMPLATE, "<end_of_turn>", "<start_of_turn>model\n"),
    "phi3": (PHI3_TEMPLATE, "<|end|>", "<|assistant|>\n"),
    "qwen2": (QWEN2_TEMPLATE, "<|im_end|>", "<|im_start|>assistant\n"),
    "qwen3": (QWEN3_TEMPLATE, "<|im_end|>", "<|im_start|>assistant\n"),
}

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "  hello world  "},
        {"role": "assistant", "content": "hi, this is a tiny model"},
        {"role": "user", "content": "numbers 0123456789"},
    ],
    [
        {"role": "user", "content": "the capital?"},
        {"role": "assistant", "content": "<think>\nit is paris\n</think>\n\nParis."},
        {"role": "user", "content": "and numbers?"},
    ],
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"}]


def _write_bpe_gguf(path: Path, architecture: str, chat_template: str) -> None:
    """A byte-level BPE vocabulary (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as control tokens) as llama.cpp
    writes a Qwen file: EOS `<|im_end|>` for qwen2 (an instruct file), `<|endoftext|>` for qwen3 (a base file)."""
    import gguf

    tok = byte_tokenizer()
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.to_str())["model"]["merges"]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_eos_token_id(2 if architecture == "qwen2" else 0)
    writer.add_pad_token_id(0)
    writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, the file, layerline's tokenizer, transformers' tokenizer from the same file)."""
    transformers = pytest.importorskip("transformers")
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    path = folder / "tokenizer.gguf"
    template = FAMILIES[name][0]
    if name.startswith("gemma"):
        write_spm_gguf(path, name, specials=("<unk>", "<bos>", "<eos>"), markers=GEMMA_MARKERS, chat_template=template)
    elif name == "phi3":
        write_spm_gguf(
            path, name, specials=("<unk>", "<s>", "<|endoftext|>"), markers=PHI3_MARKERS, chat_template=template
        )
    else:
        _write_bpe_gguf(path, name, template)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name)
    return name, path, Tokenizer.from_path(path), hf


def _hf_ids(hf: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if not isinstance(out, list) else out)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_each_family_renders_its_template_as_transformers(family, add_generation_prompt: bool) -> None:
    name, _, ours, hf = family
    _, _, prompt_end = FAMILIES[name]
    for messages in CONVERSATIONS:
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == _hf_ids(
            hf, messages, add_generation_prompt=add_generation_prompt
        )
        assert text.endswith(prompt_end) == add_generation_prompt
    turn = ours.apply_chat_template(CONVERSATIONS[1])
    if name.startswith("gemma"):
        # BOS from the template, the assistant's turns are the model's, contents trimmed.
        assert turn.startswith("<bos><start_of_turn>user\nhello world<end_of_turn>\n<start_of_turn>model\nhi,")
        assert ours.encode_chat(CONVERSATIONS[0])[0] == ours.bos_token_id
    elif name == "qwen2":
        assert turn.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    elif name == "qwen3":
        # The reasoning of a finished turn is dropped; asked not to think, the prompt closes an empty block.
        past = ours.apply_chat_template(CONVERSATIONS[2])
        assert "it is paris" not in past and "<|im_start|>assistant\nParis.<|im_end|>" in past
        quiet = ours.apply_chat_template(CONVERSATIONS[0], enable_thinking=False)
        assert quiet == hf.apply_chat_template(
            CONVERSATIONS[0], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        assert quiet.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_a_system_message_as_each_family_takes_it(family) -> None:
    name, _, ours, hf = family
    if name == "gemma2":
        # Gemma 2's template refuses a system turn: a clear error carrying the template's own message.
        with pytest.raises(LayerlineError, match="System role not supported"):
            ours.apply_chat_template(WITH_SYSTEM)
        with pytest.raises(Exception, match="System role not supported"):
            hf.apply_chat_template(WITH_SYSTEM, tokenize=False)
        with pytest.raises(LayerlineError, match="roles must alternate"):
            ours.apply_chat_template([{"role": "assistant", "content": "x"}])
        return
    text = ours.apply_chat_template(WITH_SYSTEM)
    assert text == hf.apply_chat_template(WITH_SYSTEM, tokenize=False, add_generation_prompt=True)
    assert "You are terse." in text
    if name == "gemma3":
        assert "<start_of_turn>user\nYou are terse.\n\nhello<end_of_turn>" in text  # folded into the first turn


def test_a_reply_ends_where_llama_cpp_ends_it(family) -> None:
    name, path, ours, _ = family
    _, marker, _ = FAMILIES[name]
    marker_id = ours.token_to_id(marker)
    assert marker_id is not None
    ends = ours.eos_token_ids
    assert marker_id in ends
    assert ends[0] == ours.eos_token_id  # the file's EOS first
    eos_text = {"gemma2": "<eos>", "gemma3": "<eos>", "phi3": "<|endoftext|>", "qwen2": "<|im_end|>"}
    assert ours.eos_token_id == ours.token_to_id(eos_text.get(name, "<|endoftext|>"))
    # Nothing else: the chat markers that open a turn do not end one.
    opening = {"<start_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|im_start|>", "<bos>", "<s>"}
    assert not {ours.token_to_id(t) for t in opening} & set(ends)
    # What the model's config takes from the same file (the CLI and the stages stop on it) is the same.
    assert end_of_generation(GGUFFile(path)) == ends


def test_what_a_file_names_as_end_of_turn_counts_too() -> None:
    tokens = ["<unk>", "<s>", "</x>", "a", "b", "<|fim_pad|>"]
    metadata = {
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.eot_token_id": 4,
        "tokenizer.ggml.fim_pad_token_id": 5,
        "tokenizer.ggml.eom_token_id": 99,  # out of the vocabulary: ignored
    }
    assert end_of_generation(metadata) == [2, 4, 5]
    assert end_of_generation({"tokenizer.ggml.tokens": tokens}) == []
    assert end_of_generation({"tokenizer.ggml.tokens": [*tokens, "</s>"], "tokenizer.ggml.eos_token_id": True}) == [6]
