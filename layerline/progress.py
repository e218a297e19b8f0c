"""Progress bars (tqdm, on stderr) for the slow steps a person waits for: loading and converting a stage's layers,
fetching weights from a coordinator. Shown when stderr is a terminal, or always with LAYERLINE_PROGRESS=1 (never
with LAYERLINE_PROGRESS=0)."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def enabled() -> bool:
    forced = os.environ.get("LAYERLINE_PROGRESS")
    if forced is not None:
        return forced not in ("", "0")
    return sys.stderr.isatty()


def bar(total: int, desc: str, unit: str) -> tqdm:
    """A bar for `total` `unit`s (a disabled one, which costs nothing, when progress is not shown)."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled(),
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.2,
        leave=False,
    )
