"""The first hostile round's leftovers (issue 23, class 9): a T5X checkpoint with a missing chunk file, a
weight float32 cannot hold, a full disk while writing Orbax. Each is refused in one line naming the file,
tensor or key, exit 2, no traceback or warning, nothing left at or beside OUT_DIR, inputs unchanged."""

from __future__ import annotations

import errno
import resource
import warnings
from pathlib import Path

import numpy as np
import pytest

import drm_jax
from drm_jax.errors import CheckpointError, MergeInputError

from .conftest import refused, write_merge_config

EMBEDDING = "target.token_embedder.embedding"
KERNEL = "target.decoder.logits_dense.kernel"


# -- a T5X checkpoint with a missing chunk -----------------------------------------------------------------
def _t5x(root: Path, chunks: list[int] | None = None) -> Path:
    """A T5X checkpoint of two arrays; `chunks`: rewrite the kernel (10, 4) as a zarr array of that chunk
    shape (several chunk files)."""
    import tensorstore as ts

    from drm_jax.io import CheckpointWriter

    src = root / "t5x"
    kernel = np.arange(40, dtype=np.float32).reshape(10, 4)
    with CheckpointWriter(src, "t5x") as writer:
        writer.add(EMBEDDING, np.ones((6, 4), np.float32))
        writer.add(KERNEL, kernel)
    if chunks is not None:
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(src / KERNEL) + "/"},
                         "metadata": {"shape": [10, 4], "chunks": chunks, "dtype": "<f4",
                                      "compressor": {"id": "gzip"}}},
                        create=True, delete_existing=True).result()
        store.write(kernel).result()
    return src


def _chunk_files(array_dir: Path) -> list[Path]:
    return sorted(p for p in array_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


@pytest.mark.parametrize("chunks, which", [(None, 0), ([5, 4], 1), ([2, 2], 7)])
def test_t5x_missing_chunk_is_refused_by_convert(tmp_path, capfd, chunks, which):
    src = _t5x(tmp_path / "in", chunks)
    files = _chunk_files(src / KERNEL)
    assert len(files) == {None: 1, (5, 4): 2, (2, 2): 10}[tuple(chunks) if chunks else None]
    files[which].unlink()
    refused(capfd, ["convert", src, tmp_path / "out", "--to", "hf"], tmp_path / "out", [tmp_path / "in"],
            [KERNEL, files[which].name, "missing"])


def test_t5x_missing_chunk_is_refused_by_the_reader_and_a_whole_one_is_read(tmp_path):
    from drm_jax.io import open_checkpoint

    src = _t5x(tmp_path, [5, 4])
    with open_checkpoint(src) as reader:  # every chunk present: read whole
        np.testing.assert_array_equal(reader.get(KERNEL), np.arange(40, dtype=np.float32).reshape(10, 4))
    _chunk_files(src / KERNEL)[0].unlink()
    with open_checkpoint(src) as reader:
        with pytest.raises(CheckpointError, match=r"chunk file '0\.0' is missing"):
            reader.get(KERNEL)
        np.testing.assert_array_equal(reader.get(EMBEDDING), np.ones((6, 4), np.float32))


# -- a weight float32 cannot hold ------------------------------------------------------------------------------
@pytest.mark.parametrize("wa, extra, key", [
    ("1.0e+39", "", "models[0].parameters.weight"),
    ("0.5", "parameters: {lambda: -1.0e+39}\n", "parameters.lambda"),
    ("[0.5, 1.0e+39]", "", "models[0].parameters.weight[1]"),
])
def test_weight_beyond_float32_is_one_line(family, tmp_path, capfd, wa, extra, key):
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b", wa=wa)
    config.write_text(config.read_text().replace("parameters: {lambda: 1.0}\n", extra))
    line = refused(capfd, ["merge", config, tmp_path / "out"], tmp_path / "out", [family, config],
                   [str(config), key, "float32"])
    assert "RuntimeWarning" not in line


@pytest.mark.parametrize("coefficients", [[1e39, 1.0], [0.5, -4e38]])
def test_api_coefficient_beyond_float32_raises_without_a_warning(coefficients):
    tree = {"w": np.ones((3, 3), np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy "overflow encountered in cast" before the error
        with pytest.raises(MergeInputError, match="coefficients: .* beyond float32's range"):
            drm_jax.merge(tree, [tree, tree], method="task_arithmetic", coefficients=coefficients)


# -- a full disk while writing Orbax ----------------------------------------------------------------------------
def _failing_save(error: BaseException):
    """A PyTreeCheckpointer.save that writes part of the checkpoint, then fails as a full disk does."""
    def save(self, directory, *args, **kwargs):
        directory = Path(str(directory))
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "partial").write_bytes(b"\0" * 64)
        raise error

    return save


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError("OUT_OF_RANGE: Error writing \"params/0.0\" in OCDBT database: Failed to write 8192 bytes to "
               "file 16: No space left on device [os_error_code='28']"),
], ids=["oserror", "tensorstore"])
def test_full_disk_during_convert_to_orbax_is_one_line(family, tmp_path, capfd, monkeypatch, error):
    import orbax.checkpoint as ocp

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", _failing_save(error))
    out = tmp_path / "out"
    line = refused(capfd, ["convert", family / "base", out, "--to", "orbax"], out, [family],
                   [str(out), "No space left on device"])
    assert ".tmp-" not in line  # the destination is named, not our temporary directory


def test_file_too_large_during_convert_to_orbax_is_one_line(family, tmp_path, capfd):
    """A real write failure inside Orbax's writing threads (RLIMIT_FSIZE: EFBIG, as ENOSPC fails): one line,
    not Orbax's logged tracebacks or tensorstore's callbacks into a closed event loop."""
    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        line = refused(capfd, ["convert", family / "base", out, "--to", "orbax"], out, [family],
                       [str(out), "File too large"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert ".tmp-" not in line
