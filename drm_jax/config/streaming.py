"""Opening the checkpoints of a config for the engine's streaming planner (`drm_jax.engine.sources`).

The command line's part of a streamed merge is only this: resolve the config's model references (paths,
mergekit's `model+adapter` form, PEFT adapter directories over the base), open them with `drm_jax.io`'s
lazy readers, and put one naming convention over all of them (Hugging Face names and layout, so mixed
formats merge together). Their headers make the merge's plan (`drm_jax.config.plan`), which is bound to
these views to be streamed (`drm_jax.config.segments.bind_segments`). What is merged and how is the
engine's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from drm_jax.io import naming
from drm_jax.config.schema import MergeConfig, ModelEntry
from drm_jax.errors import CheckpointError, DrmJaxError
from drm_jax.io import detect

PEFT_CONFIG_NAME = "adapter_config.json"


def split_adapter(config: MergeConfig, reference: str) -> tuple[Path, Path | None]:
    """mergekit's `model+adapter` reference -> (model path, adapter path or None).

    A `+` only separates an adapter when the whole string is not itself an existing path.
    """
    whole = config.resolve(reference)
    if whole.exists() or "+" not in reference:
        return whole, None
    model, adapter = reference.rsplit("+", 1)
    return config.resolve(model), config.resolve(adapter)


def open_model(config: MergeConfig, entry: ModelEntry, base_path: Path | None):
    """Open one model lazily: any format the readers know, or a PEFT adapter over a model.

    A PEFT adapter directory given alone is applied over the base model.
    """
    path, adapter = split_adapter(config, entry.model)
    for p, what in ((path, "model"), (adapter, "adapter")):
        if p is not None and not p.exists():
            raise CheckpointError(f"{entry.key}: {what} path {str(p)!r} does not exist")
    if adapter is not None:
        return _open(lambda: detect.open_checkpoint(adapter, base=path), entry, adapter)
    if path.is_dir() and (path / PEFT_CONFIG_NAME).is_file():
        if base_path is None:
            raise CheckpointError(f"{entry.key}: {str(path)!r} is a PEFT adapter and there is no base_model to "
                                  f"apply it to")
        return _open(lambda: detect.open_checkpoint(path, base=base_path), entry, path)
    return _open(lambda: detect.open_checkpoint(path), entry, path)


def _open(opener: Callable[[], Any], entry: ModelEntry, path: Path):
    try:
        reader = opener()
    except DrmJaxError:
        raise
    except Exception as err:  # a reader that did not wrap its own failure
        raise CheckpointError(f"{entry.key}: cannot open {str(path)!r}: {err}") from None
    return AdapterOverBase(reader) if getattr(reader, "format", None) == "peft" else reader


class AdapterOverBase:
    """A PEFT adapter seen as a whole model: adapted weights (base + scaling B A) where the adapter has
    them, the base's own tensors everywhere else."""

    format = "peft"  # Hugging Face names

    def __init__(self, adapter: Any):
        self.adapter = adapter
        self.base = adapter.base
        self.path = adapter.path
        self.config_dir = self.base.config_dir
        self._adapted = set(adapter.keys())

    def keys(self) -> list[str]:
        return list(self.base.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.base.shape(name))

    def dtype(self, name: str):
        return self.base.dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self.adapter.get(name) if name in self._adapted else self.base.get(name)

    def close(self) -> None:
        self.adapter.close()


@contextlib.contextmanager
def open_views(config: MergeConfig, entries: Sequence[ModelEntry]) -> Iterator[tuple[list[Any], str]]:
    """(Hugging Face views of the models `entries`, in order; their architecture name), readers closed on
    exit. An adapter entry is read over the config's base model. What is merged from them is the plan's
    (`drm_jax.config.plan`)."""
    base_path = None
    if config.base_model is not None:
        base_path, _ = split_adapter(config, config.base_model)
    readers: list[Any] = []
    try:
        for entry in entries:
            readers.append(open_model(config, entry, base_path))
        arch = naming.architecture_of(readers)
        yield [naming.HFView(r, arch) for r in readers], arch
    finally:
        for reader in readers:
            try:
                reader.close()
            except Exception:  # closing is best effort; the merge result is already decided
                pass


def input_paths(config: MergeConfig, models: Sequence[ModelEntry]) -> list[Path]:
    """Every filesystem path a merge reads (models, adapters, the base, the tokenizer source)."""
    refs = [m.model for m in models]
    if config.base_model is not None:
        refs.append(config.base_model)
    spec = config.tokenizer_spec
    if spec is not None and spec.source not in ("base", "union"):
        refs.append(spec.source)
    paths = []
    for ref in refs:
        model, adapter = split_adapter(config, ref)
        paths += [model] + ([adapter] if adapter is not None else [])
    return paths


__all__ = ["input_paths", "open_views", "split_adapter"]
