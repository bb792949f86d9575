"""Make the tiny models the example configs merge: `models/base`, `models/task_a`, `models/task_b`.

    python examples/configs/make_tiny_models.py              # writes examples/configs/models/ (gitignored)
    drm-jax merge examples/configs/ties.yaml merged/         # any config of this folder, from the repository root
    python examples/configs/make_tiny_models.py DIR          # or write DIR/base, DIR/task_a, DIR/task_b

Each is a 2-layer Llama (hidden size 32, vocabulary 64) as `save_pretrained` writes one: model.safetensors,
config.json, generation_config.json and a word-level tokenizer (the same 64 tokens in each). The base has
random weights (standard deviation 0.02, norms near 1); task_a and task_b are the base plus seeded noise of
standard deviation 0.02, standing in for two fine-tunings. Seeded: every run writes the same bytes. No
download and no torch: numpy, safetensors and tokenizers (a transformers dependency) only. The configs name
`models/...` relative to the current directory or, failing that, to the config's folder, so they find
these from anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

LAYERS, HIDDEN, FFN, HEADS, VOCAB = 2, 32, 64, 4, 64
TOKENS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, VOCAB)]
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
          "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
          "num_key_value_heads": HEADS, "head_dim": HIDDEN // HEADS, "vocab_size": VOCAB,
          "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
          "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32"}
TASKS = {"task_a": 1, "task_b": 2}  # name -> noise seed


def llama_shapes() -> dict[str, tuple[int, ...]]:
    """Hugging Face Llama tensor names -> shapes, (out, in) for linear weights."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        shapes.update({f"{layer}self_attn.{p}_proj.weight": (HIDDEN, HIDDEN) for p in "qkvo"})
        shapes.update({f"{layer}mlp.gate_proj.weight": (FFN, HIDDEN), f"{layer}mlp.up_proj.weight": (FFN, HIDDEN),
                       f"{layer}mlp.down_proj.weight": (HIDDEN, FFN), f"{layer}input_layernorm.weight": (HIDDEN,),
                       f"{layer}post_attention_layernorm.weight": (HIDDEN,)})
    return shapes


def tiny_models() -> dict[str, dict[str, np.ndarray]]:
    """{"base": tensors, "task_a": ..., "task_b": ...}, float32, seeded."""
    rng = np.random.default_rng(0)
    base = {n: (1.0 + 0.02 * rng.standard_normal(s) if n.endswith("norm.weight") else 0.02 * rng.standard_normal(s))
            .astype(np.float32) for n, s in llama_shapes().items()}
    out = {"base": base}
    for name, seed in TASKS.items():
        noise = np.random.default_rng(seed)
        out[name] = {n: (v + 0.02 * noise.standard_normal(v.shape)).astype(np.float32) for n, v in base.items()}
    return out


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer of TOKENS, in the files `AutoTokenizer.from_pretrained` reads."""
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(TOKENS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(directory / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128, **special}, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def make_tiny_models(root: str | Path) -> Path:
    """Write root/base, root/task_a, root/task_b; returns root."""
    root = Path(root)
    for name, tensors in tiny_models().items():
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
        (directory / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
        write_tokenizer(directory)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parent / "models",
                        help="folder to write base/, task_a/, task_b/ in (default: models/ beside this script)")
    root = make_tiny_models(parser.parse_args(argv).root)
    print(f"wrote {', '.join(str(root / n) for n in ('base', *TASKS))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
