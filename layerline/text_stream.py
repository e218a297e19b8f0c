"""Generated token ids to streamed text: characters split across tokens are held until complete (the tokenizer's
StreamDecoder), text that might be the start of a stop string is held until it cannot be, and generation ends at a
stop token, a stop string (cut before it) or a length limit. Shared by the client SDK and `layerline run`; knows
nothing of where the tokens come from."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from layerline.tokenizer import StreamDecoder


class TextStream:
    def __init__(
        self, decoder: StreamDecoder | None, stop: Sequence[str] = (), stop_token_ids: Collection[int] = ()
    ) -> None:
        self.decoder = decoder
        self.stop = tuple(s for s in stop if s)
        self.stop_token_ids = set(stop_token_ids)
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # characters that might start a stop string
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.emitted = 0  # how much of it was handed out
        self.finish_reason: str | None = None

    def push(self, token_id: int, at_limit: bool = False) -> str:
        """Take one generated token; return the text it releases. `at_limit`: no more tokens will follow.
        Afterwards `finish_reason` is "stop", "length" or None (generation continues)."""
        finished = "stop" if token_id in self.stop_token_ids else None
        if self.decoder is not None and finished is None:
            self.text += self.decoder.push(token_id)
        if finished is None and at_limit:
            finished = "length"
        if finished and self.decoder is not None:
            self.text += self.decoder.flush()
        cut = self._find_stop()
        if cut is not None:
            self.text, finished = self.text[:cut], "stop"
        upto = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        self.finish_reason = finished
        return delta

    def end(self, reason: str = "length") -> str:
        """No more tokens will come (the stages ended the sequence): flush what is held; returns it."""
        if self.finish_reason:
            return ""
        if self.decoder is not None:
            self.text += self.decoder.flush()
        cut = self._find_stop()
        if cut is not None:
            self.text, reason = self.text[:cut], "stop"
        delta, self.emitted, self.finish_reason = self.text[self.emitted :], len(self.text), reason
        return delta

    def _find_stop(self) -> int | None:
        """Where the earliest stop string starts, searching only where a new one can be."""
        best = None
        for s in self.stop:
            i = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if i >= 0 and (best is None or i < best):
                best = i
        return best
