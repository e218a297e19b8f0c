"""What a stage can do, measured on its own device, dtype and threads with the model's real layer shapes.

`measure` builds layers of the model's shapes with random weights in the form the stage will hold them (float of
its dtype, or quantized blocks of the types its checkpoint stores or --quantize makes: `layerline.quant.layout`;
the checkpoint is not needed: time depends on shapes and types, not values), and times, each as the mean over a window of repeated runs after a warm-up (a throughput:
CPU quotas show in it):
- a decode step (batch 1, one token at position `context`) through 2 and through 4 middle layers (1 and 2 for
  layers too big to hold 4 of in a quarter of free memory): the difference is the time per layer, the rest a fixed
  cost per step;
- a prefill chunk of `chunk` tokens through the same layer counts: time per layer per prompt token;
- the last stage's extra work for a decode step (final norm, LM head over the vocabulary, greedy pick).
Nothing is looked up in tables of chip names: what is reported is what was timed here. Free memory is read from
the OS (and the cgroup limit, where there is one) or from the GPU.

`cached_capacity` keeps measurements on disk, keyed by the model (its config fingerprint), device, dtype, torch
weight format and types, threads and the CPU quota of this process's cgroup, so a restart does not measure again
unless asked to.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from layerline.config import ModelConfig
from layerline.devices import DeviceMemory, device_name, synchronize
from layerline.devices import device_memory as gpu_memory
from layerline.errors import LayerlineError
from layerline.model import StageModel, expected_tensors
from layerline.paged_kv import DEFAULT_BLOCK_SIZE, BlockPool
from layerline.quant import WeightFormat
from layerline.quant.layout import layer_types, model_bytes
from layerline.quant.tensor import TYPE_BY_NAME, QTensor, quantizable, random_qtensor

FORMAT = 3  # bump when what is measured changes: older cache entries are then measured again


@dataclass(frozen=True)
class Capacity:
    decode_s_per_layer: float  # one decode step (batch 1) through one layer
    decode_s_fixed: float  # per decode step whatever the layer count (embedding, rotary tables, bookkeeping)
    prefill_s_per_layer_token: float  # one prompt token of a `chunk`-token prefill through one layer
    head_decode_s: float  # last stage: final norm + LM head + greedy pick, per decode step
    context: int  # positions already in the cache when decode was timed
    chunk: int  # prefill chunk size timed
    device: str
    dtype: str  # compute dtype
    threads: int
    cpu_quota: float | None  # cores this process may use by its cgroup (None: no quota)
    measured_at: float  # unix time
    seconds: float  # how long measuring took
    weights: str = "float32"  # the weight format timed (`WeightFormat.name`) ...
    weight_types: str = ""  # ... and the types of its layers' matmul weights, e.g. "Q4_K,Q6_K"

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Capacity | None:
        """None for an entry of another format or a damaged one (it is then measured again)."""
        try:
            data = json.loads(text)
            if data.pop("format", None) != FORMAT:
                return None
            return cls(**data)
        except (ValueError, TypeError):
            return None


def read_capacity(path: str) -> Capacity:
    """Figures a stage reports instead of measuring (`layerline stage --capacity FILE`): a capacity entry as the
    cache holds it, e.g. one measured on a quiet machine. A missing, damaged or outdated file is refused."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise LayerlineError(f"--capacity {path}: {e.strerror or e}") from None
    found = Capacity.from_json(text)
    if found is None:
        raise LayerlineError(
            f"--capacity {path}: not a capacity entry of format {FORMAT} (as the capacity cache holds)"
        )
    if found.decode_s_per_layer <= 0 or found.prefill_s_per_layer_token <= 0 or found.head_decode_s < 0:
        raise LayerlineError(f"--capacity {path}: the per-layer times must be positive")
    return found


