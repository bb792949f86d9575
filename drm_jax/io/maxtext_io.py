"""MaxText checkpoints: the model parameters of an Orbax checkpoint written by MaxText, one layer at a time.

MaxText (0.2.5) saves `<run>/checkpoints/<step>/items/` (an Orbax PyTree item, OCDBT + zarr3) with
`_CHECKPOINT_METADATA` beside `items`; the tree holds `params.params` (the model), `opt_state` (Optax, a
list), `nnx_aux` (RNG state) and `step`. Only `params.params` is read. Its decoder is scanned
(`scan_layers=true`): every per-layer parameter is stacked on axis `SCAN_AXIS` (MaxText's default
`param_scan_axis=1`), e.g. `decoder.layers.self_attention.query.kernel` (emb, L, heads, head_dim); or, with
`scan_layers=false`, stored per layer as `decoder.layers_<i>.<...>` without that axis.

The reader presents each layer of a scanned leaf as its own tensor, named `decoder.layers.<i>.<tail>`
(unscanned checkpoints get the same names), holding the matrix the layer's kernel stands for (Flax
orientation, (in, out)): the attention projections' head axes are folded, query / key / value
(emb, heads, head_dim) -> (emb, heads * head_dim) and out (heads, head_dim, emb) -> (heads * head_dim, emb);
MLP kernels, norms (emb,) and the non-layer leaves (`token_embedder.embedding` (vocab, emb),
`decoder.decoder_norm.scale`, `decoder.logits_dense.kernel` (emb, vocab)) keep their shapes. So a merge
stacks the layers again on the engine's layer axis and every method sees the matrices, as it does for the
same model in Hugging Face form. `MaxTextLayout` records the stored shapes, which the writer
(`write_maxtext`) needs to fold the heads back and restack the layers into the same tree.

Accepted paths: a MaxText run directory (its `checkpoints/` holds numbered steps; the latest is read), a
step directory, or the `items` directory itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from drm_jax.errors import CheckpointError
from drm_jax.io.base import IndexedReader, config_dir, read_json
from drm_jax.io.nested import unflatten_names
from drm_jax.io.orbax_io import OrbaxReader, find_orbax_item

PARAMS_PREFIX = "params.params."
SCAN_AXIS = 1  # MaxText's param_scan_axis default
ITEM_NAME = "items"
LAYERS = "decoder.layers"
# Presented (and written) layer names: "decoder.layers.<i>.<tail>".
_LAYER_NAME = re.compile(r"^decoder\.layers\.(?P<index>\d+)\.(?P<tail>.+)$")
_UNSCANNED = re.compile(r"^decoder\.layers_(?P<index>\d+)\.(?P<tail>.+)$")
# Attention projections whose kernel is stored with a head axis: which end of the shape is folded.
_HEAD_FOLDS = {"query": "trailing", "key": "trailing", "value": "trailing", "out": "leading"}
_DECODER_KEY = "('params', 'params', 'decoder'"


def _names_decoder(item: Path) -> bool:
    """Whether the Orbax item's `_METADATA` lists leaves under `params.params.decoder` (MaxText's tree)."""
    if not (item / "_METADATA").is_file():
        return False
    try:
        metadata = read_json(item / "_METADATA", "Orbax metadata")
    except CheckpointError:
        return False  # not ours to judge: the Orbax reader reports a broken file
    tree = metadata.get("tree_metadata") if isinstance(metadata, dict) else None
    return isinstance(tree, dict) and any(str(key).startswith(_DECODER_KEY) for key in tree)


def find_maxtext_item(path: Path) -> Path | None:
    """The Orbax item of a MaxText checkpoint at `path` (run directory, step directory or item), or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    item = find_orbax_item(root)
    return item if item is not None and _names_decoder(item) else None


def layer_name(index: int, tail: str) -> str:
    return f"{LAYERS}.{index}.{tail}"


def split_layer_name(name: str) -> tuple[int, str] | None:
    """(layer index, tail) of a presented layer name, or None for a leaf outside the layers."""
    match = _LAYER_NAME.match(name)
    return (int(match.group("index")), match.group("tail")) if match else None


