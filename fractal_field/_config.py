"""Python config files (`get_config(variant)`) with `key.path=value` overrides."""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence

import ml_collections


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `path/to/config.py[:variant]` and apply overrides like `optim.lr=1e-3`.

    Overrides must name existing keys (typos are errors), except inside `model`, `solver`
    and `adjoint`, whose keys are passed on to constructors.
    """
    path, _, variant = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Config file {path!r} not found.")
    module_spec = importlib.util.spec_from_file_location("_ff_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"Config file {path} must define get_config(variant='').")
    config = module.get_config(variant) if variant else module.get_config()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Override {item!r} must look like key.path=value.")
        parts = key.strip().split(".")
        node = config
        for p in parts[:-1]:
            if p not in node:
                raise KeyError(f"Override {item!r}: no config key {p!r}.")
            node = node[p]
        leaf = parts[-1]
        open_sections = {"model", "solver", "adjoint", "data"}
        if leaf not in node and parts[0] not in open_sections:
            raise KeyError(f"Override {item!r}: unknown key {key!r}.")
        val = _parse_value(value)
        if leaf in node and isinstance(node[leaf], float) and isinstance(val, int):
            val = float(val)
        node[leaf] = val
    return config
