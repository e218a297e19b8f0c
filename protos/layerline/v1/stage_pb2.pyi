from layerline.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("received_bytes",)
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    def __init__(self, received_bytes: _Optional[int] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("model_name", "model_fingerprint", "start_layer", "end_layer", "num_layers", "hidden_size", "vocab_size", "dtype", "device", "wire_dtype", "next_address", "kv_bytes_total", "kv_bytes_used", "open_sessions", "max_message_bytes", "kv_bytes_per_token", "version", "max_length", "compute_seconds", "steps_computed", "batched_steps", "queued_steps", "peak_queued_steps", "max_queued_steps", "peak_queued_results", "max_loop_ahead", "tokens_computed", "tokens_sampled", "inline_steps", "weight_bytes", "weights", "resident_bytes", "device_name", "device_memory_used", "device_memory_total", "kv_block_size", "kv_blocks_total", "kv_blocks_used", "kv_blocks_cached", "prefix_hit_tokens", "prefixes_shared", "tokens_drafted", "tokens_accepted", "draft_model", "tokens_proposed")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    BATCHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_STEPS_FIELD_NUMBER: _ClassVar[int]
    PEAK_QUEUED_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_STEPS_FIELD_NUMBER: _ClassVar[int]
    PEAK_QUEUED_RESULTS_FIELD_NUMBER: _ClassVar[int]
    MAX_LOOP_AHEAD_FIELD_NUMBER: _ClassVar[int]
    TOKENS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    INLINE_STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIXES_SHARED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DRAFTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_fingerprint: str
    start_layer: int
    end_layer: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    device: str
    wire_dtype: _tensor_pb2.DType
    next_address: str
    kv_bytes_total: int
    kv_bytes_used: int
    open_sessions: int
    max_message_bytes: int
    kv_bytes_per_token: int
    version: str
    max_length: int
    compute_seconds: float
    steps_computed: int
    batched_steps: int
    queued_steps: int
    peak_queued_steps: int
    max_queued_steps: int
    peak_queued_results: int
    max_loop_ahead: int
    tokens_computed: int
    tokens_sampled: int
    inline_steps: int
    weight_bytes: int
    weights: str
    resident_bytes: int
    device_name: str
    device_memory_used: int
    device_memory_total: int
    kv_block_size: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    prefix_hit_tokens: int
    prefixes_shared: bool
    tokens_drafted: int
    tokens_accepted: int
    draft_model: str
    tokens_proposed: int
    def __init__(self, model_name: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., wire_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., next_address: _Optional[str] = ..., kv_bytes_total: _Optional[int] = ..., kv_bytes_used: _Optional[int] = ..., open_sessions: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ..., version: _Optional[str] = ..., max_length: _Optional[int] = ..., compute_seconds: _Optional[float] = ..., steps_computed: _Optional[int] = ..., batched_steps: _Optional[int] = ..., queued_steps: _Optional[int] = ..., peak_queued_steps: _Optional[int] = ..., max_queued_steps: _Optional[int] = ..., peak_queued_results: _Optional[int] = ..., max_loop_ahead: _Optional[int] = ..., tokens_computed: _Optional[int] = ..., tokens_sampled: _Optional[int] = ..., inline_steps: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., weights: _Optional[str] = ..., resident_bytes: _Optional[int] = ..., device_name: _Optional[str] = ..., device_memory_used: _Optional[int] = ..., device_memory_total: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_cached: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., prefixes_shared: _Optional[bool] = ..., tokens_drafted: _Optional[int] = ..., tokens_accepted: _Optional[int] = ..., draft_model: _Optional[str] = ..., tokens_proposed: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "draws", "logprobs", "top_logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DRAWS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int
    draws: int
    logprobs: bool
    top_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., draws: _Optional[int] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("max_length", "rows", "next_address", "next_session_id", "wire_dtype", "client_key", "start_layer", "end_layer")
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NEXT_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    max_length: int
    rows: int
    next_address: str
    next_session_id: str
    wire_dtype: _tensor_pb2.DType
    client_key: str
    start_layer: int
    end_layer: int
    def __init__(self, max_length: _Optional[int] = ..., rows: _Optional[int] = ..., next_address: _Optional[str] = ..., next_session_id: _Optional[str] = ..., wire_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., client_key: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "kv_bytes", "ttl_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    kv_bytes: int
    ttl_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., kv_bytes: _Optional[int] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id", "client_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    client_key: str
    def __init__(self, session_id: _Optional[str] = ..., client_key: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("session_id", "seq", "positions", "tokens", "hidden", "rows", "sample", "sampling", "truncate", "loop", "looped", "targets", "burst", "client_key", "drafts", "top_logprobs", "propose")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    LOOPED_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROPOSE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    positions: _tensor_pb2.Tensor
    tokens: _tensor_pb2.Tensor
    hidden: _tensor_pb2.Tensor
    rows: _containers.RepeatedScalarFieldContainer[int]
    sample: bool
    sampling: SamplingParams
    truncate: int
    loop: Loop
    looped: bool
    targets: _tensor_pb2.Tensor
    burst: int
    client_key: str
    drafts: int
    top_logprobs: int
    propose: int
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., positions: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., tokens: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., rows: _Optional[_Iterable[int]] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., truncate: _Optional[int] = ..., loop: _Optional[_Union[Loop, _Mapping]] = ..., looped: _Optional[bool] = ..., targets: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., burst: _Optional[int] = ..., client_key: _Optional[str] = ..., drafts: _Optional[int] = ..., top_logprobs: _Optional[int] = ..., propose: _Optional[int] = ...) -> None: ...

class Loop(_message.Message):
    __slots__ = ("address", "session_id", "max_new_tokens", "stop_token_ids", "speculate", "speculate_k")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_K_FIELD_NUMBER: _ClassVar[int]
    address: str
    session_id: str
    max_new_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    speculate: str
    speculate_k: int
    def __init__(self, address: _Optional[str] = ..., session_id: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., speculate: _Optional[str] = ..., speculate_k: _Optional[int] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("session_id", "seq", "code", "message", "stage", "client_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    code: int
    message: str
    stage: str
    client_key: str
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., stage: _Optional[str] = ..., client_key: _Optional[str] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("session_id", "client_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    client_key: str
    def __init__(self, session_id: _Optional[str] = ..., client_key: _Optional[str] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("seq", "token_ids", "rows", "done", "lengths", "code", "message", "stage", "logprobs", "drafted", "token_logprobs", "top_ids", "top_logprobs")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    rows: _containers.RepeatedScalarFieldContainer[int]
    done: bool
    lengths: _containers.RepeatedScalarFieldContainer[int]
    code: int
    message: str
    stage: str
    logprobs: _tensor_pb2.Tensor
    drafted: int
    token_logprobs: _tensor_pb2.Tensor
    top_ids: _tensor_pb2.Tensor
    top_logprobs: _tensor_pb2.Tensor
    def __init__(self, seq: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., rows: _Optional[_Iterable[int]] = ..., done: _Optional[bool] = ..., lengths: _Optional[_Iterable[int]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., stage: _Optional[str] = ..., logprobs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., drafted: _Optional[int] = ..., token_logprobs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., top_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., top_logprobs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PrefixRequest(_message.Message):
    __slots__ = ("session_id", "client_key", "tokens", "rows")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    client_key: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., client_key: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., rows: _Optional[_Iterable[int]] = ...) -> None: ...

class PrefixResponse(_message.Message):
    __slots__ = ("positions",)
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    positions: int
    def __init__(self, positions: _Optional[int] = ...) -> None: ...

class HaltRequest(_message.Message):
    __slots__ = ("session_id", "client_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    client_key: str
    def __init__(self, session_id: _Optional[str] = ..., client_key: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("wait_seconds",)
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    wait_seconds: float
    def __init__(self, wait_seconds: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("open_sessions", "stage")
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    open_sessions: int
    stage: str
    def __init__(self, open_sessions: _Optional[int] = ..., stage: _Optional[str] = ...) -> None: ...

class HaltResponse(_message.Message):
    __slots__ = ("running",)
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    running: bool
    def __init__(self, running: _Optional[bool] = ...) -> None: ...

class TokenizerRequest(_message.Message):
    __slots__ = ("zlib",)
    ZLIB_FIELD_NUMBER: _ClassVar[int]
    zlib: bool
    def __init__(self, zlib: _Optional[bool] = ...) -> None: ...

class TokenizerResponse(_message.Message):
    __slots__ = ("tokenizer_json", "tokenizer_json_zlib")
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_ZLIB_FIELD_NUMBER: _ClassVar[int]
    tokenizer_json: str
    tokenizer_json_zlib: bytes
    def __init__(self, tokenizer_json: _Optional[str] = ..., tokenizer_json_zlib: _Optional[bytes] = ...) -> None: ...