def matrix_shape(name: str, stored: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a per-layer leaf is presented in: attention kernels' head axes folded (module docstring)."""
    parts = name.split(".")
    fold = _HEAD_FOLDS.get(parts[-2]) if len(parts) >= 2 and parts[-1] == "kernel" else None
    if fold is None or len(stored) != 3:
        return tuple(stored)
    if fold == "trailing":
        return (stored[0], stored[1] * stored[2])
    return (stored[0] * stored[1], stored[2])


@dataclasses.dataclass(frozen=True)
class MaxTextLayout:
    """How a MaxText model tree is stored: the writer's template.

    scanned: layers stacked on `SCAN_AXIS` (True) or stored as `decoder.layers_<i>` (False).
    num_layers: L.
    stored: presented name -> the leaf's stored shape for one layer (heads unfolded, no layer axis).
    """

    scanned: bool
    num_layers: int
    stored: Mapping[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class _Leaf:
    source: str  # the Orbax name, "params.params.decoder.layers.mlp.wo.kernel"
    layer: int | None  # the index on the scan axis; None: read whole
    shape: tuple[int, ...]  # presented


class MaxTextReader(IndexedReader):
    """The model parameters of a MaxText checkpoint, one layer of one leaf at a time (module docstring).

    `layout` (a `MaxTextLayout`) describes the stored tree. Reading layer i of a scanned leaf restores the
    whole stacked leaf once: the last one read is kept, so reading its L layers in turn reads it once (one
    stacked leaf of one model in memory, beside what the caller holds).
    """

    format = "maxtext"

    def __init__(self, path: Path) -> None:
        path = Path(path)
        item = find_maxtext_item(path)
        if item is None:
            raise CheckpointError(f"{path}: not a MaxText checkpoint (no Orbax item with params.params.decoder)")
        self.orbax = OrbaxReader(item)
        # config.json may sit beside the run (or the merge output), the step or the item
        super().__init__(path, config_dir(path, item.parent, item))
        self.item_dir = item
        try:
            self._by_name, self.layout = self._plan()
        except BaseException:
            self.orbax.close()
            raise
        self._cached: tuple[str, np.ndarray] | None = None

    def _plan(self) -> tuple[dict[str, _Leaf], MaxTextLayout]:
        model = [n for n in self.orbax.keys() if n.startswith(PARAMS_PREFIX)]
        own = {n[len(PARAMS_PREFIX):]: n for n in model}
        scanned = {n: s for n, s in own.items() if n.startswith(LAYERS + ".")}
        unscanned = {n: s for n, s in own.items() if _UNSCANNED.match(n)}
        if scanned and unscanned:
            raise CheckpointError(f"{self.item_dir}: both scanned ({next(iter(scanned))!r}) and unscanned "
                                  f"({next(iter(unscanned))!r}) decoder layers; refused")
        leaves: dict[str, _Leaf] = {}
        stored: dict[str, tuple[int, ...]] = {}
        before = [n for n in own if n not in scanned and n not in unscanned and n.startswith("token_embedder.")]
        after = [n for n in own if n not in scanned and n not in unscanned and n not in before]
        for name in before:
            stored[name] = self.orbax.shape(own[name])
            leaves[name] = _Leaf(own[name], None, matrix_shape(name, stored[name]))
        num_layers = 0
        if scanned:
            for name, source in scanned.items():
                shape = self.orbax.shape(source)
                if len(shape) <= SCAN_AXIS or (num_layers and shape[SCAN_AXIS] != num_layers):
                    raise CheckpointError(f"{self.item_dir}: scanned leaf {source!r} of shape {shape} has no layer "
                                          f"axis {SCAN_AXIS} of length {num_layers or '>= 1'}")
                num_layers = shape[SCAN_AXIS]
            for index in range(num_layers):
                for name, source in scanned.items():
                    tail = name[len(LAYERS) + 1:]
                    shape = self.orbax.shape(source)
                    layer_shape = shape[:SCAN_AXIS] + shape[SCAN_AXIS + 1:]
                    presented = layer_name(index, tail)
                    stored[presented] = layer_shape
                    leaves[presented] = _Leaf(source, index, matrix_shape(presented, layer_shape))
        else:
            by_index = sorted(unscanned, key=lambda n: int(_UNSCANNED.match(n).group("index")))
            indices = sorted({int(_UNSCANNED.match(n).group("index")) for n in unscanned})
            if indices != list(range(len(indices))):
                raise CheckpointError(f"{self.item_dir}: decoder layers {indices} are not numbered 0..{len(indices) - 1}")
            num_layers = len(indices)
            for name in by_index:
                match = _UNSCANNED.match(name)
                presented = layer_name(int(match.group("index")), match.group("tail"))
                stored[presented] = self.orbax.shape(unscanned[name])
                leaves[presented] = _Leaf(unscanned[name], None, matrix_shape(presented, stored[presented]))
        for name in after:
            stored[name] = self.orbax.shape(own[name])
            leaves[name] = _Leaf(own[name], None, matrix_shape(name, stored[name]))
        if not leaves:
            raise CheckpointError(f"{self.item_dir}: no model parameters under params.params")
        return leaves, MaxTextLayout(bool(scanned), num_layers, stored)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._record(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self.orbax.dtype(self._record(name).source)

    def stored_shape(self, name: str) -> tuple[int, ...]:
        """Shape of one layer of leaf `name` as stored (head axes unfolded)."""
        self._record(name)
        return tuple(self.layout.stored[name])

    def get(self, name: str) -> np.ndarray:
        leaf = self._record(name)
        if leaf.layer is None:
            array = self.orbax.get(leaf.source)
        else:
            if self._cached is None or self._cached[0] != leaf.source:
                self._cached = None  # the previous stacked leaf is freed before the next one is read
                self._cached = (leaf.source, self.orbax.get(leaf.source))
            array = np.take(self._cached[1], leaf.layer, axis=SCAN_AXIS)
        return np.ascontiguousarray(array.reshape(leaf.shape))

    def close(self) -> None:
        self._cached = None
        self.orbax.close()


def find_maxtext_reader(view: Any) -> MaxTextReader | None:
    """The MaxText reader under a chain of wrapping views (each holding its inner reader as `reader`,
    `view` or `reference`), or None."""
    seen = 0
    while view is not None and seen < 16:
        if isinstance(view, MaxTextReader):
            return view
        view = next((getattr(view, a) for a in ("reader", "view", "reference") if hasattr(view, a)), None)
        seen += 1
    return None


def writer_options(reference: Any) -> dict:
    """`CheckpointWriter` keyword arguments for a merge whose reference model is `reference` (a reader or
    a view of one): a MaxText checkpoint is written back in its own tree, anything else as Hugging Face."""
    reader = find_maxtext_reader(reference)
    if reader is None:
        return {"format": "hf"}
    return {"format": "maxtext", "maxtext_layout": reader.layout}


# --- writing ----------------------------------------------------------------------------------------------

def _stored_array(name: str, array: np.ndarray, layout: MaxTextLayout | None) -> np.ndarray:
    if layout is None:
        return array
    if name not in layout.stored:
        raise CheckpointError(f"tensor {name!r} is not in the reference MaxText tree")
    shape = tuple(layout.stored[name])
    if math.prod(shape) != array.size:
        raise CheckpointError(f"tensor {name!r} has shape {array.shape}; the MaxText tree stores {shape}")
    return array.reshape(shape)


def maxtext_tree(tensors: Mapping[str, np.ndarray], layout: MaxTextLayout | None = None,
                 scanned: bool = True) -> dict[str, np.ndarray]:
    """Presented names and arrays -> the stored tree's leaves, as dotted names under `params.params.`.

    Layer i of `decoder.layers.<i>.<tail>` goes to index i of `decoder.layers.<tail>` on `SCAN_AXIS`
    (scanned) or to `decoder.layers_<i>.<tail>`. With `layout` (a reader's), arrays are reshaped to its
    stored shapes, the layers stored as it stores them, and every leaf of it must be given; without it the
    arrays' own shapes are kept and `scanned` decides.
    """
    if layout is not None:
        missing = [n for n in layout.stored if n not in tensors]
        if missing:
            raise CheckpointError(f"tensor {missing[0]!r} of the MaxText tree is missing ({len(missing)} missing)")
        scanned = layout.scanned
    layers: dict[str, dict[int, np.ndarray]] = {}
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        array = _stored_array(name, np.asarray(array), layout)
        split = split_layer_name(name)
        if split is None:
            out[PARAMS_PREFIX + name] = array
        elif scanned:
            layers.setdefault(split[1], {})[split[0]] = array
        else:
            out[f"{PARAMS_PREFIX}decoder.layers_{split[0]}.{split[1]}"] = array
    for tail, by_index in layers.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise CheckpointError(f"layers of {tail!r} are {sorted(by_index)}, not 0..{len(by_index) - 1}")
        stack = [by_index[i] for i in range(len(by_index))]
        if len({(a.shape, a.dtype) for a in stack}) != 1:
            raise CheckpointError(f"layers of {tail!r} differ in shape or dtype; they cannot be stacked")
        out[f"{PARAMS_PREFIX}{LAYERS}.{tail}"] = np.stack(stack, axis=SCAN_AXIS)
    return out


def write_maxtext(tensors: Mapping[str, np.ndarray], directory: Path, layout: MaxTextLayout | None = None,
                  scanned: bool = True, step: int = 0) -> Path:
    """Write a MaxText parameters checkpoint: `<directory>/<step>/items` (Orbax PyTree, OCDBT + zarr3, the
    tree `params.params`) and `<step>/_CHECKPOINT_METADATA`, as MaxText's checkpoint manager does; MaxText
    loads it with `load_parameters_path=<directory>/<step>/items`. See `maxtext_tree` for the names."""
    import orbax.checkpoint as ocp

    tree = unflatten_names(maxtext_tree(tensors, layout, scanned))
    directory = Path(directory).absolute()
    step_dir = directory / str(step)
    try:
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)
        ocp.Checkpointer(handler).save(step_dir / ITEM_NAME, args=ocp.args.PyTreeSave(tree))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{directory}: cannot write MaxText checkpoint: {first[:300]}") from None
    now = time.time_ns()
    metadata = {"item_handlers": {ITEM_NAME: "orbax.checkpoint._src.handlers.pytree_checkpoint_handler."
                                             "PyTreeCheckpointHandler"},
                "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
                "commit_timestamp_nsecs": now, "custom_metadata": {}}
    (step_dir / "_CHECKPOINT_METADATA").write_text(json.dumps(metadata), encoding="utf-8")
    return directory


__all__ = ["MaxTextLayout", "MaxTextReader", "find_maxtext_item", "layer_name", "split_layer_name", "write_maxtext",
           "writer_options"]
