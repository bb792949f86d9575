"""Error output is one bounded line (issue 23, class 6): every value an error quotes (tensor names, paths,
keys) is cut and escaped, so a 1,000,000-character tensor name gives a short line and a path holding a
newline cannot forge a second `drm-jax: error:` line; the CLI's printer enforces it whatever the message."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest

from drm_jax.errors import MESSAGE_LIMIT, CheckpointError, MergeInputError, one_line, os_errors_named, quote_path

from .conftest import refused, write_merge_config

FORGED = "\ndrm-jax: error: forged second line"
HUGE = "w" * 1_000_000


def _add_tensor(directory, name: str, array: np.ndarray) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    tensors[name] = array
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("where", ["shape mismatch", "missing from a model"])
def test_huge_tensor_name_gives_a_short_line(tmp_path, capfd, family, where):
    _add_tensor(family / "base", HUGE, np.ones(2, np.float32))
    _add_tensor(family / "task_b", HUGE, np.ones(3 if where == "shape mismatch" else 2, np.float32))
    if where == "shape mismatch":
        _add_tensor(family / "task_a", HUGE, np.ones(2, np.float32))
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
    out = tmp_path / "out"
    line = _merge_line(capfd, config, out)
    assert line is not None and len(line) < 400 and "www..." in line, line and line[:500]
    assert ("shape" if where == "shape mismatch" else "missing") in line and not out.exists()


def _merge_line(capfd, config, out) -> str | None:
    """The merge's one error line (None when it succeeds), checking there is never more than one."""
    from drm_jax.cli.main import main

    capfd.readouterr()
    code = main(["merge", str(config), str(out), "--quiet"])
    err = capfd.readouterr().err
    lines = err.splitlines()
    if code == 0:
        return None
    assert code == 2 and len(lines) == 1 and lines[0].startswith("drm-jax: error: "), err[:2000]
    return lines[0]


@pytest.mark.parametrize("model", ["base", "task_a"])
def test_path_with_a_newline_cannot_forge_a_line(tmp_path, capfd, family, model):
    """A model directory whose name holds a newline and a fake error line, and a broken checkpoint."""
    odd = family / f"odd{FORGED}"
    shutil.copytree(family / model, odd)
    (odd / "model.safetensors").write_bytes(b"\x00" * 7)  # truncated: the reader names the file
    paths = {name: family / name for name in ("base", "task_a", "task_b")}
    paths[model] = odd
    config = write_merge_config(tmp_path, *(json.dumps(str(paths[n])) for n in ("base", "task_a", "task_b")))
    out = tmp_path / "out"
    line = refused(capfd, ["merge", config, out, "--quiet"], out, [family, config], ["odd\\ndrm-jax: error: forged"])
    assert line.count("drm-jax: error:") == 2  # the real prefix, and the forged text inside the escaped path


def test_config_key_and_value_with_control_characters(tmp_path, capfd, family):
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b",
                                extra='"bad\\u001b[31m\\nkey": 1\n')
    out = tmp_path / "out"
    line = refused(capfd, ["merge", config, out, "--quiet"], out, [family, config], ["bad\\x1b[31m\\nkey"])
    assert "\x1b" not in line and "\n" not in line


def test_every_api_error_is_one_bounded_line():
    for error in (CheckpointError, MergeInputError):
        text = str(error(f"tensor {HUGE!r}{FORGED}\x1b[2J\u2028\udcff"))
        assert len(text) <= MESSAGE_LIMIT + 10 and "\n" not in text and "\x1b" not in text
        assert text.splitlines() == [text] and text.endswith("\\x1b[2J\\u2028\\udcff")
        text.encode("utf-8")  # no lone surrogate left to break stderr


def test_quote_path_keeps_the_file_name():
    long = "/data/" + "d" * 5000 + "/tokenizer.json"
    quoted = quote_path(long)
    assert len(quoted) < 400 and quoted.startswith("/data/") and quoted.endswith("/tokenizer.json")
    assert quote_path("/a/b\nc") == "/a/b\\nc"
    assert one_line("fine as it is") == "fine as it is"


def test_cli_printer_bounds_any_message(capfd):
    """The last defence: even an error raised with a raw message prints as one bounded line."""
    from drm_jax.cli.main import print_error

    class Raw(Exception):
        def __str__(self):
            return HUGE + FORGED

    print_error(Raw())
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and len(err) <= MESSAGE_LIMIT + 40


def test_os_errors_become_one_line_checkpoint_errors_naming_the_file():
    with pytest.raises(CheckpointError) as err:
        with os_errors_named("out"):
            raise OSError(errno.ENOSPC, "No space left on device", "out/model.safetensors")
    assert str(err.value) == "out/model.safetensors: No space left on device" and err.value.__cause__ is None
    with pytest.raises(CheckpointError, match=r"^out: boom$"):
        with os_errors_named("out"):
            raise OSError("boom")  # no file name: the output directory is named
    own = CheckpointError("model.safetensors: truncated")
    with pytest.raises(CheckpointError) as err:
        with os_errors_named("out"):
            raise own
    assert err.value is own  # drm_jax's own errors pass as they are
