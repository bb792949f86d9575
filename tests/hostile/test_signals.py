"""SIGTERM is handled as SIGINT (issue 15, class 11): the command unwinds, removes its temporary
directory and exits 143 (130 for SIGINT); OUT_DIR is then either absent or complete, never partial.

In process, a SIGTERM is sent from inside the merge at chosen points (opening the models, the first and a
later tensor, the last shard, the config copy, the final rename); in a subprocess, at several delays.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import leftovers, tree_digest, write_merge_config


def assert_absent_or_complete(out: Path, base: Path) -> bool:
    """True if `out` is a complete merge of the family (every tensor of the base), False if absent."""
    from drm_jax.io import open_checkpoint

    if not out.exists():
        return False
    with open_checkpoint(out) as merged, open_checkpoint(base) as reference:
        assert sorted(merged.keys()) == sorted(reference.keys())
        assert (out / "config.json").is_file()
    return True


def _terminate_on_call(monkeypatch, owner, name: str, call: int) -> list[int]:
    """Make owner.name send SIGTERM to this process on its `call`-th call (then behave as before)."""
    real = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def _points():
    import drm_jax.io.detect
    import drm_jax.io.safetensors_io
    import drm_jax.io.writer

    return {
        "opening the second model": (drm_jax.io.detect, "open_checkpoint", 2),
        "first tensor written": (drm_jax.io.writer.CheckpointWriter, "add", 1),
        "a later tensor written": (drm_jax.io.writer.CheckpointWriter, "add", 6),
        "last shard": (drm_jax.io.safetensors_io.SafetensorsShardWriter, "finish", 1),
        "config files copied": (drm_jax.io.writer, "copy_config_files", 1),
        "final rename": (drm_jax.io.writer.os, "replace", 1),
    }


@pytest.mark.parametrize("point", ["opening the second model", "first tensor written", "a later tensor written",
                                   "last shard", "config files copied", "final rename"])
def test_sigterm_inside_a_merge(tmp_path, capfd, family, monkeypatch, point):
    from drm_jax.cli.main import main

    owner, name, call = _points()[point]
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
    out = tmp_path / "out"
    before = tree_digest([family, config])
    calls = _terminate_on_call(monkeypatch, owner, name, call)
    code = main(["merge", str(config), str(out), "--quiet"])
    err = capfd.readouterr().err
    assert calls[0] >= call, "the fault point was never reached"
    assert code == 143, err
    assert err.strip().splitlines() == ["drm-jax: terminated"]
    complete = assert_absent_or_complete(out, family / "base")
    assert complete == (point == "final rename")  # a signal during the rename waits until it is done
    assert leftovers(out) == []
    assert tree_digest([family, config]) == before
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers are restored after the command


def test_sigterm_replacing_an_existing_output_keeps_the_old_one(tmp_path, capfd, family, monkeypatch):
    from drm_jax.cli.main import main
    import drm_jax.io.writer

    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
    out = tmp_path / "out"
    assert main(["merge", str(config), str(out), "--quiet"]) == 0
    old = tree_digest([out])
    _terminate_on_call(monkeypatch, drm_jax.io.writer.CheckpointWriter, "add", 3)
    assert main(["merge", str(config), str(out), "--quiet", "--force"]) == 143
    assert tree_digest([out]) == old
    assert leftovers(out) == []


def _start_merge(config: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "drm_jax.cli.main", "merge", str(config), str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("delay", [0.2, 3.0, 6.0])
def test_sigterm_to_a_running_merge_command(tmp_path, family, delay):
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
    out = tmp_path / "out"
    before = tree_digest([family, config])
    process = _start_merge(config, out)
    time.sleep(delay)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert "Traceback" not in err
    # -SIGTERM: it came before our handler was installed (while Python imported), when nothing is written.
    assert process.returncode in (0, 143, -signal.SIGTERM), err
    complete = assert_absent_or_complete(out, family / "base")
    assert not (complete and process.returncode == -signal.SIGTERM)
    assert leftovers(out) == []
    assert tree_digest([family, config]) == before


def test_sigint_while_the_output_is_being_written(tmp_path, family):
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
    out = tmp_path / "out"
    process = _start_merge(config, out)
    # Wait for the temporary directory: the writer is at work (or the merge already finished).
    while process.poll() is None and not leftovers(out):
        time.sleep(0.001)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert "Traceback" not in err
    assert process.returncode in (0, 130), err
    assert assert_absent_or_complete(out, family / "base") == (process.returncode == 0)
    assert leftovers(out) == []


def test_an_interrupt_lost_in_a_callback_is_raised_again_outside_it():
    """A SIGTERM that Python could not raise (it arrived inside a finalizer) is sent again, and raised
    after the unraisable hook has returned, not inside it (where it would be printed and lost again)."""
    import types

    from drm_jax.cli import main as cli_main

    passed_on = []
    hook = cli_main._redeliver_unraisable(passed_on.append)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    returned = False
    try:
        with pytest.raises(cli_main.Terminated):
            hook(types.SimpleNamespace(exc_value=cli_main.Terminated()))
            returned = True
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert returned  # the hook itself did not raise
    other = types.SimpleNamespace(exc_value=ValueError("not ours"))
    hook(other)
    assert passed_on == [other]
