"""Helpers shared by the benchmarks: timing (interleaved, best of repeats), the machine line, results files.

Every benchmark compares drm_jax with a reference run in the same process (mergekit, a PyTorch loop,
numpy). On a shared, noisy machine the two are timed alternately, `repeats` times each, and the best
(smallest) time of each is kept: the least disturbed run of each side.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]


def interleaved_best(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each callable, running them in turn `repeats` times (ours, theirs, ours, ...)."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def versions() -> str:
    parts = []
    for module in ("jax", "torch", "mergekit", "numpy"):
        try:
            if module == "mergekit":
                from importlib.metadata import version

                parts.append(f"mergekit {version('mergekit')}")
            else:
                parts.append(f"{module} {__import__(module).__version__}")
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            parts.append(f"{module} (not installed)")
    return ", ".join(parts)


def drm_jax_source() -> str:
    """Which drm_jax was measured: its git commit, and whether drm_jax/ had uncommitted changes."""
    import drm_jax

    where = Path(drm_jax.__file__).resolve().parents[1]

    def git(*cmd):
        return subprocess.run(["git", "-C", str(where), *cmd], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return f"drm_jax from {where}"
    dirty = git("status", "--porcelain", "--", "drm_jax")
    place = "" if where == REPO else f" (a clone at {where})"
    return f"drm_jax at commit {commit}{place}" + (", with uncommitted changes in drm_jax/" if dirty else "")


def machine() -> str:
    """One line: CPU, cores, Python, package versions, jax backend, torch threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    extra = []
    try:
        import jax

        extra.append(f"jax backend {jax.devices()[0].platform}")
    except Exception:  # noqa: BLE001
        pass
    if "torch" in sys.modules:
        extra.append(f"torch threads {sys.modules['torch'].get_num_threads()}")
    return (f"{cpu}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; {versions()}"
            + (f"; {', '.join(extra)}" if extra else "") + f"; {drm_jax_source()}")


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    env = [f"{v}={shlex.quote(os.environ[v])}" for v in ("PYTHONPATH", "JAX_PLATFORMS", "XLA_FLAGS") if v in os.environ]
    return " ".join([*env, "python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def write_results(name: str, title: str, body: Sequence[str], path: Path | None = None) -> Path:
    """benchmarks/RESULTS_<name>.md: title, the body (tables, goal lines), the command and the machine."""
    path = path or REPO / "benchmarks" / f"RESULTS_{name}.md"
    lines = [f"# {title}", "", *body, "", f"Command: `{command_line()}`", "", f"Machine: {machine()}.", ""]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> list[str]:
    """A Markdown table; `align` is one letter per column, l or r (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|",
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows]]


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"
