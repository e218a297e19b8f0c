from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StageReport(_message.Message):
    __slots__ = ("address", "model_fingerprint", "device", "dtype", "threads", "decode_s_per_layer", "decode_s_fixed", "prefill_s_per_layer_token", "head_decode_s", "memory_bytes", "kv_bytes", "bytes_per_param", "serving_start", "serving_end", "version", "weights", "device_name", "kv_block_size", "kv_bytes_per_layer_position", "wire_bytes")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIXED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_PER_LAYER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEAD_DECODE_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_PARAM_FIELD_NUMBER: _ClassVar[int]
    SERVING_START_FIELD_NUMBER: _ClassVar[int]
    SERVING_END_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_LAYER_POSITION_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    address: str
    model_fingerprint: str
    device: str
    dtype: str
    threads: int
    decode_s_per_layer: float
    decode_s_fixed: float
    prefill_s_per_layer_token: float
    head_decode_s: float
    memory_bytes: int
    kv_bytes: int
    bytes_per_param: float
    serving_start: int
    serving_end: int
    version: str
    weights: str
    device_name: str
    kv_block_size: int
    kv_bytes_per_layer_position: int
    wire_bytes: int
    def __init__(self, address: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., threads: _Optional[int] = ..., decode_s_per_layer: _Optional[float] = ..., decode_s_fixed: _Optional[float] = ..., prefill_s_per_layer_token: _Optional[float] = ..., head_decode_s: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., bytes_per_param: _Optional[float] = ..., serving_start: _Optional[int] = ..., serving_end: _Optional[int] = ..., version: _Optional[str] = ..., weights: _Optional[str] = ..., device_name: _Optional[str] = ..., kv_block_size: _Optional[int] = ..., kv_bytes_per_layer_position: _Optional[int] = ..., wire_bytes: _Optional[int] = ...) -> None: ...

class LinkReport(_message.Message):
    __slots__ = ("address", "rtt_s", "bytes_per_s", "probes")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RTT_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    address: str
    rtt_s: float
    bytes_per_s: float
    probes: int
    def __init__(self, address: _Optional[str] = ..., rtt_s: _Optional[float] = ..., bytes_per_s: _Optional[float] = ..., probes: _Optional[int] = ...) -> None: ...

