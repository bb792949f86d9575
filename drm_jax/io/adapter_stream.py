"""A PEFT adapter directory written tensor by tensor, atomically, holding one tensor in memory at a time.

PEFT reads one `adapter_model.safetensors` (never shards). A safetensors file starts with a header
listing every tensor's shape and byte range, which is known only once the last tensor is in, so each
tensor's bytes go to a data file as they are added, and `close()` writes the header followed by those
bytes (copied in 16 MiB pieces) and `adapter_config.json`, then moves the directory into place
(`drm_jax.io.writer.CheckpointWriter`: temporary directory, rename, nothing left on failure).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

from drm_jax.errors import CheckpointError
from drm_jax.io.dtypes import SAFETENSORS_DTYPES
from drm_jax.io.peft_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from drm_jax.io.writer import CheckpointWriter, write_failure

_SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_COPY_CHUNK = 16 * 2**20


class StreamingAdapterWriter(CheckpointWriter):
    """Writes `adapter_model.safetensors` and `adapter_config.json` into `out_dir`, atomically.

    Args:
      out_dir: the adapter directory (an existing non-empty one is refused unless overwrite=True).
      overwrite: replace an existing non-empty `out_dir` once the new adapter is complete.

    `add(name, array)` streams a tensor to disk; set `adapter_config` (a dict) before `close()`.
    """

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False) -> None:
        super().__init__(out_dir, "flax", overwrite=overwrite)  # "flax": no shard writer of its own
        self.adapter_config: dict | None = None
        self._data_path = self.tmp_dir / ".tensors.part"
        try:
            self._data = open(self._data_path, "wb")
        except OSError as err:
            self.abort()
            raise write_failure(self.out_dir, err) from None
        self._header: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, array) -> None:
        if self._closed:
            raise CheckpointError(f"{self.out_dir}: writer is closed")
        if name in self._header:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} added twice")
        array = np.ascontiguousarray(np.asarray(array))
        code = _SAFETENSORS_CODES.get(array.dtype)
        if code is None:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
        try:
            self._data.write(array.reshape(-1).view(np.uint8).data if array.size else b"")
        except OSError as err:
            raise CheckpointError(f"{self.out_dir}: cannot write tensor {name!r}: {err.strerror or err}") from None
        self._header[name] = {"dtype": code, "shape": list(array.shape),
                              "data_offsets": [self._offset, self._offset + array.nbytes]}
        self._offset += array.nbytes

    def _write_payload(self) -> None:
        if self.adapter_config is None:
            raise CheckpointError(f"{self.out_dir}: adapter config not set before close")
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it
        with open(self.tmp_dir / ADAPTER_WEIGHTS_NAME, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, _COPY_CHUNK)
        self._data_path.unlink()
        (self.tmp_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps(self.adapter_config, indent=2) + "\n",
                                                        encoding="utf-8")

    def abort(self) -> None:
        data = getattr(self, "_data", None)
        if data is not None:
            data.close()
        super().abort()


__all__ = ["StreamingAdapterWriter"]