def cpu_quota() -> float | None:
    """Cores this process may use according to its cgroup (v1 cpu.cfs_quota_us / v2 cpu.max), None if unlimited."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):  # v1
            base = os.path.join("/sys/fs/cgroup/cpu", path.lstrip("/"))
            try:
                quota = int(open(os.path.join(base, "cpu.cfs_quota_us")).read())
                period = int(open(os.path.join(base, "cpu.cfs_period_us")).read())
            except (OSError, ValueError):
                continue
            return quota / period if quota > 0 else None
        if controllers == "":  # v2
            try:
                quota_s, period_s = open(os.path.join("/sys/fs/cgroup", path.lstrip("/"), "cpu.max")).read().split()
            except (OSError, ValueError):
                continue
            return None if quota_s == "max" else int(quota_s) / int(period_s)
    return None


def device_memory(device: str = "cpu") -> DeviceMemory:
    """The device's name and memory: on a GPU its own figures (`layerline.devices.device_memory`); on the CPU
    this process's resident bytes of the host's memory (within the cgroup limit) and what is available."""
    if torch.device(device).type != "cpu":
        return gpu_memory(device)
    free, total = _host_memory()
    return DeviceMemory(device_name("cpu"), resident_bytes(), total, free)


def free_memory(device: str = "cpu") -> tuple[int, int]:
    """(free, total) bytes: the GPU's for a CUDA device (MPS: of its recommended working set), else available host
    memory, within the cgroup limit."""
    if torch.device(device).type != "cpu":
        m = gpu_memory(device)
        return m.free, m.total
    return _host_memory()


def _host_memory() -> tuple[int, int]:
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    total = info.get("MemTotal", 0)
    free = info.get("MemAvailable", info.get("MemFree", 0))
    limit, usage = _cgroup_memory()
    if limit is not None:
        total = min(total, limit) if total else limit
        free = min(free, max(0, limit - (usage or 0)))
    return free, total


def resident_bytes() -> int:
    """This process's resident memory now (Linux; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _cgroup_memory() -> tuple[int | None, int | None]:
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ):
        try:
            raw = open(limit_file).read().strip()
            usage = int(open(usage_file).read())
        except (OSError, ValueError):
            continue
        if raw == "max" or int(raw) >= 1 << 60:  # no limit
            return None, usage
        return int(raw), usage
    return None, None


def _random_stage(
    config: ModelConfig, start: int, end: int, dtype: torch.dtype, device: str, types: dict[str, str] | None = None
) -> StageModel:
    """Random weights of the stage's shapes; with `types` (`layout.layer_types`), matmul weights as random blocks
    of those types."""
    g = torch.Generator().manual_seed(start * 1000 + end)
    tensors: dict[str, torch.Tensor | QTensor] = {}
    for name, shape in expected_tensors(config, start, end).items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape) if name.endswith("norm.weight") else torch.zeros(shape)
        elif types is not None and quantizable(name, shape):
            role = "embed" if name == "model.embed_tokens.weight" else "head" if name == "lm_head.weight" else None
            kind = types[role] if role else types[name.split(".", 3)[3]]
            tensors[name] = random_qtensor(TYPE_BY_NAME[kind], shape, g)
        else:
            tensors[name] = torch.randn(shape, generator=g) * (1.0 / shape[-1] ** 0.5)
    return StageModel(config, start, end, tensors, dtype=dtype, device=device)


def _mean_time(fn: Callable[[], object], min_time: float, min_runs: int, sync: Callable[[], None]) -> float:
    """Seconds per call over a window of at least `min_time`: a throughput, so that a CPU quota (which lets a
    process run full speed for part of each 100 ms period and then stops it) shows in the figure as it will in
    serving, where a median of single calls would hide it."""
    fn()  # warm-up
    sync()
    runs = 0
    began = time.perf_counter()
    while runs < min_runs or time.perf_counter() - began < min_time:
        fn()
        sync()
        runs += 1
    return (time.perf_counter() - began) / runs


