"""One reading of a coordinator's ClusterStatus, for everything that shows it: `layerline status` (a table, or one
block per stage on a narrow terminal) and the dashboard's /api/cluster (the same fields as JSON)."""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass
from typing import Any

from layerline.v1 import coordinator_pb2


@dataclass(frozen=True)
class StageView:
    id: str
    address: str
    device: str
    dtype: str
    device_name: str
    start: int  # the layers it serves now
    end: int
    assigned_start: int  # the layers the plan in force gives it
    assigned_end: int
    replica: bool
    ready: bool
    seen_s_ago: float
    ms_per_layer_decode: float
    load_factor: float
    us_per_layer_token_prefill: float
    memory_bytes: int  # what it offered the model
    weight_bytes: int
    weights: str
    kv_bytes_used: int
    kv_blocks_total: int  # the paged KV cache's blocks (0: not paged)
    kv_blocks_used: int
    kv_blocks_cached: int
    open_sessions: int
    resident_bytes: int
    device_memory_used: int
    device_memory_total: int

    @classmethod
    def of(cls, s: coordinator_pb2.StageStatus) -> StageView:
        r = s.report
        return cls(
            id=s.stage_id,
            address=r.address,
            device=r.device,
            dtype=r.dtype,
            device_name=r.device_name,
            start=s.serving_start,
            end=s.serving_end,
            assigned_start=s.assignment.start_layer,
            assigned_end=s.assignment.end_layer,
            replica=s.replica,
            ready=s.ready,
            seen_s_ago=round(s.seconds_since_heartbeat, 2),
            ms_per_layer_decode=1e3 * r.decode_s_per_layer,
            load_factor=s.load_factor,
            us_per_layer_token_prefill=1e6 * r.prefill_s_per_layer_token,
            memory_bytes=r.memory_bytes,
            weight_bytes=s.weight_bytes,
            weights=r.weights or r.dtype,
            kv_bytes_used=s.kv_bytes_used,
            kv_blocks_total=s.kv_blocks_total,
            kv_blocks_used=s.kv_blocks_used,
            kv_blocks_cached=s.kv_blocks_cached,
            open_sessions=s.open_sessions,
            resident_bytes=s.resident_bytes,
            device_memory_used=s.device_memory_used,
            device_memory_total=s.device_memory_total,
        )

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    # ---- cells, as `layerline status` prints them ----------------------------------------------------------------

    def layers(self) -> str:
        return f"{self.start}:{self.end}" if self.end else "-"

    def assigned(self) -> str:
        text = f"{self.assigned_start}:{self.assigned_end}" if self.assigned_end else "standby"
        return text + (" (replica)" if self.replica else "")

    def load(self) -> str:
        return f"x{self.load_factor:.2f}" if self.load_factor else "-"

    def weight_cell(self) -> str:
        return f"{self.weight_bytes / (1 << 20):.1f} MiB {self.weights}" if self.weight_bytes else "-"

    def memory(self) -> str:
        """What the stage holds on its device of the device's total (a GPU's own memory; the host's for a CPU
        stage); before its first heartbeat, the memory it offered the model."""
        if not self.device_memory_total:
            held = f"{self.resident_bytes / (1 << 20):.0f} MiB of " if self.resident_bytes else ""
            return held + f"{self.memory_bytes / (1 << 30):.2f} GiB"
        return f"{self.device_memory_used / (1 << 20):.0f} MiB of {self.device_memory_total / (1 << 30):.1f} GiB"

    def kv(self) -> str:
        """KV memory held; with the paged cache, blocks in use of the total and those cached for prefixes."""
        held = f"{self.kv_bytes_used / (1 << 20):.1f} MiB"
        if not self.kv_blocks_total:
            return held
        return f"{held} ({self.kv_blocks_used}/{self.kv_blocks_total} blocks, {self.kv_blocks_cached} cached)"

    def health(self) -> str:
        return ("ready" if self.ready else "loading") + f", seen {self.seen_s_ago:.1f}s ago"


COLUMNS = (
    # (heading, cell, right-aligned)
    ("stage", lambda v: v.id[:8], False),
    ("address", lambda v: v.address, False),
    ("device/dtype", lambda v: f"{v.device}/{v.dtype}", False),
    ("layers", StageView.layers, False),
    ("assigned", StageView.assigned, False),
    ("ms/layer decode", lambda v: f"{v.ms_per_layer_decode:.2f}", True),
    ("load", StageView.load, True),
    ("us/layer/token prefill", lambda v: f"{v.us_per_layer_token_prefill:.1f}", True),
    ("weights", StageView.weight_cell, True),
    ("memory", StageView.memory, True),
    ("KV used", StageView.kv, True),
    ("sessions", lambda v: str(v.open_sessions), True),
    ("health", StageView.health, False),
)


