"""Multi-stage merges: mergekit-multi's config format, planned before any tensor is read.

A multi-stage config is a YAML file of several documents separated by `---`, each a merge config with a
`name` (at most one document may have none: the final merge). A stage uses an earlier one by giving its
name where a model reference goes (`model`, `base_model`, `tokenizer_source`, `tokenizer.source`, a
slice source's `model`; `NAME+LORA` too); the name stands for that stage's output folder,
`<intermediate dir>/<name>`. The stages run in dependency order; the final stage (the unnamed one, else
the one stage no other stage uses) is written to OUT_DIR.

Refused with one line, before any checkpoint is opened: a duplicate name, a second unnamed document, a
name that is not a plain folder name, a cycle (naming it), a reference that is neither a stage name nor
an existing path (the "missing name"), several final candidates, and every stage's own config errors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from drm_jax.config.recipe import build_recipe
from drm_jax.config.schema import MergeConfig, parse_config, read_config_text
from drm_jax.config.segments import check_segments
from drm_jax.config.streaming import input_paths
from drm_jax.errors import ConfigError, quote
from drm_jax.io.bounded_yaml import YamlBoundError, load_bounded_documents

# Keys whose string values are model references (mergekit-multi patches every model reference).
REFERENCE_KEYS = frozenset({"model", "base_model", "tokenizer_source", "source"})


@dataclass(frozen=True)
class Stage:
    """One merge of a multi-stage config.

    name: the document's `name`, or None for the unnamed final merge.
    config: its checked config, stage names replaced by the folders of their outputs.
    needs: the names of the stages whose outputs it reads.
    out_dir: where it is written (OUT_DIR for the final stage, else `<intermediate dir>/<name>`).
    """

    name: str | None
    config: MergeConfig
    needs: tuple[str, ...]
    out_dir: Path
    final: bool = False

    @property
    def label(self) -> str:
        return f"stage {self.name!r}" if self.name is not None else "the unnamed final stage"


def stage_documents(config: Any) -> tuple[list[dict], Path | None] | None:
    """(the documents, the file) when `config` (a path or YAML text, as `drm_jax.merge_config` takes) is a
    multi-stage config: several documents, or one with a `name`; None otherwise (also for text that is not
    valid YAML: the single-config reader reports that)."""
    if isinstance(config, os.PathLike) or (isinstance(config, str) and "\n" not in config
                                           and (config.endswith((".yml", ".yaml")) or Path(config).is_file())):
        source: Path | None = Path(config)
        text = read_config_text(source)
    elif isinstance(config, str):
        source, text = None, config
    else:
        return None
    try:
        documents = load_bounded_documents(text)
    except (yaml.YAMLError, YamlBoundError):
        return None
    if not documents or (len(documents) == 1 and not (isinstance(documents[0], dict) and "name" in documents[0])):
        return None  # a single config: `read_config` reads (or refuses) it
    return documents, source


def _check_name(where: str, index: int, name: Any, seen: Mapping[Any, int]) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "+" in name or name != name.strip() or "\0" in name:
        raise ConfigError(f"{where}document {index + 1}: name: must be a plain folder name (no '/', '+' or "
                          f"surrounding spaces), got {quote(name)}")
    if name in seen:
        raise ConfigError(f"{where}document {index + 1}: name: duplicate stage name {name!r} (also document "
                          f"{seen[name] + 1})")


def _in_stage(where: str, label: str, err: ConfigError) -> ConfigError:
    """A stage's config error, named as `<file>: <stage>: <key>: ...`."""
    message = str(err)
    return ConfigError(f"{where}{label}: {message[len(where):] if message.startswith(where) else message}")


def _substitute(raw: Any, folders: Mapping[str, Path], used: list[str], key: str | None = None) -> Any:
    """`raw` with every model reference naming a stage replaced by that stage's folder (in `used`)."""
    if isinstance(raw, dict):
        return {k: _substitute(v, folders, used, k) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_substitute(v, folders, used, key) for v in raw]
    if isinstance(raw, str) and key in REFERENCE_KEYS:
        model, plus, adapter = raw.partition("+")
        if model in folders:
            if model not in used:
                used.append(model)
            return f"{folders[model]}{plus}{adapter}"
    return raw


