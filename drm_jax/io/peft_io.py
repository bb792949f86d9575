"""PEFT LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors` or `.bin`).

A LoRA adapter stores, for each adapted module `m` of the base model, `m.lora_A.weight` (r, in) and
`m.lora_B.weight` (out, r). Its weight update is

    delta = scaling * B @ A,   scaling = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora),

with per-module r and alpha overridden by `rank_pattern` / `alpha_pattern` (matched like PEFT does, as
the regex `(.*\\.)?(key)$` over the module name, in bounded time: `drm_jax.io.bounded_regex`). Layouts
follow the base weight: with `fan_in_fan_out` (GPT-2 Conv1D, stored (in, out)) the delta is transposed;
an embedding's `lora_embedding_A` (r, num) and `lora_embedding_B` (dim, r) give delta = scaling * (B @ A).T of shape (num, dim); a convolution's
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
import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from drm_jax.math.lowrank import LoraWeight
from drm_jax.errors import CheckpointError, quote
from drm_jax.io.base import CheckpointReader, IndexedReader, read_json
from drm_jax.io.bounded_regex import BoundedPattern, PatternError
from drm_jax.io.safetensors_io import SafetensorsReader
from drm_jax.io.torch_io import TorchReader
from drm_jax.io.writer import CheckpointWriter
from drm_jax.numbers import is_finite_number

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
    return isinstance(value, (int, float)) and is_finite_number(value) and value > 0


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
        if not isinstance(key, str):
            raise CheckpointError(f"{config_path}: {field}: key {quote(key)} is not a pattern")
        try:
            _module_pattern(key)
        except PatternError as err:
            raise CheckpointError(f"{config_path}: {field}: key {quote(key)}: {err}") from None


@functools.lru_cache(maxsize=256)
def _module_pattern(key: str) -> BoundedPattern:
    """PEFT's match of a pattern key against a module name: re.match(rf"(.*\\.)?({key})$", module), here
    in bounded time (a key from a checkpoint may be `(.*)*Z`, which backtracks for hours in `re`)."""
    return BoundedPattern(rf"(.*\.)?({key})$")


def _pattern_value(config_path: Path, field: str, patterns: dict, module: str, default):
    for key, value in patterns.items():
        try:
            if _module_pattern(key).match(module):
                return value
        except PatternError as err:
            raise CheckpointError(f"{config_path}: {field}: key {quote(key)} against module {quote(module)}: "
                                  f"{err}") from None
    return default


def check_lora_factors(path: Any, file: Any, name: str, kind: str, key: str, a_shape: tuple[int, ...] | None = None,
                       b_shape: tuple[int, ...] | None = None) -> None:
    """Refuse a changed weight that has no LoRA factors a merged adapter can carry (`kind` "bias" or
    "whole": `PeftReader.factors`) or, given their shapes, factors that are not a linear layer's or an
    embedding's (2-D, A's rows B's columns). `path`: the adapter, `file`: its weights file."""
    if kind != "lora":
        what = "a LoRA bias (lora_bias)" if kind == "bias" else "a tensor saved whole (modules_to_save)"
        raise CheckpointError(f"{path}: {name!r} is {what}, which has no LoRA factors; merge the "
                              f"adapted models instead (drm-jax merge without --adapter-out)")
    if a_shape is None or b_shape is None:
        return
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise CheckpointError(f"{file}: module {key!r}: LoRA factors A {a_shape} and B {b_shape} "
                              f"are not a linear layer's or an embedding's")


class PeftReader(IndexedReader):
    """A PEFT LoRA adapter, presented as the base weights it changes (see module docstring)."""

    format = "peft"

    def __init__(self, path: Path, base: CheckpointReader | None = None, *, owns_base: bool = False) -> None:
        path = Path(path)
        directory = path.parent if path.is_file() else path
        super().__init__(path, base.config_dir if base is not None else None)
        self.base = base
        self.owns_base = owns_base  # close `base` with this reader
        self.directory = directory
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
        where = self.directory / ADAPTER_CONFIG_NAME
        rank = _pattern_value(where, "rank_pattern", self.config.get("rank_pattern") or {}, module, self.config["r"])
        alpha = _pattern_value(where, "alpha_pattern", self.config.get("alpha_pattern") or {}, module,
                               self.config["lora_alpha"])
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

    # -- the factors themselves (drm_jax.merge_adapters) ------------------------------------------------

    def is_embedding(self, name: str) -> bool:
        """Whether base weight `name` is adapted by an embedding LoRA (lora_embedding_A / _B)."""
        kind, key = self._record(name)
        return kind == "lora" and self._modules[key].embedding

    def lora_weights(self) -> dict[str, LoraWeight]:
        """Every adapted base weight's LoRA factors: name -> `LoraWeight(b=B, a=A, scale, transposed)` (the
        form `drm_jax.merge_adapters` takes), the update being scale * B @ A, stored as its transpose where
        `transposed` (fan_in_fan_out, embeddings).

        B is lora_B (out, r) (an embedding's lora_embedding_B (dim, r)), A is lora_A (r, in)
        (lora_embedding_A (r, num)), both float32. Raises CheckpointError where the adapter changes a tensor
        otherwise (saved whole, a LoRA bias) or has a convolution's LoRA: those have no factored form.
        """
        out = {}
        for name, (kind, key) in self._by_name.items():
            check_lora_factors(self.path, self.adapter.path, name, kind, key)
            entry = self._modules[key]
            a = self.adapter.get(entry.a).astype(np.float32)
            b = self.adapter.get(entry.b).astype(np.float32)
            check_lora_factors(self.path, self.adapter.path, name, kind, key, a.shape, b.shape)
            transposed = entry.embedding or bool(self.config.get("fan_in_fan_out"))
            out[name] = LoraWeight(b, a, self.scaling(key), transposed)
        return out

    def factors(self) -> dict[str, tuple[str, str, tuple[int, ...], tuple[int, ...]]]:
        """Every changed base weight's (kind, key, A's shape, B's shape), from the adapter file's header
        (no tensor data): kind "lora" (key: its module; the shapes of lora_A and lora_B, or of
        lora_embedding_A and _B), "bias" (a LoRA bias; key: its module) or "whole" (a tensor saved whole;
        key: its adapter name); the last two have no factors (shapes ())."""
        out = {}
        for name, (kind, key) in self._by_name.items():
            if kind == "lora":
                entry = self._modules[key]
                out[name] = (kind, key, tuple(self.adapter.shape(entry.a)), tuple(self.adapter.shape(entry.b)))
            else:
                out[name] = (kind, key, (), ())
        return out

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