def title(status: coordinator_pb2.ClusterStatus) -> str:
    return f"model {status.model_name}: {status.num_layers} layers, plan version {status.plan_version}"


def footer(status: coordinator_pb2.ClusterStatus) -> list[str]:
    """The lines under the stages: their devices, the plan's prediction, the route."""
    lines = []
    named = [
        f"{s.stage_id[:8]} {s.report.device}: {s.report.device_name}" for s in status.stages if s.report.device_name
    ]
    if named:
        lines.append("devices: " + "; ".join(named))
    if status.predicted_bottleneck_s:
        lines.append(
            f"predicted bottleneck {1e3 * status.predicted_bottleneck_s:.2f} ms/token, one token through the chain "
            f"{1e3 * status.predicted_total_s:.2f} ms"
        )
    lines += plan_lines(status)
    links = [f"{s.report.address} -> {link.address} {link_text(link)}" for s in status.stages for link in s.links]
    if links:
        lines.append("links: " + "; ".join(links))
    if status.route.addresses:
        lines.append("route: " + ",".join(status.route.addresses))
    else:
        lines.append("route: none yet" + (f" ({status.problem})" if status.problem else ""))
    return lines


def rate(x: float) -> str:
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def link_text(link: coordinator_pb2.LinkReport) -> str:
    bw = f", {8 * link.bytes_per_s / 1e6:.0f} Mbit/s" if link.bytes_per_s else ""
    return f"{1e3 * link.rtt_s:.2f} ms round trip{bw}"


def figures_text(f: coordinator_pb2.PlanFigures) -> str:
    if not f.addresses:
        return f"{f.label}: {f.note}"
    chain = ", ".join(f"{a} {f.boundaries[i]}:{f.boundaries[i + 1]}" for i, a in enumerate(f.addresses))
    note = f" ({f.note})" if f.note else ""
    return (
        f"{f.label} [{chain}]: predicted decode {rate(f.decode_tokens_per_s)} tokens/s, prefill "
        f"{rate(f.prefill_tokens_per_s)} tokens/s{note}"
    )


def plan_lines(status: coordinator_pb2.ClusterStatus) -> list[str]:
    """The plan in force's predicted figures (and the measured ones, once traffic went through its first stage),
    then the alternatives it was chosen over."""
    if not status.figures:
        return []
    lines = [f"objective {status.objective}: " + figures_text(status.figures[0])]
    measured = [
        f"{what} {rate(x)} tokens/s"
        for what, x in (
            ("decode", status.measured_decode_tokens_per_s),
            ("prefill", status.measured_prefill_tokens_per_s),
        )
        if x
    ]
    if measured:
        lines.append("measured at the first stage: " + ", ".join(measured))
    lines += ["rejected " + figures_text(f) for f in status.figures[1:]]
    return lines


def table_width(views: list[StageView]) -> int:
    """Columns a one-line-per-stage table needs (a space either side of each cell, a rule between cells)."""
    widths = [max([len(h)] + [len(cell(v)) for v in views]) for h, cell, _ in COLUMNS]
    return sum(widths) + 3 * len(widths) + 1


def stage_block(v: StageView, width: int) -> list[str]:
    """One stage as a few lines of at most `width` characters (narrow terminals)."""
    lines = [
        f"{v.id[:8]}  {v.address}  {v.health()}",
        f"layers {v.layers()} (assigned {v.assigned()}), {v.device}/{v.dtype}",
        f"decode {v.ms_per_layer_decode:.2f} ms/layer (load {v.load()}), prefill "
        f"{v.us_per_layer_token_prefill:.1f} us/layer/token",
        f"weights {v.weight_cell()}, memory {v.memory()}, KV {v.kv()}, sessions {v.open_sessions}",
    ]
    out = []
    for i, line in enumerate(lines):
        indent = "" if i == 0 else "  "
        out += textwrap.wrap(line, width, initial_indent=indent, subsequent_indent="    ") or [indent]
    return out


def wrap(line: str, width: int) -> list[str]:
    return textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False) or [""]