def measure(
    config: ModelConfig,
    dtype: torch.dtype | WeightFormat = torch.float32,
    device: str = "cpu",
    *,
    stored: dict[str, str] | None = None,
    context: int = 128,
    chunk: int = 128,
    min_time: float = 1.0,
    timer: Callable[[Callable[[], object], float, int, Callable[[], None]], float] | None = None,
    kv_block_size: int = DEFAULT_BLOCK_SIZE,
) -> Capacity:
    """Time the model's layer shapes here (see the module docstring) in the weight format given (a dtype: float
    weights of it); `stored`: the checkpoint's own tensor types (`stored_types()`). Takes memory for up to 4
    layers and one LM head while it runs. `timer(fn, min_time, min_runs, sync)` gives the seconds one call of
    `fn` takes (default: timed on this machine, `_mean_time`); tests give a cost model instead. Decode steps read
    the KV cache through a block table of `kv_block_size` positions per block, as a paged stage does (0: a
    contiguous cache)."""
    timer = timer or _mean_time
    fmt = dtype if isinstance(dtype, WeightFormat) else WeightFormat("float", dtype)
    dtype = fmt.dtype
    quantized = fmt.quantizes or (fmt.kind == "stored" and stored is not None)
    types = layer_types(config, fmt, stored) if quantized else None
    began = time.perf_counter()
    sync = (lambda: synchronize(device)) if torch.device(device).type != "cpu" else (lambda: None)
    L = config.num_layers
    context = min(context, config.max_position_embeddings // 2)
    chunk = min(chunk, config.max_position_embeddings // 4)
    h = config.hidden_size

    def middle(k: int) -> StageModel:  # k layers that are neither first nor last when the model allows
        start = 1 if L >= k + 2 else 0
        return _random_stage(config, start, start + k, dtype, device, types)

    def decode_time(stage: StageModel) -> float:
        cache = stage.new_cache(1, context + 1)
        if kv_block_size:  # as the stage serves: through a block table
            c = stage.config
            blocks = -(-(context + 1) // kv_block_size) + 1  # and the null block
            pool = BlockPool(stage.num_layers, c.num_kv_heads, c.head_dim, blocks, kv_block_size, stage.dtype, device)
            cache = pool.new_cache(1, context + 1)
        x = torch.randn(1, context, h, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
        if stage.is_first:
            x = torch.randint(0, config.vocab_size, (1, context), device=device)
        stage(x, cache=cache)
        one = x[:, :1]
        pos = torch.tensor([[context]], device=device)

        def step() -> None:
            cache.truncate(0, context)
            stage(one, pos, cache, last_only=True)

        return timer(step, min_time, 10, sync)

    def prefill_time(stage: StageModel) -> float:
        cache = stage.new_cache(1, chunk)
        x = torch.randn(1, chunk, h, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
        if stage.is_first:
            x = torch.randint(0, config.vocab_size, (1, chunk), device=device)

        def run() -> None:
            cache.truncate(0, 0)
            stage(x, cache=cache, last_only=True)

        return timer(run, min_time, 3, sync)

    # Two layer counts, both past what a CPU cache holds when the model allows (one layer of a small model stays in
    # cache when run again and again, and would look faster than layers streamed from memory in serving): the
    # difference is the time per layer. Big layers: 1 and 2, to keep the memory this takes small.
    layer_bytes = max(model_bytes(config, fmt, stored)[0], default=0)
    small, big = (2, 4) if 4 * layer_bytes <= free_memory(device)[0] // 4 and L >= 4 else (1, 2)
    a, b = middle(small), middle(big)
    da, db = decode_time(a), decode_time(b)
    pa, pb = prefill_time(a), prefill_time(b)
    per_layer = max((db - da) / (big - small), 1e-9)
    del b
    last = _random_stage(config, L - small, L, dtype, device, types)
    head = max(decode_time(last) - da, 0.0)
    return Capacity(
        decode_s_per_layer=per_layer,
        decode_s_fixed=max(da - small * per_layer, 0.0),
        prefill_s_per_layer_token=max(pb - pa, 1e-12) / (big - small) / chunk,
        head_decode_s=head,
        context=context,
        chunk=chunk,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        cpu_quota=cpu_quota(),
        measured_at=time.time(),
        seconds=time.perf_counter() - began,
        weights=fmt.name,
        weight_types=",".join(sorted({t for n, t in (types or {}).items() if n.endswith("proj.weight")})),
    )


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "layerline", "capacity")


def cache_key(
    fingerprint: str, device: str, weights: str, threads: int, quota: float | None, stored: dict | None = None
) -> str:
    types = sorted(set((stored or {}).values()))
    text = json.dumps([FORMAT, fingerprint, device, weights, types, threads, quota, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_capacity(
    config: ModelConfig,
    fingerprint: str,
    dtype: torch.dtype | WeightFormat = torch.float32,
    device: str = "cpu",
    *,
    stored: dict[str, str] | None = None,
    cache_dir: str | None = None,
    remeasure: bool = False,
    **measure_options: object,
) -> tuple[Capacity, bool]:
    """The stage's capacity and whether it came from the on-disk cache (False: measured now, and stored)."""
    folder = cache_dir or default_cache_dir()
    fmt = dtype if isinstance(dtype, WeightFormat) else WeightFormat("float", dtype)
    block = measure_options.get("kv_block_size", DEFAULT_BLOCK_SIZE)
    key = cache_key(
        fingerprint, device, f"{fmt.name}, kv blocks of {block}", torch.get_num_threads(), cpu_quota(), stored
    )
    path = os.path.join(folder, f"{key}.json")
    if not remeasure:
        try:
            with open(path) as f:
                found = Capacity.from_json(f.read())
            if found is not None:
                return found, True
        except OSError:
            pass
    capacity = measure(config, fmt, device, stored=stored, **measure_options)  # type: ignore[arg-type]
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # unique across hosts sharing the folder
        with open(tmp, "w") as f:
            f.write(capacity.to_json())
        os.replace(tmp, path)  # atomic: a reader never sees half an entry
    except OSError:
        pass  # a read-only home: measure again next time
    return capacity, False
