"""Repository code never runs (issue 23, class 1): a checkpoint whose config.json and tokenizer_config.json
name their own Python classes (`auto_map`) and ship `configuration_*.py` / `tokenization_*.py` that would
write a marker file, placed in every position a tokenizer or config is read from. With stdin answering
"y", the marker never appears, nothing asks a question, and each merge that needs the tokenizer is
refused in one line naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import leftovers, refused, tree_digest, write_merge_config

VOCABULARY = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29)]  # the tiny family's 32 rows
TEMPLATE = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
CODE = "import pathlib\npathlib.Path({marker!r}).write_text('the checkpoint ran its code')\n"
AUTO_MAP = {"AutoConfig": "configuration_evil.EvilConfig", "AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}


def add_tokenizer(directory: Path, template: str | None = TEMPLATE) -> None:
    """A WordLevel tokenizer of the tiny family's 32 tokens, as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCABULARY)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
              "eos_token": "</s>", "model_max_length": 32}
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def make_evil(directory: Path, marker: Path, model_type: str = "evil") -> None:
    """Give `directory` an auto_map in config.json and tokenizer_config.json, and the code it names."""
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type=model_type, auto_map=AUTO_MAP)
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": AUTO_MAP["AutoTokenizer"]})
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name in ("configuration_evil.py", "tokenization_evil.py"):
        (directory / name).write_text(CODE.format(marker=str(marker)))


@pytest.fixture
def models(family) -> Path:
    for name in ("base", "task_a", "task_b"):
        add_tokenizer(family / name)
    return family


# Every position a tokenizer or a config is read from: (evil model, extra config lines).
POSITIONS = {
    "base, tokenizer_source base": ("base", "tokenizer_source: base\n"),
    "merged model, tokenizer_source base": ("task_a", "tokenizer_source: base\n"),
    "merged model, tokenizer_source union": ("task_b", "tokenizer_source: union\n"),
    "tokenizer_source names it": ("task_b", "tokenizer_source: {task_b}\n"),
    "tokenizer block": ("task_b", "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n"),
    "chat_template auto, merged model": ("task_b", "chat_template: auto\n"),
    "chat_template auto, base": ("base", "chat_template: auto\n"),
    "named chat_template, base": ("base", "chat_template: chatml\n"),
}


def _cases(root: Path, models: Path) -> list[tuple[str, list[str], str]]:
    """(case name, argv, evil model) for every position, each with its own copy of the models."""
    cases = []
    for i, (name, (evil, extra)) in enumerate(POSITIONS.items()):
        where = root / f"case{i}"
        shutil.copytree(models, where / "models", symlinks=True)
        make_evil(where / "models" / evil, root / "MARKER")
        m = where / "models"
        config = write_merge_config(where, m / "base", m / "task_a", m / "task_b",
                                    extra=extra.format(task_b=m / "task_b"))
        cases.append((name, ["merge", str(config), str(where / "out"), "--quiet"], evil))
    return cases


DRIVER = """
import json, sys
from drm_jax.cli.main import main
for name, argv in json.loads(sys.argv[1]):
    print("@@ " + name, file=sys.stderr, flush=True)
    print("@@ " + name, flush=True)
    code = main(argv)
    print("@@ exit %d" % code, file=sys.stderr, flush=True)
"""


def test_no_position_runs_the_code_or_reads_stdin(tmp_path, models):
    cases = _cases(tmp_path, models)
    before = tree_digest([tmp_path / f"case{i}" / "models" for i in range(len(cases))])
    # one process for every case (a process start costs seconds); stdin answers every question "y"
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([(n, a) for n, a, _ in cases])],
                          input="y\n" * 40, capture_output=True, text=True, timeout=300)
    assert not (tmp_path / "MARKER").exists(), "the checkpoint's code ran"
    for stream in (proc.stdout, proc.stderr):
        assert "[y/N]" not in stream and "custom code?" not in stream and "trust_remote_code" not in stream, stream
        assert "Traceback" not in stream, stream[-3000:]
    sections = proc.stderr.split("@@ ")[1:]
    assert len(sections) == 2 * len(cases), proc.stderr[-3000:]
    for i, (name, argv, evil) in enumerate(cases):
        head, body = sections[2 * i].split("\n", 1)
        assert head == name
        lines = [line for line in body.splitlines() if line.strip()]
        assert sections[2 * i + 1].strip() == "exit 2", (name, body)
        assert len(lines) == 1 and lines[0].startswith("drm-jax: error: "), (name, body)
        assert "auto_map" in lines[0] and "never runs code" in lines[0], (name, lines[0])
        assert str(tmp_path / f"case{i}" / "models" / evil) in lines[0], (name, lines[0])
        out = Path(argv[2])
        assert not out.exists() and leftovers(out) == [], name
    assert tree_digest([tmp_path / f"case{i}" / "models" for i in range(len(cases))]) == before


@pytest.mark.parametrize("position", ["base, tokenizer_source base", "merged model, tokenizer_source union",
                                      "chat_template auto, merged model"])
def test_refusal_contract(tmp_path, capfd, models, position):
    evil, extra = POSITIONS[position]
    make_evil(models / evil, tmp_path / "MARKER")
    config = write_merge_config(tmp_path, models / "base", models / "task_a", models / "task_b", extra=extra)
    out = tmp_path / "out"
    line = refused(capfd, ["merge", config, out, "--quiet"], out, [models, config], [models / evil, "auto_map"])
    assert "config.json" in line
    assert not (tmp_path / "MARKER").exists()


def test_known_model_type_loads_without_the_code(tmp_path, capfd, models):
    """A known model_type with an auto_map (many Hub repositories): the tokenizer loads with
    transformers' own classes, the checkpoint's code untouched; or it is refused in one line."""
    make_evil(models / "task_b", tmp_path / "MARKER", model_type="llama")
    config = write_merge_config(tmp_path, models / "base", models / "task_a", models / "task_b",
                                extra="tokenizer_source: union\n")
    from drm_jax.cli.main import main

    code = main(["merge", str(config), str(tmp_path / "out"), "--quiet"])
    err = capfd.readouterr().err
    assert not (tmp_path / "MARKER").exists()
    if code == 0:
        assert (tmp_path / "out" / "tokenizer.json").is_file()
    else:
        assert code == 2 and len(err.strip().splitlines()) == 1 and "auto_map" in err, err


@pytest.mark.parametrize("command", ["merge", "convert"])
def test_plain_merge_and_convert_copy_the_files_without_running_them(tmp_path, capfd, models, command):
    """Without tokenizer settings nothing is loaded: the files are copied as they are, no code runs."""
    from drm_jax.cli.main import main

    make_evil(models / "base", tmp_path / "MARKER")
    out = tmp_path / "out"
    if command == "merge":
        config = write_merge_config(tmp_path, models / "base", models / "task_a", models / "task_b")
        argv = ["merge", str(config), str(out), "--quiet"]
    else:
        argv = ["convert", str(models / "base"), str(out), "--to", "flax"]
    assert main(argv) == 0, capfd.readouterr().err
    assert not (tmp_path / "MARKER").exists()
    assert json.loads((out / "tokenizer_config.json").read_text())["auto_map"]  # copied as it is
    assert not list(out.glob("*.py"))  # the code is never copied
