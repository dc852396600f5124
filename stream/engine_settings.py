"""What a live engine is told (`stream.engine`): the link, the processing, when to stop."""

from __future__ import annotations

from dataclasses import dataclass, field

from tcbf_live.stream.budget import memory_budget_bytes
from tcbf_live.stream.receiver import SubscriberSettings
from tcbf_live.stream.series import ProcessingSettings


@dataclass(frozen=True)
class EngineSettings:
    subscriber: SubscriberSettings = field(default_factory=SubscriberSettings)
    processing: ProcessingSettings = field(default_factory=ProcessingSettings)
    protocol: str = "native"
    idle_timeout_s: float | None = None  # stop after this long without a message
    max_series: int | None = None  # stop after this many series ended normally, with frames
    align_interval_s: float | None = 0.5  # live alignment cadence; None: only at series end
    channel: str | None = None  # DECTRIS stream V2 threshold channel (None: the first)
    # active mode: accept only the series whose id `expect_series` gives (the SIMPLON arm's
    # sequence id); any other series on the socket is counted as foreign and not processed
    armed: bool = False
    memory_budget_bytes: int | None = None  # None: stream.budget.memory_budget_bytes()
    max_open_series: int = 3  # series accumulated at once; beyond, the quietest one ends
    # an open series that received nothing for this long while another one did ends
    # (incomplete); None: the idle timeout, else 30 s
    stale_series_s: float | None = None
    # DECTRIS V1: image messages of a calibrated series read, decompressed and folded by the
    # compiled lane (`stream.fast_lane`); False: every message through the Python decoder
    compiled_lane: bool = True

    def budget_bytes(self) -> int:
        """The memory budget the series of this engine share (stream.budget)."""
        return memory_budget_bytes(self.memory_budget_bytes or self.processing.memory_budget_bytes)


STALE_DEFAULT_S = 30.0