def _order(where: str, needs: Mapping[Any, list[str]], names_in_file: list[Any]) -> list[Any]:
    """The stages in dependency order (file order among independent ones); a cycle raises, naming it."""
    done: list[Any] = []
    state: dict[Any, str] = {}

    def visit(name: Any, path: list[Any]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = path[path.index(name):] + [name]
            raise ConfigError(f"{where}stages form a cycle: {' -> '.join(repr(n) for n in cycle)}")
        state[name] = "active"
        for dep in needs[name]:
            visit(dep, path + [name])
        state[name] = "done"
        done.append(name)

    for name in names_in_file:
        visit(name, [])
    return done


def plan_stages(documents: list[Any], source: Path | None, out_dir: Path, intermediate_dir: Path) -> list[Stage]:
    """The stages of a multi-stage config in the order they run, every check that needs no checkpoint made.

    Raises:
      ConfigError: one line naming the file, the document or stage, and the key.
    """
    where = f"{source}: " if source is not None else "<config text>: "
    seen: dict[Any, int] = {}
    raws: list[dict] = []
    for index, doc in enumerate(documents):
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}document {index + 1}: a stage must be a mapping of keys (name, "
                              f"merge_method, models, ...), got {type(doc).__name__}")
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is None:
            if None in seen:
                raise ConfigError(f"{where}document {index + 1}: a second document without a name; only the "
                                  f"final stage may be unnamed (document {seen[None] + 1} is)")
        else:
            _check_name(where, index, name, seen)
        seen[name] = index
        raws.append({"name": name, "doc": doc})
    names = [r["name"] for r in raws]
    folders = {n: (intermediate_dir / n).absolute() for n in names if n is not None}
    needs: dict[Any, list[str]] = {}
    configs: dict[Any, MergeConfig] = {}
    for raw in raws:
        label = f"stage {raw['name']!r}" if raw["name"] is not None else "the unnamed stage"
        used: list[str] = []
        doc = _substitute(raw["doc"], folders, used)
        if raw["name"] in used:
            raise ConfigError(f"{where}stages form a cycle: {raw['name']!r} -> {raw['name']!r}")
        try:
            configs[raw["name"]] = parse_config(doc, source=source,
                                                text=yaml.safe_dump(doc, sort_keys=False))
        except ConfigError as err:
            raise _in_stage(where, label, err) from None
        needs[raw["name"]] = used
    order = _order(where, needs, names)
    used_by_any = {n for deps in needs.values() for n in deps}
    if None in seen:
        final = None
    else:
        sinks = [n for n in names if n not in used_by_any]
        if len(sinks) != 1:
            raise ConfigError(f"{where}stages {', '.join(repr(n) for n in sinks)} are used by no other stage; "
                              f"leave the final stage unnamed so that it is the one written to the output")
        final = sinks[0]
    stages = []
    for name in order:
        config = configs[name]
        label = f"stage {name!r}" if name is not None else "the unnamed stage"
        # a reference that is no stage must exist now: a misspelt stage name is refused here, not after
        # the earlier stages have run
        stage_outputs = {folders[n] for n in needs[name]}
        for path in input_paths(config, config.models):
            if path.absolute() not in stage_outputs and not path.exists():
                known = ", ".join(repr(n) for n in names if n is not None) or "none"
                raise ConfigError(f"{where}{label}: model {str(path)!r} is neither the name of a stage (stages: "
                                  f"{known}) nor an existing path")
        try:
            build_recipe(config)
            check_segments(config)
        except ConfigError as err:
            raise _in_stage(where, label, err) from None
        stages.append(Stage(name, config, tuple(needs[name]), out_dir if name == final else folders[name],
                            final=name == final))
    return stages


__all__ = ["Stage", "plan_stages", "stage_documents"]
