"""LoRA extraction: a PEFT LoRA adapter whose B A approximates each weight delta finetuned - base
(`drm_jax.extract_lora`, `drm-jax extract-lora`; docs/methods.md#extract-lora).

Which tensor becomes what (mergekit-extract-lora's rules, read from tensor names and shapes instead of
a model built from config.json):

* a 2-D linear weight (PyTorch Linear (out, in), GPT-2's Conv1D (in, out)): LoRA factors of its delta,
  rank min(max_rank, out, in), cut further where singular values are at most `sv_epsilon` times the
  largest (or at most `absolute_sv_epsilon`: mergekit's --sv-epsilon). Its bias, if any, goes in as PEFT's `lora_B.bias` (the bias
  delta; `lora_bias: true` in the config).
* embeddings (input and output, `lm_head`): saved whole from the fine-tuned model as `modules_to_save`;
  with `embed_lora=True`, LoRA factors instead (`lora_embedding_A/B` for an embedding table), unless the
  two vocabularies differ.
* every other weight (norms, convolutions, ...), and the bias of such a module: saved whole, its module
  in `modules_to_save`.
* tensors that are neither a `.weight` nor a `.bias` (buffers, free parameters), and a `.bias` whose
  module has no `.weight` (GPT-2's `attn.bias` causal-mask buffer): left out, as mergekit leaves out
  everything that is not a module's weight or its bias; listed in the result.

A tied output embedding (no `lm_head.weight` in the checkpoint, `tie_word_embeddings`) is written under
`lm_head` too: PEFT unties a module it saves, so without it the head would keep the base's embedding.

Deltas of the same shape are decomposed together (`drm_jax.math.truncated_svd`, vmapped), in chunks of
about `chunk_bytes` of float32 delta; tensors are read one chunk at a time (the next chunk is read while
the current one is decomposed) and the adapter is streamed to disk, so peak memory is about two chunks
plus the largest tensor saved whole.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.errors import CheckpointError, MergeInputError, quote
from drm_jax.io.adapter_stream import StreamingAdapterWriter
from drm_jax.io.architectures import detect_architecture, param_kind
from drm_jax.io.base import CheckpointReader, read_json
from drm_jax.io.detect import detect_format, open_checkpoint
from drm_jax.io.dtypes import is_floating
from drm_jax.io.writer import refuse_overlap
from drm_jax.math.truncated_svd import SVD_ROUTES, choose_svd_route, split_spectrum, truncated_svd

_PEFT_PREFIX = "base_model.model."
# Output embeddings by module name (mergekit asks the model for get_output_embeddings()).
_OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")
_TIED_HEAD = "lm_head"
DEFAULT_CHUNK_BYTES = 64 * 2**20
# transformers class-name endings -> PEFT task_type (mergekit always writes CAUSAL_LM).
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
               ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


@dataclasses.dataclass
class _LoraTarget:
    """One weight to factor: `name` in the adapter, `source` read from both models (they differ only for a
    tied output embedding), decomposed as stored (out, in) or transposed (Conv1D, embedding tables)."""

    name: str
    source: str
    shape: tuple[int, int]
    transposed: bool
    embedding: bool
    dtype: np.dtype
    bias: str | None = None

    @property
    def module(self) -> str:
        return self.name[: -len(".weight")]

    @property
    def full_rank(self) -> int:
        return min(self.shape)


@dataclasses.dataclass
class _Plan:
    lora: list[_LoraTarget]
    whole: list[tuple[str, str]]  # (name in the adapter, source name in the fine-tuned model)
    whole_modules: set[str]
    skipped: list[str]
    fan_in_fan_out: bool


@dataclasses.dataclass(frozen=True)
class ExtractedLora:
    """What `extract_lora` wrote.

    out_dir: the adapter directory.
    ranks: module name -> rank of its LoRA factors.
    modules_to_save: module names saved whole (from the fine-tuned model).
    skipped: tensor names left out (neither a module's `.weight` nor its `.bias`).
    routes: "(n, m)" shape -> the truncated SVD route its deltas took ("dense" or "randomized").
    """

    out_dir: Path
    ranks: dict[str, int]
    modules_to_save: tuple[str, ...]
    skipped: tuple[str, ...]
    routes: dict[str, str]


def _split_name(name: str) -> tuple[str, str | None]:
    for leaf in ("weight", "bias"):
        if name.endswith("." + leaf):
            return name[: -len(leaf) - 1], leaf
    return name, None


def _read_config(reader: CheckpointReader) -> dict:
    directory = reader.config_dir
    if directory is None or not (Path(directory) / "config.json").is_file():
        return {}
    config = read_json(Path(directory) / "config.json", "model config")
    return config if isinstance(config, dict) else {}


def _architectures(config: dict) -> list[str]:
    names = config.get("architectures")
    return [str(n) for n in names] if isinstance(names, list) else []


def _task_type(config: dict) -> str | None:
    for architecture in _architectures(config):
        for ending, task in _TASK_TYPES:
            if architecture.endswith(ending):
                return task
    return None


def _check_options(max_rank, absolute_sv_epsilon, sv_epsilon, route, chunk_bytes) -> None:
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise MergeInputError(f"max_rank must be a positive integer, got {quote(max_rank)}")
    for field, value in (("absolute_sv_epsilon", absolute_sv_epsilon), ("sv_epsilon", sv_epsilon)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise MergeInputError(f"{field} must be a finite number >= 0, got {quote(value)}")
    if sv_epsilon >= 1:
        raise MergeInputError(f"sv_epsilon must be below 1 (it keeps singular values above that fraction "
                              f"of the largest), got {sv_epsilon}")
    if route not in SVD_ROUTES:
        raise MergeInputError(f"svd_route must be one of {', '.join(SVD_ROUTES)}, got {quote(route)}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise MergeInputError(f"chunk_bytes must be a positive integer, got {quote(chunk_bytes)}")


def _open_model(path, role: str) -> CheckpointReader:
    if detect_format(path) == "peft":
        raise CheckpointError(f"{path}: the {role} model is a PEFT adapter; give a full model (drm-jax convert "
                              f"ADAPTER OUT --to hf --base BASE merges one)")
    return open_checkpoint(path)


def _plan(finetuned: CheckpointReader, base: CheckpointReader, config: dict, embed_lora: bool) -> _Plan:
    """Sort every tensor of the fine-tuned model into LoRA targets, tensors saved whole and left-out ones
    (module docstring), checking each LoRA target against the base model. Reads no tensor data."""
    arch = detect_architecture(config)
    names = list(finetuned.keys())
    lora: dict[str, _LoraTarget] = {}
    whole_modules: set[str] = set()
    skipped = []
    weights = [n for n in names if _split_name(n)[1] == "weight"]
    for name in weights:
        module = name[: -len(".weight")]
        shape, dtype = tuple(finetuned.shape(name)), np.dtype(finetuned.dtype(name))
        kind = param_kind(arch, name, len(shape)).name
        head = module.rsplit(".", 1)[-1] in _OUTPUT_EMBEDDINGS
        embedding = kind == "embedding"
        two_d_float = len(shape) == 2 and is_floating(dtype)
        if two_d_float and kind in ("linear", "conv1d") and not head:
            lora[module] = _LoraTarget(name, name, shape, kind == "conv1d", False, dtype)
        elif two_d_float and (embedding or head) and embed_lora and name in base and tuple(base.shape(name)) == shape:
            lora[module] = _LoraTarget(name, name, shape, embedding, embedding, dtype)
        else:
            whole_modules.add(module)
    for name in names:
        module, leaf = _split_name(name)
        if leaf == "bias" and module in lora:
            lora[module].bias = name
        elif leaf is None or (leaf == "bias" and module not in whole_modules):
            skipped.append(name)  # a bias without a weight is a buffer (GPT-2's attn.bias causal mask)
    whole = [(n, n) for n in names if _split_name(n)[1] is not None and _split_name(n)[0] in whole_modules]
    _add_tied_head(finetuned, base, config, arch, embed_lora, lora, whole, whole_modules)
    targets = list(lora.values())
    for target in targets:
        _check_target(finetuned, base, target)
    if not targets:
        raise MergeInputError(f"{finetuned.path}: no linear weight to extract a LoRA from (every tensor would be "
                              f"saved whole)")
    if embed_lora and any(t.embedding for t in targets) and any(t.bias for t in targets):
        raise MergeInputError(f"{finetuned.path}: embed_lora with biased linear layers cannot be loaded by PEFT "
                              f"(lora_bias does not support embeddings); extract without embed_lora")
    return _Plan(targets, whole, whole_modules, skipped, any(t.transposed and not t.embedding for t in targets))


def _add_tied_head(finetuned, base, config, arch, embed_lora, lora, whole, whole_modules) -> None:
    """A tied output embedding, written under `lm_head` from the input embedding (module docstring)."""
    head = f"{_TIED_HEAD}.weight"
    language_model = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in _architectures(config))
    if head in finetuned or not language_model or config.get("tie_word_embeddings", True) is False:
        return
    vocab = config.get("vocab_size")
    source = next((n for n in finetuned.keys() if n.endswith(".weight") and len(finetuned.shape(n)) == 2
                   and param_kind(arch, n, 2).name == "embedding" and finetuned.shape(n)[0] == vocab), None)
    if source is None:
        return
    shape, dtype = tuple(finetuned.shape(source)), np.dtype(finetuned.dtype(source))
    if embed_lora and source in base and tuple(base.shape(source)) == shape:
        lora[_TIED_HEAD] = _LoraTarget(head, source, shape, False, False, dtype)
    else:
        whole.append((head, source))
        whole_modules.add(_TIED_HEAD)


def _check_target(finetuned: CheckpointReader, base: CheckpointReader, target: _LoraTarget) -> None:
    for name in (target.source, target.bias):
        if name is None:
            continue
        if name not in base:
            raise MergeInputError(f"{base.path}: tensor {name!r} of the fine-tuned model {finetuned.path} is missing "
                                  f"from the base model")
        if tuple(base.shape(name)) != tuple(finetuned.shape(name)):
            raise MergeInputError(f"{name!r}: shape {tuple(finetuned.shape(name))} in the fine-tuned model "
                                  f"{finetuned.path} but {tuple(base.shape(name))} in the base model {base.path}")
        if not is_floating(np.dtype(base.dtype(name))):
            raise MergeInputError(f"{base.path}: tensor {name!r} has dtype {base.dtype(name)}, not a float")


def _out_dtype(finetuned: CheckpointReader, base: CheckpointReader, name: str) -> np.dtype:
    ft, bs = np.dtype(finetuned.dtype(name)), np.dtype(base.dtype(name))
    return ft if ft == bs else np.result_type(ft, bs)


@functools.partial(jax.jit, static_argnames=("rank", "route", "transposed"))
def _factor_chunk(finetuned, base, *, rank: int, route: str, transposed: bool):
    """B (K, out, k), A (K, k, in), S (K, k) and finiteness (K,) of the deltas finetuned - base (float32)."""
    delta = finetuned.astype(jnp.float32) - base.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(delta), axis=(1, 2))
    if transposed:
        delta = jnp.swapaxes(delta, 1, 2)
    u, s, vh = truncated_svd(jnp.where(finite[:, None, None], delta, 0.0), rank, route)
    b, a = split_spectrum(u, s, vh)
    return b, a, s, finite


def _chunks(targets: list[_LoraTarget], chunk_bytes: int):
    """Same-shaped targets in chunks of about `chunk_bytes` float32 delta bytes, all of one chunk size per
    shape (the last padded), so each shape compiles once."""
    groups: dict[tuple, list[_LoraTarget]] = {}
    for target in targets:
        groups.setdefault((target.shape, target.transposed), []).append(target)
    for (shape, transposed), members in groups.items():
        per_chunk = max(1, chunk_bytes // (4 * shape[0] * shape[1]))
        count = -(-len(members) // per_chunk)
        size = -(-len(members) // count)
        for start in range(0, len(members), size):
            yield shape, transposed, size, members[start:start + size]


def _read_stack(reader: CheckpointReader, names: list[str], size: int, shape, dtype) -> np.ndarray:
    stack = np.zeros((size, *shape), dtype)
    for i, name in enumerate(names):
        stack[i] = reader.get(name)
    return stack


def _kept_rank(s: np.ndarray, absolute_sv_epsilon: float, sv_epsilon: float) -> int:
    """mergekit's rule (rank = min(max_rank, count of S > absolute_sv_epsilon)), and the relative cut."""
    rank = s.shape[0]
    if absolute_sv_epsilon > 0:
        rank = min(rank, int(np.sum(s > absolute_sv_epsilon)))
    if sv_epsilon > 0:
        rank = min(rank, int(np.sum(s > sv_epsilon * s[0])))
    return rank


def _config_keys(modules: set[str], every_module: set[str], matches) -> list[str]:
    """PEFT config entries naming exactly `modules`: the last name component where every module it
    selects (by PEFT's matching rule `matches(module, key)`) is one of them, else the full names."""
    keys = []
    for leaf in sorted({m.rsplit(".", 1)[-1] for m in modules}):
        selected = {m for m in every_module if matches(m, leaf)}
        keys.extend([leaf] if selected <= modules else sorted(m for m in modules if m.rsplit(".", 1)[-1] == leaf))
    return keys


def _adapter_config(plan: _Plan, ranks: dict[str, int], every_module: set[str], base_path, task_type) -> dict:
    rank = max(ranks.values())
    different = {m: r for m, r in ranks.items() if r != rank}
    lora_modules = set(ranks)
    # PEFT: target_modules entries match a module by equality or ".key" ending, modules_to_save by any ending
    targets = _config_keys(lora_modules, every_module, lambda m, k: m == k or m.endswith("." + k))
    saved = _config_keys(plan.whole_modules, every_module, lambda m, k: m.endswith(k))
    return {
        "base_model_name_or_path": str(base_path), "peft_type": "LORA", "task_type": task_type,
        "r": rank, "lora_alpha": rank, "rank_pattern": different, "alpha_pattern": different,  # scaling 1
        "target_modules": targets, "modules_to_save": saved or None, "fan_in_fan_out": plan.fan_in_fan_out,
        "lora_bias": any(t.bias for t in plan.lora), "bias": "none", "lora_dropout": 0.0, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
    }


def _write_factors(writer, target: _LoraTarget, b: np.ndarray, a: np.ndarray, rank: int, dtype) -> int:
    if rank == 0:  # nothing above the cut: a zero update, at the smallest rank PEFT accepts
        rank, b, a = 1, np.zeros_like(b[:, :1]), np.zeros_like(a[:1])
    prefix = f"{_PEFT_PREFIX}{target.module}"
    a_name, b_name = ((f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B") if target.embedding
                      else (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"))
    writer.add(a_name, np.ascontiguousarray(a[:rank]).astype(dtype))
    writer.add(b_name, np.ascontiguousarray(b[:, :rank]).astype(dtype))
    return rank


def _write_bias(writer, finetuned, base, target: _LoraTarget) -> None:
    delta = finetuned.get(target.bias).astype(np.float32) - base.get(target.bias).astype(np.float32)
    if not np.all(np.isfinite(delta)):
        raise MergeInputError(f"{target.bias!r}: the delta finetuned - base is not finite (NaN or Inf)")
    writer.add(f"{_PEFT_PREFIX}{target.module}.lora_B.bias", delta.astype(_out_dtype(finetuned, base, target.bias)))


def _extract(finetuned, base, plan: _Plan, writer, max_rank, absolute_sv_epsilon, sv_epsilon, route, chunk_bytes):
    ranks: dict[str, int] = {}
    routes: dict[str, str] = {}
    chunks = list(_chunks(plan.lora, chunk_bytes))

    def dispatch(chunk):  # reads one chunk and starts its decomposition (JAX runs it asynchronously)
        shape, transposed, size, members = chunk
        sources = [t.source for t in members]
        ft_stack = _read_stack(finetuned, sources, size, shape, finetuned.dtype(sources[0]))
        base_stack = _read_stack(base, sources, size, shape, base.dtype(sources[0]))
        rank = min(max_rank, *shape)
        decomposed = shape[::-1] if transposed else shape
        routes[f"{decomposed}"] = choose_svd_route(decomposed, rank, route)
        return members, _factor_chunk(ft_stack, base_stack, rank=rank, route=route, transposed=transposed)

    pending = dispatch(chunks[0]) if chunks else None
    for index in range(len(chunks)):
        members, result = pending
        pending = dispatch(chunks[index + 1]) if index + 1 < len(chunks) else None  # overlaps the SVDs
        b, a, s, finite = (np.asarray(x) for x in result)
        for i, target in enumerate(members):
            if not finite[i]:
                raise MergeInputError(f"{target.source!r}: the delta finetuned - base is not finite (NaN or Inf)")
            dtype = _out_dtype(finetuned, base, target.source)
            kept = _kept_rank(s[i], absolute_sv_epsilon, sv_epsilon)
            ranks[target.module] = _write_factors(writer, target, b[i], a[i], kept, dtype)
            if target.bias is not None:
                _write_bias(writer, finetuned, base, target)
    for name, source in plan.whole:
        writer.add(f"{_PEFT_PREFIX}{name}", finetuned.get(source))
    return ranks, routes


def extract_lora(finetuned: str | Path, base: str | Path, out_dir: str | Path, *, max_rank: int,
                 absolute_sv_epsilon: float = 0.0, sv_epsilon: float = 0.0, embed_lora: bool = False,
                 svd_route: str = "auto", overwrite: bool = False,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ExtractedLora:
    """Write a PEFT LoRA adapter to `out_dir` whose B A approximates each delta finetuned - base
    (mergekit-extract-lora's job; module docstring, docs/methods.md#extract-lora).

    Args:
      finetuned, base: model checkpoints (directories or files in any format `open_checkpoint` reads;
        not PEFT adapters), with the same tensor names; config.json is read for the architecture.
      out_dir: the adapter directory (adapter_config.json, adapter_model.safetensors), written atomically.
      max_rank: the largest rank of any factor pair (a module smaller than it gets min(out, in): exact).
        At most the largest min(out, in) of the weights decomposed.
      absolute_sv_epsilon: keep only singular values above it (mergekit's --sv-epsilon; 0: off).
      sv_epsilon: keep only singular values above it times the matrix's largest (0: off).
      embed_lora: LoRA factors for embeddings and the output head too (default: saved whole).
      svd_route: "auto", "dense" or "randomized" (drm_jax.math.truncated_svd).
      overwrite: replace an existing non-empty `out_dir`.
      chunk_bytes: float32 delta bytes decomposed together (default 64 MiB).

    Returns:
      ExtractedLora (ranks per module, modules saved whole, left-out tensors, SVD routes).

    Raises:
      DrmJaxError (one line naming the file or tensor) on bad options or inputs, before anything is
      written; inputs are only read.
    """
    _check_options(max_rank, absolute_sv_epsilon, sv_epsilon, svd_route, chunk_bytes)
    refuse_overlap(out_dir, [finetuned, base])
    with _open_model(finetuned, "fine-tuned") as ft_reader, _open_model(base, "base") as base_reader:
        config = _read_config(ft_reader)
        plan = _plan(ft_reader, base_reader, config, embed_lora)
        largest = max(t.full_rank for t in plan.lora)
        if max_rank > largest:
            raise MergeInputError(f"max_rank {max_rank} exceeds the full rank of every weight to decompose "
                                  f"(largest min(out, in) is {largest}); {largest} gives exact factors")
        every_module = {n.rsplit(".", k)[0] for n in ft_reader.keys() for k in range(1, n.count(".") + 1)}
        every_module |= {_TIED_HEAD} & (plan.whole_modules | {t.module for t in plan.lora})  # a tied head
        with StreamingAdapterWriter(out_dir, overwrite=overwrite) as writer:
            ranks, routes = _extract(ft_reader, base_reader, plan, writer, int(max_rank), float(absolute_sv_epsilon),
                                     float(sv_epsilon), svd_route, chunk_bytes)
            writer.adapter_config = _adapter_config(plan, ranks, every_module, base, _task_type(config))
    return ExtractedLora(Path(out_dir), ranks, tuple(sorted(plan.whole_modules)), tuple(plan.skipped), routes)


__all__ = ["DEFAULT_CHUNK_BYTES", "ExtractedLora", "extract_lora"]
