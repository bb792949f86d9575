"""Progress of a streaming merge: a bar over the tensor groups with the time left, and the end summary.

The engine calls `on_chunk(group, n_layers)` after each chunk of a group (same-role, same-shape leaves
stacked); the bar counts tensors, so its time estimate weights a 32-layer group 32 times a single leaf,
and its label names the group being merged. `--quiet` silences the bar and the summary (errors still go
to stderr).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Mapping, TextIO

from tqdm import tqdm

# What each path of the engine means, for the summary.
PATH_LABELS = {
    "matrix": "merged as weight matrices (DRM / the method's matrix rule)",
    "other": "merged on the other path (biases, norms, embeddings, N-D)",
    "ignore": "kept at the base value (ignore patterns)",
    "not_floating": "copied from the base (not floating point)",
}


def peak_memory_bytes() -> int:
    """Peak resident set size of this process so far, from the operating system (`getrusage`)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def format_summary(counts: Mapping[str, int], seconds: float, peak_bytes: int, output: str | None = None) -> str:
    """The end-of-merge summary: tensors per path, wall time, peak memory (several lines)."""
    total = sum(counts.values())
    lines = [f"merged {total} tensors" + (f" into {output}" if output else "")]
    for path, label in PATH_LABELS.items():
        if counts.get(path):
            lines.append(f"  {counts[path]:6d} {path:<6s} {label}")
    lines.append(f"  time {seconds:.1f} s, peak memory {format_bytes(peak_bytes)}")
    return "\n".join(lines)


class MergeProgress:
    """tqdm bar over the merged tensors, advanced group chunk by group chunk.

    Args:
      total: number of tensors that go through a merge path (linear + other).
      quiet: no bar and no summary.
      stream: where the bar and summary go (default stderr for the bar, stdout for the summary).
    """

    def __init__(self, total: int, quiet: bool = False, stream: TextIO | None = None):
        self.quiet = quiet
        self.start = time.perf_counter()
        self.groups_done = 0
        self._bar = None
        if not quiet:
            self._bar = tqdm(total=total, unit="tensor", desc="merging", file=stream or sys.stderr,
                             dynamic_ncols=True, leave=True, mininterval=0.2)

    def on_chunk(self, group, n_layers: int) -> None:
        """Engine callback after each chunk: `group` has `.role` and `.shape`."""
        self.groups_done += 1
        if self._bar is not None:
            shape = "x".join(map(str, group.shape))
            self._bar.set_postfix_str(f"{group.role} {shape}", refresh=False)
            self._bar.update(n_layers)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self, counts: Mapping[str, int], output: str | None = None, stream: TextIO | None = None) -> str:
        """Close the bar and print the summary (unless quiet); returns the summary text."""
        self.close()
        text = format_summary(counts, self.elapsed(), peak_memory_bytes(), output)
        if not self.quiet:
            print(text, file=stream or sys.stdout, flush=True)
        return text

    def __enter__(self) -> "MergeProgress":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None and self._bar is not None:
            self._bar.leave = False  # erase the bar: the error is then the one line left on the terminal
        self.close()


__all__ = ["MergeProgress", "peak_memory_bytes"]
