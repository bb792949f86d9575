"""The README.md model card and mergekit_config.yml that `drm-jax merge` writes beside the weights.

The card has the layout of the one mergekit 0.1.5 writes, so a Hugging Face model page shows the same
metadata: YAML front matter with `base_model` (the inputs that name Hugging Face Hub repositories: no
local path), `library_name: transformers` and the tags `mergekit`, `merge`; then the merge method with
its paper (from the method registry, `MethodSpec.paper`), the base model, the other models, and the
configuration as given. Local paths are never looked up on the Hub (mergekit asks the Hub about short
relative paths that exist locally; here a path that exists is local).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import yaml

from drm_jax.config.schema import MergeConfig
from drm_jax.errors import escape_controls
from drm_jax.io.writer import CARD_MARK
from drm_jax.methods.registry import get_method

TAGS = ("mergekit", "merge")
_ARXIV = re.compile(r"arXiv[: ]\s*(\d{4}\.\d{4,5})")
# A Hugging Face Hub repository id: `name` or `owner/name`.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)?")
# Characters that start Markdown links, images and code spans inside a line (emphasis is left alone: a
# path's underscores stay readable, and emphasis cannot hide or add anything).
_MARKDOWN_SYNTAX = re.compile(r"[\\`\[\]!]")
# Methods whose base model is an interpolation endpoint rather than a base (listed with the models).
NO_BASE_IN_CARD = frozenset({"slerp"})


def split_reference(config: MergeConfig, reference: str) -> tuple[str, str | None]:
    """(model, adapter or None) as written, for mergekit's `model+adapter` form."""
    if "+" not in reference or config.resolve(reference).exists():
        return reference, None
    model, adapter = reference.rsplit("+", 1)
    return model, adapter


def is_hub_id(config: MergeConfig, path: str) -> bool:
    """Whether a reference names a Hugging Face Hub repository: `name` or `owner/name` in the Hub's
    characters (letters, digits, '-', '_', '.'), not dot-relative, and nothing by that name on disk."""
    if not path or path[0] == "." or _HUB_ID.fullmatch(path) is None:
        return False
    return not config.local_path(path).exists()


def markdown_text(text: str) -> str:
    """`text` shown as it is in Markdown: one line (control characters escaped), no HTML (`<`, `>`, `&`
    as entities), no link, image or code span (a backslash before the characters that make them)."""
    text = escape_controls(str(text))
    text = _MARKDOWN_SYNTAX.sub(lambda m: "\\" + m.group(), text)
    return html.escape(text, quote=False)


def code_block(text: str, info: str = "") -> str:
    """A fenced code block holding `text`: the fence is longer than any run of backticks in it, so no
    line of the text can close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}\n"


def referenced_models(config: MergeConfig) -> list[str]:
    """Every model reference of the config, the base first, then the models in config order."""
    refs: list[str] = []
    for ref in ([config.base_model] if config.base_model else []) + [m.model for m in config.models]:
        if ref not in refs:
            refs.append(ref)
    return refs


def hub_models(config: MergeConfig) -> list[str]:
    """The front matter's `base_model`: the Hub repositories among the models and their adapters."""
    found: list[str] = []
    for ref in referenced_models(config):
        for part in split_reference(config, ref):
            if part is not None and is_hub_id(config, part) and part not in found:
                found.append(part)
    return found


def model_markdown(config: MergeConfig, reference: str) -> str:
    """A model as the card lists it: a link for a Hub repository, the path otherwise; ` + adapter`."""
    def one(path: str) -> str:
        return f"[{path}](https://huggingface.co/{path})" if is_hub_id(config, path) else markdown_text(path)

    model, adapter = split_reference(config, reference)
    return one(model) + (f" + {one(adapter)}" if adapter is not None else "")


def method_markdown(method: str) -> str:
    """The method's name with its paper, linked to arXiv where the registry gives an arXiv id."""
    spec = get_method(method)
    if not spec.paper:
        return f"`{method}`"
    match = _ARXIV.search(spec.paper)
    paper = f"[{spec.paper}](https://arxiv.org/abs/{match.group(1)})" if match else spec.paper
    return f"`{method}` ({paper})"


def config_yaml(config: MergeConfig) -> str:
    """The configuration as given (the file's text), or a YAML rendering of a config built in Python."""
    if config.text is not None:
        return config.text
    raw: dict = {"merge_method": config.merge_method}
    if config.base_model is not None:
        raw["base_model"] = config.base_model
    raw["models"] = [{"model": m.model, **({"parameters": dict(m.parameters)} if m.parameters else {})}
                     for m in config.models]
    if config.parameters:
        raw["parameters"] = dict(config.parameters)
    for key in ("dtype", "out_dtype", "tokenizer_source", "chat_template"):
        if getattr(config, key) is not None:
            raw[key] = getattr(config, key)
    if config.tokenizer is not None:
        block: dict = {"source": config.tokenizer.source}
        if config.tokenizer.tokens:
            block["tokens"] = {tok: _setting_dict(s) for tok, s in config.tokenizer.tokens}
        if config.tokenizer.pad_to_multiple_of:
            block["pad_to_multiple_of"] = config.tokenizer.pad_to_multiple_of
        raw["tokenizer"] = block
    return yaml.safe_dump(raw, sort_keys=False).rstrip()


def _setting_dict(setting) -> dict:
    source = setting.source
    out: dict = {}
    if source.kind == "model":
        out["source"] = source.model
    elif source.kind == "zero":
        out["source"] = {"kind": "zero"}
    elif source.kind == "model_token":
        out["source"] = {"kind": "model_token", "model": source.model,
                         **({"token_id": source.token_id} if source.token_id is not None else {"token": source.token})}
    if setting.force:
        out["force"] = True
    return out


def generate_card(config: MergeConfig, name: str | None = None, config_text: str | None = None) -> str:
    """The README.md text of a merge's output directory named `name`."""
    name = name or "Untitled merge"
    front = yaml.safe_dump({"base_model": hub_models(config), "library_name": "transformers", "tags": list(TAGS)})
    base = None if config.merge_method in NO_BASE_IN_CARD else config.base_model
    base_text = f", with {model_markdown(config, base)} as the base model" if base else ""
    others = [f"* {model_markdown(config, ref)}" for ref in referenced_models(config) if ref != base]
    text = config_yaml(config) if config_text is None else config_text
    return (
        f"---\n{front}---\n"
        f"# {markdown_text(name)}\n\n"
        f"This model is a merge of pre-trained language models, {CARD_MARK} from a mergekit-style "
        f"configuration.\n\n"
        f"## Merge Details\n"
        f"### Merge Method\n\n"
        f"The models were merged with the {method_markdown(config.merge_method)} merge method{base_text}.\n\n"
        f"### Models Merged\n\n"
        f"The following models were included in the merge:\n"
        + "\n".join(others) + "\n\n"
        f"### Configuration\n\n"
        f"The following YAML configuration was used to produce this model:\n\n"
        + code_block(text.rstrip(), "yaml")
    )


def write_card_files(directory: Path, config: MergeConfig, name: str) -> None:
    """README.md and mergekit_config.yml (the config as given) inside `directory`."""
    text = config_yaml(config)
    (Path(directory) / "mergekit_config.yml").write_text(text, encoding="utf-8")
    (Path(directory) / "README.md").write_text(generate_card(config, name, text), encoding="utf-8")


__all__ = ["referenced_models", "write_card_files"]
