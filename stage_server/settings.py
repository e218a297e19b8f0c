"""The stage's tunable settings in one table: each one's `layerline stage` flag, its `StageConfig` field, its
default and what it means. `StageConfig` takes its defaults from here and the command line builds its flags and
their help (with the default) from here, so a default is written once. No torch: the CLI reads this to build
its parser."""

from __future__ import annotations

from dataclasses import dataclass

from layerline.grpc_setup import DEFAULT_MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class Setting:
    flag: str  # e.g. "--session-ttl"
    field: str  # the StageConfig field it sets
    default: object  # the field's default (in the field's unit)
    help: str  # what it means; the CLI appends the default
    kind: str = "int"  # how the flag's text is read: int, positive, float, bytes, text, switch
    shown: str = ""  # the default as the help states it, where the value alone says too little
    scale: float = 1.0  # flag value = field value x scale (e.g. milliseconds on the flag, seconds in the field)

    @property
    def flag_default(self) -> object:
        return self.default * self.scale if self.scale != 1.0 else self.default  # type: ignore[operator]

    def help_text(self) -> str:
        if self.kind == "switch":
            return self.help
        if self.shown:
            return f"{self.help} (default {self.shown})"
        value = self.flag_default
        if isinstance(value, float):
            value = f"{value:g}"
        if self.kind == "bytes" and isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
            value = f"{value >> 20}MiB"
        return f"{self.help} (default {value})"


SETTINGS: tuple[Setting, ...] = (
    Setting("--host", "host", "127.0.0.1", "address to bind", "text", shown="127.0.0.1; 0.0.0.0 for all"),
    Setting("--port", "port", 0, "port to listen on", shown="0: any free port"),
    Setting("--advertise", "advertise", "", "host:port other machines use to reach this stage", "text", "--host:port"),
    Setting("--next", "next_address", "", "host:port of the next stage (sessions may name another)", "text", "none"),
    Setting(
        "--device",
        "device",
        "cpu",
        "where this stage computes: auto (a CUDA GPU, else MPS, else the CPU), cpu, cuda, cuda:N or mps; off the "
        "CPU, weights are held in the device's float dtype unless --dtype says otherwise",
        "text",
    ),
    Setting(
        "--kv-cache-bytes",
        "kv_cache_bytes",
        0,
        "KV cache budget for all sessions, e.g. 2GiB",
        "bytes",
        shown="1/4 of --max-memory, else 1/4 of the memory available, at most 8GiB",
    ),
    Setting(
        "--kv-block-size",
        "kv_block_size",
        16,
        "positions per KV cache block: a session takes blocks as it grows and gives them back as it ends (0: each "
        "session reserves its whole max_length when it opens)",
    ),
    Setting(
        "--kv-wait-ms",
        "kv_wait_s",
        2.0,
        "a step that needs a KV block while none is free waits this long for one, then fails with RESOURCE_EXHAUSTED",
        "float",
        scale=1e3,
    ),
    Setting(
        "--share-prefixes",
        "share_prefixes",
        False,
        "share cached prompt prefixes between client keys (by default a client reuses only the prefixes its own "
        "sessions computed: a shared prefix answers faster, which tells one client what another asked)",
        "switch",
    ),
    Setting("--session-ttl", "session_ttl", 600.0, "seconds an unused session lives", "float"),
    Setting("--max-message-bytes", "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES, "largest gRPC message", "bytes"),
    Setting("--threads", "threads", 0, "torch threads for compute", shown="torch's choice"),
    Setting(
        "--max-batch",
        "max_batch",
        16,
        "decode steps of different sessions run as one forward pass, up to this many (1: never)",
        "positive",
    ),
    Setting(
        "--max-queued-steps",
        "max_queued_steps",
        64,
        "steps queued for compute at most; senders wait beyond that",
        "positive",
    ),
    Setting(
        "--loop-ahead",
        "loop_ahead",
        32,
        "a generation loop pauses while its reader is this many tokens behind",
        "positive",
    ),
    Setting(
        "--inline-below-ms",
        "inline_compute_s",
        0.001,
        "an idle stage computes decode steps that take less than this on its event loop, saving two thread "
        "hand-offs (0: always on the compute thread)",
        "float",
        scale=1e3,
    ),
    Setting(
        "--pack-weights",
        "pack_weights",
        False,
        "keep a second copy of the weights packed for oneDNN (float32 on CPU): steps of 4 rows or more (several "
        "sessions batched, micro-batches, prefill) multiply ~1.5x faster, for twice the weight memory",
        "switch",
    ),
    Setting("--max-sessions", "max_sessions", 1024, "sessions open on this stage at most", "positive"),
    Setting(
        "--max-sessions-per-client",
        "max_sessions_per_client",
        256,
        "sessions one client may hold open on this stage",
        "positive",
    ),
    Setting(
        "--rate-limit",
        "rate_limit",
        "",
        "OpenSession calls one client key may make, e.g. 10/s or 600/min (past it RESOURCE_EXHAUSTED naming the "
        "limit; one key's burst leaves the others' calls untouched)",
        "rate",
        shown="none",
    ),
    Setting(
        "--max-session-tokens",
        "max_session_tokens",
        1 << 20,
        "positions one session may hold, rows x max_length",
        "positive",
    ),
    Setting(
        "--draft",
        "draft",
        "",
        "a draft model for speculative decoding on this host (an embedded model's name, e.g. smollm2, or a path; "
        "the same tokenizer as the model, checked at start): as the first stage, it proposes the tokens of the "
        'generation loops that ask for them (speculate="stage")',
        "text",
        shown="none",
    ),
    Setting(
        "--metrics-port",
        "metrics_port",
        -1,
        "serve Prometheus metrics on http://HOST:PORT/metrics (HOST is --host; 0: any free port; -1: off)",
        shown="off",
    ),
)

DEFAULTS: dict[str, object] = {s.field: s.default for s in SETTINGS}