# -- writing a LoRA adapter ----------------------------------------------------------------------------
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def _module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def write_lora_adapter(out_dir, weights, *, embeddings=(), fan_in_fan_out: bool = False,
                       base_model_name_or_path: str | None = None, task_type: str | None = None,
                       dtype=None, overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors), atomically.

    Args:
      out_dir: the directory (created; an existing non-empty one only with overwrite=True).
      weights: base weight name ("model.layers.0.self_attn.q_proj.weight") -> (B, A, transposed): the
        update B @ A (scale 1), stored transposed where `transposed`. Every module gets the largest rank R
        (the others padded with zeros, exact): the config has r = lora_alpha = R (PEFT's scaling 1).
      embeddings: names of the weights that are embeddings (written as lora_embedding_A / _B).
      fan_in_fan_out: the linear modules are stored (in, out) (GPT-2's Conv1D), as PEFT's flag says.
      base_model_name_or_path, task_type: copied into the config.
      dtype: numpy dtype of the tensors (default float32).

    Keys are PEFT's: base_model.model.<module>.lora_A.weight (R, in) and .lora_B.weight (out, R), or
    .lora_embedding_A (R, num) and .lora_embedding_B (dim, R).
    """
    if not weights:
        raise CheckpointError(f"{out_dir}: no adapted weights to write")
    rank = max(int(np.shape(b)[1]) for b, _, _ in weights.values())
    embeddings = set(embeddings)
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    tensors = {}
    for name, (b, a, transposed) in weights.items():
        b, a = np.asarray(b, np.float32), np.asarray(a, np.float32)
        # PEFT computes B @ A, transposed for embeddings and fan_in_fan_out modules
        needs = name in embeddings or fan_in_fan_out
        if bool(transposed) != needs:
            b, a = a.T, b.T
        pad = rank - b.shape[1]
        b, a = np.pad(b, ((0, 0), (0, pad))), np.pad(a, ((0, pad), (0, 0)))
        prefix = f"{_PEFT_PREFIX}{_module_of(name)}"
        if name in embeddings:
            tensors[f"{prefix}.lora_embedding_A"], tensors[f"{prefix}.lora_embedding_B"] = a, b
        else:
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted({_module_of(n) for n in weights}), "fan_in_fan_out": bool(fan_in_fan_out),
        "use_rslora": False, "use_dora": False, "inference_mode": True, "init_lora_weights": True,
        "base_model_name_or_path": base_model_name_or_path, "task_type": task_type, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    writer = _AdapterWriter(Path(out_dir), config, overwrite=overwrite)
    with writer:
        for key, value in tensors.items():
            writer.add(key, np.ascontiguousarray(value.astype(dtype)))
    return writer.path


class _AdapterWriter(CheckpointWriter):
    """The checkpoint writer's temporary directory and atomic rename, with PEFT's two files as payload."""

    def __init__(self, out_dir: Path, config: dict, overwrite: bool = False):
        super().__init__(out_dir, "flax", overwrite=overwrite)  # "flax": tensors are buffered until close()
        self.adapter_config = config

    def _write_payload(self) -> None:
        from safetensors.numpy import save_file

        try:
            save_file(self._buffered, str(self.tmp_dir / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        except Exception as err:  # SafetensorError (not an OSError) on a full disk
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{self.out_dir}: cannot write {ADAPTER_WEIGHTS_NAME}: {first}") from None
        (self.tmp_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps(self.adapter_config, indent=2) + "\n",
                                                        encoding="utf-8")
        self._buffered = {}
