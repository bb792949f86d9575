"""Tiny Hugging Face checkpoints for the command-line tests: random weights from tiny configs, no downloads.

`llama_family` / `t5_family` / `gpt2_family` (session-scoped): a base model and two "fine-tuned" models
(the base plus seeded noise), saved with transformers' `save_pretrained` under
`<root>/models/{base,task_a,task_b}`, the layout the example configs in `examples/configs/` expect.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "configs"
TASKS = ("task_a", "task_b")


def _tokenizer_stub(directory: Path, vocab_size: int = 64) -> None:
    """A real tokenizer (one WordLevel vocabulary of `vocab_size` tokens, the same in every model, so
    `tokenizer_source` changes no embedding row) whose tokenizer_config.json records the directory it was
    written for ("source"), to check which model's tokenizer reaches the output."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab_size)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            model_max_length=64).save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "source": directory.name}))


def _save_family(root: Path, model_class: str, config_class: str, noise: float = 0.02, **config) -> Path:
    """Save transformers' `model_class` (a torch model) built from `config_class(**config)` as a family."""
    torch = pytest.importorskip("torch")  # the optional torch extra
    import transformers

    model_cls = getattr(transformers, model_class)
    config = getattr(transformers, config_class)(**config)
    torch.manual_seed(0)
    base = model_cls(config).eval()
    base.save_pretrained(root / "models" / "base")
    _tokenizer_stub(root / "models" / "base")
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for t, name in enumerate(TASKS):
        gen = torch.Generator().manual_seed(100 + t)
        model = model_cls(config).eval()
        tuned = {k: (v + noise * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
                 for k, v in state.items()}
        model.load_state_dict(tuned)
        model.save_pretrained(root / "models" / name)
        _tokenizer_stub(root / "models" / name)
    return root


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> Path:
    return _save_family(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM", "LlamaConfig", vocab_size=64,
                        hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, max_position_embeddings=64)


@pytest.fixture(scope="session")
def t5_family(tmp_path_factory) -> Path:
    return _save_family(tmp_path_factory.mktemp("t5"), "T5ForConditionalGeneration", "T5Config", vocab_size=64,
                        d_model=32, d_ff=32, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0)


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory) -> Path:
    """GPT-2: its attention and MLP weights are Conv1D, stored (in, out) under Hugging Face names."""
    return _save_family(tmp_path_factory.mktemp("gpt2"), "GPT2LMHeadModel", "GPT2Config", vocab_size=64,
                        n_positions=32, n_embd=32, n_layer=2, n_head=4)


def _read_safetensors_dir(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a (possibly sharded) safetensors directory, as float32/int numpy arrays."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        for name, tensor in load_file(str(f)).items():
            out[name] = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    return out


@contextlib.contextmanager
def _tensor_reads_refused(monkeypatch):
    """Reading any tensor's data from a safetensors checkpoint raises (headers stay readable): what a dry
    run must never do. `monkeypatch`: pytest's fixture or a `pytest.MonkeyPatch`."""
    from drm_jax.io.safetensors_io import SafetensorsFile, SafetensorsReader

    def refuse(*_args, **_kwargs):
        raise AssertionError("tensor data was read")

    with monkeypatch.context() as patch:
        patch.setattr(SafetensorsFile, "read", refuse)
        patch.setattr(SafetensorsReader, "get", refuse)
        yield


@pytest.fixture(scope="session")
def tensor_reads_refused():
    """tensor_reads_refused(monkeypatch) -> a context manager in which reading tensor data raises."""
    return _tensor_reads_refused


@pytest.fixture(scope="session")
def read_output():
    """read_output(directory) -> {name: array} of a (possibly sharded) safetensors directory."""
    return _read_safetensors_dir


def _save_lora_adapter(model_dir: Path, out: Path, targets: list[str], r: int, alpha: int, seed: int):
    """A PEFT LoRA adapter over the model in `model_dir`, with random B (PEFT starts it at zero), saved to
    `out`; returns lora_delta(module) -> (alpha / r) * B @ A of that module ("model.layers.0.self_attn.v_proj")."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def lora_delta(module: str) -> np.ndarray:
        prefix = f"base_model.model.{module}"
        lora_a = next(v for k, v in state.items() if k.startswith(prefix + ".lora_A"))
        lora_b = next(v for k, v in state.items() if k.startswith(prefix + ".lora_B"))
        return (alpha / r) * lora_b @ lora_a

    return lora_delta


@pytest.fixture(scope="session")
def lora_adapter():
    """lora_adapter(model_dir, out, targets, r, alpha, seed) -> lora_delta(module); see _save_lora_adapter."""
    return _save_lora_adapter
