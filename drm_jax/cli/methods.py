"""`drm-jax methods`: every registered merge method with its parameters, defaults and paper.

Read from the method registry (`drm_jax.methods.registry`), the one place parameters are declared.
"""

from __future__ import annotations

import argparse
import json

from drm_jax.methods.registry import METHODS, get_method


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("methods", help="list the merge methods with their parameters and papers",
                                   description="List every merge method: its parameters (default, range, whether "
                                               "it is traced or structure, per model or shared), and its paper.")
    parser.add_argument("method", nargs="?", help="show only this method")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)
    return parser


def describe(spec) -> dict:
    return {
        "name": spec.name, "summary": spec.summary, "paper": spec.paper, "reference": spec.reference,
        "needs_base": spec.needs_base, "elementwise": spec.elementwise, "random": spec.random,
        "base": spec.base, "min_models": spec.min_models, "max_models": spec.max_models,
        "parameters": [{
            "name": p.name, "aliases": list(p.aliases), "kind": p.describe(), "default": p.default,
            "mergekit_default": p.mergekit_default, "traced": p.traced, "per_model": p.per_model, "doc": p.doc,
            "required": p.required,
        } for p in spec.params],
        "data": [{"name": d.name, "doc": d.doc} for d in spec.leaf_data],
    }


def render(spec) -> str:
    facts = [f for f, on in (("needs a base", spec.needs_base), ("elementwise", spec.elementwise),
                             ("random", spec.random)) if on]
    lines = [f"{spec.name}: {spec.summary}", f"  paper: {spec.paper or '-'}",
             f"  {', '.join(facts) or 'not elementwise'}; reference: {spec.reference}"]
    if spec.base != "required" or spec.min_models != 1 or spec.max_models is not None:
        base = {"required": "base_model required", "optional": "base_model optional (without it: the models' "
                "own weights)", "input": "base_model is one more input"}[spec.base]
        count = ("any number of models" if spec.min_models == 1 and spec.max_models is None else
                 f"exactly {spec.min_models} model{'s' if spec.min_models != 1 else ''}"
                 if spec.min_models == spec.max_models else
                 f"at least {spec.min_models} models" if spec.max_models is None else
                 f"{spec.min_models} to {spec.max_models} models")
        lines.append(f"  {base}; merges {count}")
    lines.append("  parameters:")
    for p in spec.params:
        default = repr(p.default)
        if p.mergekit_default is not None:
            default += f" (YAML, as mergekit: {p.mergekit_default!r})"
        names = p.name + (f" (also {', '.join(p.aliases)})" if p.aliases else "")
        tags = ("traced" if p.traced else "static") + (", per model" if p.per_model else "") + \
            (", required in YAML" if p.required else "")
        lines.append(f"    {names}: {p.describe()}, default {default} [{tags}]: {p.doc}")
    for d in spec.leaf_data:
        lines.append(f"    {d.name}: per-leaf data, required [Python API only]: {d.doc}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    specs = [get_method(args.method)] if args.method else list(METHODS.values())
    if args.json:
        print(json.dumps([describe(s) for s in specs], indent=2))
    else:
        print("\n\n".join(render(s) for s in specs))
    return 0


__all__ = ["describe", "register", "run"]
