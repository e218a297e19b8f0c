"""What a chain's first stage sees of the traffic through it, on its own clock: each server-loop round of a session
(the time from one token's step coming back from the last stage to the next one's) and each prompt (from its first
chunk arriving to the first token's step coming back). The coordinator turns the counters into the measured decode
and prefill tokens/s it shows next to its plan's prediction. Event loop only (steps are noted as they are admitted).
"""

from __future__ import annotations

from dataclasses import dataclass

from layerline.v1 import coordinator_pb2, stage_pb2


@dataclass
class Track:
    """One session's pace at the first stage."""

    round_at: float | None = None  # when its last looped step arrived
    prompt_at: float | None = None  # when the first chunk of its prompt under way arrived ...
    prompt_tokens: int = 0  # ... the prompt's tokens so far ...
    prompt_loops: bool = False  # ... and whether its last chunk started a server loop (whose first step closes it)


@dataclass
class Pace:
    decode_rounds: int = 0
    decode_seconds: float = 0.0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0

    def note(self, t: Track, step: stage_pb2.Step, tokens: int, now: float) -> None:
        """A step of the session whose track is `t` arrived at the first stage at `now` (`tokens`: the token
        positions it carries)."""
        if step.looped:
            if t.prompt_at is not None:
                if t.prompt_loops:
                    self.prefill_tokens += t.prompt_tokens
                    self.prefill_seconds += now - t.prompt_at
                t.prompt_at = None
            elif t.round_at is not None and not step.drafts:  # a speculative round is not one token
                self.decode_rounds += 1
                self.decode_seconds += now - t.round_at
            t.round_at = now
            return
        t.round_at = None
        if t.prompt_at is None or t.prompt_loops:
            t.prompt_at, t.prompt_tokens, t.prompt_loops = now, 0, False
        t.prompt_tokens += tokens
        if step.sample:
            t.prompt_loops = step.HasField("loop")

    def report(self) -> coordinator_pb2.PaceReport:
        return coordinator_pb2.PaceReport(
            decode_rounds=self.decode_rounds,
            decode_seconds=self.decode_seconds,
            prefill_tokens=self.prefill_tokens,
            prefill_seconds=self.prefill_seconds,
        )
