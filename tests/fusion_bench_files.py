"""FusionBench 0.2.33's WUDI and RegMean functions, loaded from their files where fusion-bench is installed.

fusion_bench/__init__ imports omegaconf, lightning, hydra and more, which the venv may lack. The two files
use only torch, tqdm and fusion_bench.utils; the framework names they import at the top (BaseAlgorithm,
mixins, model pools) are for their classes, not for the functions used here, so they are stubbed while the
files load and sys.modules is restored afterwards. Shared by tests/core/test_learned.py and
benchmarks/bench_learned.py.
"""

from __future__ import annotations

import importlib.util
import sys
import types


class FusionBenchUnavailable(ImportError):
    """fusion-bench (or torch) is not installed, or its files no longer load this way."""


def _framework_class(name: str) -> type:
    """Stands for one of FusionBench's algorithm base classes or mixins while its method files load."""
    return type(name, (), {})


def _stub(name: str, path: str | None = None, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = [path]
    module.__dict__.update(attrs)
    return module


def load() -> types.SimpleNamespace:
    """Namespace with `wudi_merging` and `merging_with_regmean_weights` (and `torch`).

    Raises FusionBenchUnavailable when they cannot be loaded.
    """
    try:
        import torch
    except ImportError as err:
        raise FusionBenchUnavailable("torch") from err
    spec = importlib.util.find_spec("fusion_bench")
    if spec is None or not spec.submodule_search_locations:
        raise FusionBenchUnavailable("fusion-bench")
    root = spec.submodule_search_locations[0]
    saved = {k: v for k, v in sys.modules.items() if k == "fusion_bench" or k.startswith("fusion_bench.")}
    framework = {name: _framework_class(name)
                 for name in ("BaseAlgorithm", "BaseModelPool", "LightningFabricMixin", "SimpleProfilerMixin")}
    framework["auto_register_config"] = lambda cls: cls
    sys.modules.update({
        "fusion_bench": _stub("fusion_bench", root, **framework),
        "fusion_bench.mixins": _stub("fusion_bench.mixins", **framework),
        "fusion_bench.modelpool": _stub("fusion_bench.modelpool", **framework),
        "fusion_bench.method": _stub("fusion_bench.method", f"{root}/method", **framework),
        "fusion_bench.method.regmean": _stub("fusion_bench.method.regmean", f"{root}/method/regmean"),
        "fusion_bench.method.wudi": _stub("fusion_bench.method.wudi", f"{root}/method/wudi"),
    })
    loaded = {}
    try:
        for name in ("wudi.wudi", "regmean.regmean"):
            full = f"fusion_bench.method.{name}"
            file_spec = importlib.util.spec_from_file_location(full, f"{root}/method/{name.replace('.', '/')}.py")
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[full] = module
            file_spec.loader.exec_module(module)
            loaded[name] = module
    except (ImportError, OSError) as err:
        raise FusionBenchUnavailable(getattr(err, "name", None) or str(err)) from err
    finally:
        for k in [k for k in sys.modules if k == "fusion_bench" or k.startswith("fusion_bench.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return types.SimpleNamespace(torch=torch, wudi_merging=loaded["wudi.wudi"].wudi_merging,
                                 merging_with_regmean_weights=loaded["regmean.regmean"].merging_with_regmean_weights)
