"""The side files of a model directory (config, generation config, tokenizer, chat template) that a merge
or a conversion reads or copies into its output, and the one rule each of them must pass.

A side file is used only when it is a regular file inside its model directory, or reached by a symbolic
link that the Hugging Face cache layout explains: `<repo>/snapshots/<revision>/NAME` pointing at a file of
the same `<repo>/blobs/`. Any other link (to /proc/self/environ, to a key file of the user, to another
model) is refused, so no file from outside the inputs reaches an output.

Tokenizers are loaded by transformers from a private copy of the allowed files (`stage_tokenizer_files`),
never from the model directory itself: transformers then sees no other file of the checkpoint (no
`tokenization_*.py`), and reads nothing we did not check.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from drm_jax.errors import UnsafeFileError, quote_path

# Files a transformers tokenizer may read beside tokenizer.json (its vocabulary files, the chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
# Vocabulary file names of other transformers tokenizers, read (never copied as is) when a tokenizer loads.
OTHER_VOCABULARY_FILES = ("spm.model", "source.spm", "target.spm", "bpe.codes", "vocab.model", "qwen.tiktoken",
                          "tokenizer.tiktoken")
ADDITIONAL_TEMPLATES_DIR = "additional_chat_templates"


def _in_hf_blobs(root: Path, target: Path) -> bool:
    """Whether `target` is a blob of the Hugging Face cache repository whose snapshot is `root`
    (`<repo>/snapshots/<revision>` -> `<repo>/blobs/<hash>`)."""
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


def safe_model_file(model_dir: str | os.PathLike, name: str) -> Path | None:
    """The real path of side file `name` of `model_dir`, None when there is no such entry.

    Raises UnsafeFileError (naming the file) when the entry is a link leading out of the model directory
    (other than a Hugging Face cache snapshot's link into its blobs), a broken or looping link, or not a
    regular file (a directory, FIFO, device or socket). The returned path is the checked target: read or
    copy that one.
    """
    path = Path(model_dir) / name
    if not os.path.lexists(path):
        return None
    try:
        root = Path(model_dir).resolve(strict=True)
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise UnsafeFileError(f"{quote_path(path)}: a broken or looping symbolic link; refused") from None
    if root not in target.parents and not _in_hf_blobs(root, target):
        raise UnsafeFileError(f"{quote_path(path)}: a symbolic link to {quote_path(target)}, outside the model "
                              f"directory; files are only read from inside their model directory (or a Hugging "
                              f"Face cache snapshot's blobs); refused")
    try:
        mode = os.stat(target).st_mode
    except OSError as err:
        raise UnsafeFileError(f"{quote_path(path)}: cannot stat: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        raise UnsafeFileError(f"{quote_path(path)}: not a regular file; refused")
    return target


def copy_model_files(model_dir: str | os.PathLike | None, names, destination: Path) -> list[Path]:
    """Copy each of `names` that `model_dir` has (checked by `safe_model_file`) into `destination`.

    Every name is checked before anything is copied, so a refusal leaves `destination` as it was."""
    if model_dir is None:
        return []
    found = [(name, safe_model_file(model_dir, name)) for name in names]
    copied = []
    for name, source in found:
        if source is not None:
            copied.append(Path(shutil.copy2(source, Path(destination) / name)))
    return copied


def stage_tokenizer_files(model_dir: str | os.PathLike, destination: Path) -> None:
    """Copy the files a tokenizer of `model_dir` may read (config.json, the tokenizer and vocabulary files,
    chat templates, `additional_chat_templates/*.jinja`) into the empty directory `destination`, each
    checked by `safe_model_file`. Nothing else (no code, no weights) is copied."""
    names = ["config.json", *TOKENIZER_FILES, *OTHER_VOCABULARY_FILES]
    extra = Path(model_dir) / ADDITIONAL_TEMPLATES_DIR
    if extra.is_dir() and not extra.is_symlink():
        (Path(destination) / ADDITIONAL_TEMPLATES_DIR).mkdir()
        names += [f"{ADDITIONAL_TEMPLATES_DIR}/{entry.name}" for entry in sorted(extra.iterdir())
                  if entry.name.endswith(".jinja")]
    copy_model_files(model_dir, names, destination)


__all__ = ["TOKENIZER_FILES", "copy_model_files", "safe_model_file", "stage_tokenizer_files"]
