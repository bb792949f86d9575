"""PEFT LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors` or `.bin`).

A LoRA adapter stores, for each adapted module `m` of the base model, `m.lora_A.weight` (r, in) and
`m.lora_B.weight` (out, r). Its weight update is

    delta = scaling * B @ A,   scaling = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora),

with per-module r and alpha overridden by `rank_pattern` / `alpha_pattern` (matched like PEFT does, as
the regex `(.*\\.)?(key)$` over the module name). Layouts follow the base weight: with `fan_in_fan_out`
(GPT-2 Conv1D, stored (in, out)) the delta is transposed; an embedding's `lora_embedding_A` (r, num) and
`lora_embedding_B` (dim, r) give delta = scaling * (B @ A).T of shape (num, dim); a convolution's
A (r, in, *window) and B (out, r, 1, ...) give delta[o, i, ...] = scaling * sum_r B[o, r] A[r, i, ...].
`lora_B.bias` (lora_bias=True) updates the module's bias by scaling * bias. Tensors saved whole
(`modules_to_save`, biases with bias="all") replace the base tensor. A `m.base_layer.weight` saved by the
adapter (PEFT saves adapted embedding layers whole) is the base weight the LoRA update applies to.

The reader's names are the adapted base weights ("model.layers.0.self_attn.q_proj.weight", the PEFT
prefix `base_model.model.` removed). `delta(name)` needs only the adapter; `get(name)` returns the full
adapted weight and needs the base model's reader. Deltas are computed in float32; `get` returns the base
weight's dtype. Reference: Hu et al., "LoRA" (arXiv 2106.09685); PEFT's LoraLayer.get_delta_weight.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np

from drm_jax.errors import CheckpointError, quote
from drm_jax.io.base import CheckpointReader, IndexedReader, read_json
from drm_jax.io.safetensors_io import SafetensorsReader
from drm_jax.io.torch_io import TorchReader

ADAPTER_CONFIG_NAME = "adapter_config.json"
# The adapter's weight files, in the order PEFT prefers them, and their readers.
ADAPTER_WEIGHT_READERS = {"adapter_model.safetensors": SafetensorsReader, "adapter_model.bin": TorchReader}
ADAPTER_WEIGHT_NAMES = tuple(ADAPTER_WEIGHT_READERS)
_PEFT_PREFIX = "base_model.model."
# module.lora_A[.adapter].weight, module.lora_embedding_A[.adapter], module.lora_B[.adapter].bias
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]+)??(?P<leaf>\.weight|\.bias)?$"
)


@dataclasses.dataclass
class _LoraModule:
    """The adapter tensors of one adapted module (adapter file names)."""

    module: str
    a: str | None = None
    b: str | None = None
    b_bias: str | None = None
    embedding: bool = False


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_pattern(config_path: Path, field: str, patterns: object) -> None:
    """`rank_pattern` / `alpha_pattern`: absent, or a mapping of module regexes to positive numbers."""
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{config_path}: {field} must be a mapping of module patterns to numbers, "
                              f"got {quote(patterns)}")
    for key, value in patterns.items():
        if not _positive_number(value):
            raise CheckpointError(f"{config_path}: {field}[{quote(key)}] must be a positive number, got {quote(value)}")
        try:
            re.compile(rf"(.*\.)?({key})$")
        except (re.error, RecursionError, OverflowError) as err:
            raise CheckpointError(f"{config_path}: {field}: key {quote(key)} is not a valid pattern: {err}") from None


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class PeftReader(IndexedReader):
    """A PEFT LoRA adapter, presented as the base weights it changes (see module docstring)."""

    format = "peft"

    def __init__(self, path: Path, base: CheckpointReader | None = None, *, owns_base: bool = False) -> None:
        path = Path(path)
        directory = path.parent if path.is_file() else path
        super().__init__(path, base.config_dir if base is not None else None)
        self.base = base
        self.owns_base = owns_base  # close `base` with this reader
        self.config = self._read_config(directory / ADAPTER_CONFIG_NAME)
        weights = next((directory / n for n in ADAPTER_WEIGHT_NAMES if (directory / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{directory}: adapter_config.json without {' or '.join(ADAPTER_WEIGHT_NAMES)}")
        self.adapter = ADAPTER_WEIGHT_READERS[weights.name](weights)
        try:
            self._modules, self._whole = self._index(self.adapter.keys())
            self._by_name = self._resolve_names()
        except BaseException:
            self.adapter.close()
            raise

    # -- reading the adapter ---------------------------------------------------------------------------

    @staticmethod
    def _read_config(config_path: Path) -> dict:
        config = read_json(config_path, "adapter config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: adapter config is not a JSON object")
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise CheckpointError(f"{config_path}: peft_type {peft_type!r} is not supported (LoRA only)")
        if config.get("use_dora"):
            raise CheckpointError(f"{config_path}: DoRA adapters (use_dora) are not supported")
        for field in ("r", "lora_alpha"):
            if not _positive_number(config.get(field)):
                raise CheckpointError(f"{config_path}: {field} must be a positive number, got {quote(config.get(field))}")
        for field in ("rank_pattern", "alpha_pattern"):
            _check_pattern(config_path, field, config.get(field))
        return config

    def _index(self, adapter_names: list[str]) -> tuple[dict[str, _LoraModule], dict[str, str]]:
        modules: dict[str, _LoraModule] = {}
        whole: dict[str, str] = {}  # base name -> adapter name of a tensor stored whole
        for key in adapter_names:
            bare = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            bare = bare.replace(".base_layer.", ".")
            if "lora_magnitude_vector" in bare:
                raise CheckpointError(f"{self.adapter.path}: DoRA tensor {key!r} is not supported")
            match = _LORA_KEY.match(bare)
            if match is None:
                whole[bare] = key
                continue
            entry = modules.setdefault(match["module"], _LoraModule(match["module"]))
            part, leaf = match["part"], match["leaf"] or ".weight"
            entry.embedding = entry.embedding or part.startswith("lora_embedding")
            if part.endswith("A"):
                entry.a = key
            elif leaf == ".bias":
                entry.b_bias = key
            else:
                entry.b = key
        for entry in modules.values():
            if entry.a is None or entry.b is None:
                raise CheckpointError(f"{self.adapter.path}: module {entry.module!r} has lora_A without lora_B or the reverse")
        return modules, whole

    def _base_name(self, name: str) -> str:
        """`name` as the base checkpoint spells it: exact, or the one base name ending with ".name"."""
        if self.base is None or name in self.base:
            return name
        matches = [k for k in self.base.keys() if k.endswith("." + name)]
        if len(matches) == 1:
            return matches[0]
        raise CheckpointError(f"{self.path}: adapted tensor {name!r} is not in the base model {self.base.path}")

    def _resolve_names(self) -> dict[str, tuple[str, str]]:
        """base name -> (kind, key): kind "lora" (key: module), "bias" (key: module) or "whole" (adapter key).

        A tensor saved whole under the name of a LoRA-adapted weight (`base_layer`) is that module's base
        weight, kept in `self._saved_base`.
        """
        names: dict[str, tuple[str, str]] = {}
        self._saved_base: dict[str, str] = {}
        for module, entry in self._modules.items():
            for leaf, kind, present in (("weight", "lora", True), ("bias", "bias", entry.b_bias is not None)):
                if not present:
                    continue
                if f"{module}.{leaf}" in self._whole:
                    self._saved_base[f"{module}.{leaf}"] = self._whole.pop(f"{module}.{leaf}")
                names[self._base_name(f"{module}.{leaf}")] = (kind, module)
        for base_name, key in self._whole.items():
            names[self._base_name(base_name)] = ("whole", key)
        return names

    # -- the LoRA update --------------------------------------------------------------------------------

    def scaling(self, module: str) -> float:
        """lora_alpha / r (or / sqrt(r) with use_rslora), with rank_pattern / alpha_pattern applied."""
        rank = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
        return float(alpha) / (math.sqrt(rank) if self.config.get("use_rslora") else float(rank))

    def _lora_delta(self, module: str) -> np.ndarray:
        entry = self._modules[module]
        a = self.adapter.get(entry.a).astype(np.float32)
        b = self.adapter.get(entry.b).astype(np.float32)
        scale = np.float32(self.scaling(module))
        where = f"{self.adapter.path}: module {module!r}"
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{where}: lora_A {a.shape} and lora_B {b.shape} ranks differ")
        if entry.embedding:
            return scale * (b @ a).T  # (num_embeddings, dim)
        if a.ndim == 2 and b.ndim == 2:
            delta = scale * (b @ a)  # (out, in)
            return delta.T if self.config.get("fan_in_fan_out") else delta
        if a.ndim >= 3 and b.ndim == a.ndim and all(d == 1 for d in b.shape[2:]):
            return scale * np.tensordot(b.reshape(b.shape[:2]), a, axes=(1, 0))  # (out, in, *window)
        raise CheckpointError(f"{where}: unsupported LoRA shapes A {a.shape}, B {b.shape}")

    # -- the reader interface ---------------------------------------------------------------------------

    def delta(self, name: str) -> np.ndarray:
        """float32 update of base weight `name`, in the base weight's layout (see module docstring)."""
        kind, key = self._record(name)
        if kind == "lora":
            delta = self._lora_delta(key)
        elif kind == "bias":
            delta = np.float32(self.scaling(key)) * self.adapter.get(self._modules[key].b_bias).astype(np.float32)
        else:
            delta = self.adapter.get(key).astype(np.float32) - self._require_base(name).astype(np.float32)
        if self.base is not None and delta.shape != self.base.shape(name):
            raise CheckpointError(
                f"{self.path}: delta of {name!r} has shape {delta.shape} but the base weight is {self.base.shape(name)}"
            )
        return delta

    def _require_base(self, name: str) -> np.ndarray:
        if self.base is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} needs the base model (open_checkpoint(..., base=...))")
        return self.base.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        kind, key = self._record(name)
        if self.base is not None:
            return self.base.shape(name)
        if kind == "whole":
            return self.adapter.shape(key)
        if kind == "bias":
            return self.adapter.shape(self._modules[key].b_bias)
        entry = self._modules[key]
        a, b = self.adapter.shape(entry.a), self.adapter.shape(entry.b)
        if entry.embedding:
            return (a[1], b[0])
        if len(a) == 2:
            return (a[1], b[0]) if self.config.get("fan_in_fan_out") else (b[0], a[1])
        return (b[0], *a[1:])

    def dtype(self, name: str) -> np.dtype:
        kind, key = self._record(name)
        if self.base is not None:
            return self.base.dtype(name)
        return self.adapter.dtype(key if kind == "whole" else self._modules[key].a)

    def get(self, name: str) -> np.ndarray:
        """The adapted weight: base + delta (cast back to the base dtype), or the tensor stored whole."""
        kind, key = self._record(name)
        if kind == "whole":
            return self.adapter.get(key)
        leaf = "weight" if kind == "lora" else "bias"
        saved = self._saved_base.get(f"{key}.{leaf}")
        base = self.adapter.get(saved) if saved is not None else self._require_base(name)
        return (base.astype(np.float32) + self.delta(name)).astype(base.dtype)

    def close(self) -> None:
        self.adapter.close()
        if self.owns_base and self.base is not None:
            self.base.close()