class PaceReport(_message.Message):
    __slots__ = ("decode_rounds", "decode_seconds", "prefill_tokens", "prefill_seconds")
    DECODE_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    decode_rounds: int
    decode_seconds: float
    prefill_tokens: int
    prefill_seconds: float
    def __init__(self, decode_rounds: _Optional[int] = ..., decode_seconds: _Optional[float] = ..., prefill_tokens: _Optional[int] = ..., prefill_seconds: _Optional[float] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("plan_version", "start_layer", "end_layer")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    start_layer: int
    end_layer: int
    def __init__(self, plan_version: _Optional[int] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("stage",)
    STAGE_FIELD_NUMBER: _ClassVar[int]
    stage: StageReport
    def __init__(self, stage: _Optional[_Union[StageReport, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("stage_id", "assignment", "heartbeat_seconds")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    assignment: Assignment
    heartbeat_seconds: float
    def __init__(self, stage_id: _Optional[str] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., heartbeat_seconds: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("stage_id", "serving_start", "serving_end", "ready", "open_sessions", "kv_bytes_used", "decode_steps", "decode_seconds", "weight_bytes", "resident_bytes", "device_memory_used", "device_memory_total", "kv_blocks_total", "kv_blocks_used", "kv_blocks_cached", "links", "pace")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVING_START_FIELD_NUMBER: _ClassVar[int]
    SERVING_END_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    PACE_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    serving_start: int
    serving_end: int
    ready: bool
    open_sessions: int
    kv_bytes_used: int
    decode_steps: int
    decode_seconds: float
    weight_bytes: int
    resident_bytes: int
    device_memory_used: int
    device_memory_total: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    links: _containers.RepeatedCompositeFieldContainer[LinkReport]
    pace: PaceReport
    def __init__(self, stage_id: _Optional[str] = ..., serving_start: _Optional[int] = ..., serving_end: _Optional[int] = ..., ready: _Optional[bool] = ..., open_sessions: _Optional[int] = ..., kv_bytes_used: _Optional[int] = ..., decode_steps: _Optional[int] = ..., decode_seconds: _Optional[float] = ..., weight_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., device_memory_used: _Optional[int] = ..., device_memory_total: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_cached: _Optional[int] = ..., links: _Optional[_Iterable[_Union[LinkReport, _Mapping]]] = ..., pace: _Optional[_Union[PaceReport, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("assignment", "peers")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    peers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., peers: _Optional[_Iterable[str]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("stage_id",)
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    def __init__(self, stage_id: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("exclude",)
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    exclude: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, exclude: _Optional[_Iterable[str]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("addresses", "plan_version", "boundaries")
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    BOUNDARIES_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    plan_version: int
    boundaries: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, addresses: _Optional[_Iterable[str]] = ..., plan_version: _Optional[int] = ..., boundaries: _Optional[_Iterable[int]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("stage_id", "report", "assignment", "serving_start", "serving_end", "ready", "open_sessions", "kv_bytes_used", "seconds_since_heartbeat", "predicted_decode_s", "replica", "load_factor", "weight_bytes", "resident_bytes", "device_memory_used", "device_memory_total", "kv_blocks_total", "kv_blocks_used", "kv_blocks_cached", "links")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    SERVING_START_FIELD_NUMBER: _ClassVar[int]
    SERVING_END_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_DECODE_S_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    LOAD_FACTOR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    report: StageReport
    assignment: Assignment
    serving_start: int
    serving_end: int
    ready: bool
    open_sessions: int
    kv_bytes_used: int
    seconds_since_heartbeat: float
    predicted_decode_s: float
    replica: bool
    load_factor: float
    weight_bytes: int
    resident_bytes: int
    device_memory_used: int
    device_memory_total: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    links: _containers.RepeatedCompositeFieldContainer[LinkReport]
    def __init__(self, stage_id: _Optional[str] = ..., report: _Optional[_Union[StageReport, _Mapping]] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., serving_start: _Optional[int] = ..., serving_end: _Optional[int] = ..., ready: _Optional[bool] = ..., open_sessions: _Optional[int] = ..., kv_bytes_used: _Optional[int] = ..., seconds_since_heartbeat: _Optional[float] = ..., predicted_decode_s: _Optional[float] = ..., replica: _Optional[bool] = ..., load_factor: _Optional[float] = ..., weight_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., device_memory_used: _Optional[int] = ..., device_memory_total: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_cached: _Optional[int] = ..., links: _Optional[_Iterable[_Union[LinkReport, _Mapping]]] = ...) -> None: ...

class PlanFigures(_message.Message):
    __slots__ = ("label", "addresses", "boundaries", "decode_tokens_per_s", "prefill_tokens_per_s", "bottleneck_s", "note")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    BOUNDARIES_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    BOTTLENECK_S_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    label: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    boundaries: _containers.RepeatedScalarFieldContainer[int]
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    bottleneck_s: float
    note: str
    def __init__(self, label: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., boundaries: _Optional[_Iterable[int]] = ..., decode_tokens_per_s: _Optional[float] = ..., prefill_tokens_per_s: _Optional[float] = ..., bottleneck_s: _Optional[float] = ..., note: _Optional[str] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("model_name", "num_layers", "stages", "plan_version", "predicted_bottleneck_s", "predicted_total_s", "route", "problem", "objective", "figures", "measured_decode_tokens_per_s", "measured_prefill_tokens_per_s")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_BOTTLENECK_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    MEASURED_DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    num_layers: int
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    plan_version: int
    predicted_bottleneck_s: float
    predicted_total_s: float
    route: Route
    problem: str
    objective: str
    figures: _containers.RepeatedCompositeFieldContainer[PlanFigures]
    measured_decode_tokens_per_s: float
    measured_prefill_tokens_per_s: float
    def __init__(self, model_name: _Optional[str] = ..., num_layers: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ..., plan_version: _Optional[int] = ..., predicted_bottleneck_s: _Optional[float] = ..., predicted_total_s: _Optional[float] = ..., route: _Optional[_Union[Route, _Mapping]] = ..., problem: _Optional[str] = ..., objective: _Optional[str] = ..., figures: _Optional[_Iterable[_Union[PlanFigures, _Mapping]]] = ..., measured_decode_tokens_per_s: _Optional[float] = ..., measured_prefill_tokens_per_s: _Optional[float] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("stage_ids", "addresses", "boundaries", "predicted_bottleneck_s", "predicted_total_s", "explanation", "figures")
    STAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    BOUNDARIES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_BOTTLENECK_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    stage_ids: _containers.RepeatedScalarFieldContainer[str]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    boundaries: _containers.RepeatedScalarFieldContainer[int]
    predicted_bottleneck_s: float
    predicted_total_s: float
    explanation: str
    figures: _containers.RepeatedCompositeFieldContainer[PlanFigures]
    def __init__(self, stage_ids: _Optional[_Iterable[str]] = ..., addresses: _Optional[_Iterable[str]] = ..., boundaries: _Optional[_Iterable[int]] = ..., predicted_bottleneck_s: _Optional[float] = ..., predicted_total_s: _Optional[float] = ..., explanation: _Optional[str] = ..., figures: _Optional[_Iterable[_Union[PlanFigures, _Mapping]]] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "model_fingerprint", "config_json", "tokenizer_json", "num_layers", "stored_types_json", "weights")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STORED_TYPES_JSON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_fingerprint: str
    config_json: str
    tokenizer_json: str
    num_layers: int
    stored_types_json: str
    weights: str
    def __init__(self, name: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., config_json: _Optional[str] = ..., tokenizer_json: _Optional[str] = ..., num_layers: _Optional[int] = ..., stored_types_json: _Optional[str] = ..., weights: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("model_fingerprint", "names", "dtype", "chunk_bytes")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    names: _containers.RepeatedScalarFieldContainer[str]
    dtype: str
    chunk_bytes: int
    def __init__(self, model_fingerprint: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., dtype: _Optional[str] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "total_bytes", "offset", "data", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    offset: int
    data: bytes
    sha256: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...
