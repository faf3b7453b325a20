"""A count-min sketch of recent access frequency (TinyLFU's "doorkeeper-less" form, as Caffeine uses it).

Four rows of small saturating counters (max 15); the estimate is the minimum over rows. After `sample`
additions every counter is halved, so the sketch follows a changing workload (frequency of the recent past,
not of all time). The width grows (and the counts restart) when the tracked population outgrows it."""

from __future__ import annotations

from collections.abc import Hashable

_SEEDS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
_MASK64 = (1 << 64) - 1
_MAX = 15


class CountMinSketch:
    __slots__ = ("_rows", "_mask", "_additions", "sample")

    def __init__(self, width: int = 1024) -> None:
        self.resize(width)

    def resize(self, width: int) -> None:
        width = 1 << max(4, (width - 1).bit_length())
        self._rows = [[0] * width for _ in _SEEDS]
        self._mask = width - 1
        self._additions = 0
        self.sample = 10 * width

    @property
    def width(self) -> int:
        return self._mask + 1

    def _slots(self, key: Hashable) -> list[int]:
        h = hash(key) & _MASK64
        return [(((h ^ s) * 0x2545F4914F6CDD1D) & _MASK64) >> 40 & self._mask for s in _SEEDS]

    def add(self, key: Hashable) -> None:
        for row, i in zip(self._rows, self._slots(key), strict=True):
            if row[i] < _MAX:
                row[i] += 1
        self._additions += 1
        if self._additions >= self.sample:
            for row in self._rows:
                for i, v in enumerate(row):
                    row[i] = v >> 1
            self._additions //= 2

    def estimate(self, key: Hashable) -> int:
        return min(row[i] for row, i in zip(self._rows, self._slots(key), strict=True))
