"""Configs from names, JSON files and ``--set key=value`` overrides.

:func:`config_from_dict` is the inverse of :meth:`ocrnet.configs.Config.to_dict`;
:func:`resolve_config` takes a registered name, a synthetic config name or a ``config.json``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from .published import get_config
from .schema import (AuxHeadConfig, BackboneConfig, Config, DataConfig, ModelConfig,
                     OCRHeadConfig, Published, ScheduleConfig, TestConfig)
from .synthetic import SYNTHETIC_CONFIGS

__all__ = ["apply_overrides", "config_from_dict", "resolve_config"]

T = TypeVar("T")


def _tuples(value: Any) -> Any:
    """Lists (from JSON) back to the tuples the frozen config dataclasses use."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _build(cls, d: Mapping[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"config_from_dict: unknown keys in {where}: {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(names))}")
    return cls(**{k: _tuples(v) for k, v in d.items()})


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """The inverse of :meth:`Config.to_dict` (also accepts its JSON form)."""
    try:
        m = dict(d["model"])
        model = _build(ModelConfig, {**m,
                                     "backbone": _build(BackboneConfig, m["backbone"],
                                                        "model.backbone"),
                                     "aux_head": _build(AuxHeadConfig, m["aux_head"],
                                                        "model.aux_head"),
                                     "ocr_head": _build(OCRHeadConfig, m["ocr_head"],
                                                        "model.ocr_head")}, "model")
        pub = d.get("published")
        return Config(name=d["name"], model=model,
                      data=_build(DataConfig, d["data"], "data"),
                      schedule=_build(ScheduleConfig, d["schedule"], "schedule"),
                      test=_build(TestConfig, d.get("test", {}), "test"),
                      published=None if pub is None else _build(Published, pub, "published"))
    except KeyError as exc:
        raise ValueError(f"config_from_dict: missing key {exc}") from None


def resolve_config(spec: str | os.PathLike | Config) -> Config:
    """A Config from a registered name, a :data:`SYNTHETIC_CONFIGS` name or a JSON file."""
    if isinstance(spec, Config):
        return spec
    text = os.fspath(spec)
    if text.endswith(".json"):
        if not os.path.isfile(text):
            raise FileNotFoundError(f"config file {text!r} does not exist")
        with open(text, encoding="utf-8") as f:
            return config_from_dict(json.load(f))
    if text in SYNTHETIC_CONFIGS:
        return SYNTHETIC_CONFIGS[text]
    try:
        return get_config(text)
    except ValueError as exc:
        raise ValueError(f"{exc}; synthetic configs: {', '.join(sorted(SYNTHETIC_CONFIGS))}; "
                         f"or a config.json path") from None


def _parse_value(text: str) -> Any:
    """``--set`` values: Python literals (1, 0.5, (512, 1024), None, True), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(key: str, old: Any, new: Any) -> Any:
    if isinstance(new, list):
        new = tuple(new)
    if old is None or new is None:
        return new
    if isinstance(old, bool) != isinstance(new, bool):
        raise ValueError(f"--set {key}: expected a bool like {old!r}, got {new!r}")
    if isinstance(old, float) and isinstance(new, int):
        return float(new)
    if isinstance(old, (int, float, str, tuple)) and not isinstance(new, type(old)):
        raise ValueError(f"--set {key}: expected {type(old).__name__} like {old!r}, got "
                         f"{type(new).__name__} {new!r}")
    return new


def _replace_path(obj: Any, path: list[str], value: Any, full: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"--set {full}: {'.'.join(path)} is not inside a config section")
    names = [f.name for f in dataclasses.fields(obj)]
    if path[0] not in names:
        raise ValueError(f"--set {full}: unknown field {path[0]!r}; known: {', '.join(names)}")
    old = getattr(obj, path[0])
    new = (_coerce(full, old, value) if len(path) == 1
           else _replace_path(old, path[1:], value, full))
    return dataclasses.replace(obj, **{path[0]: new})


def apply_overrides(config: Config, options: T, assignments: Sequence[str]) -> tuple[Config, T]:
    """Apply ``key=value`` strings: ``model.*``, ``data.*``, ``schedule.*``, ``test.*`` and
    ``name`` change the config; ``train.<field>`` (or a bare field name) changes ``options``,
    a dataclass such as :class:`ocrnet.engine.TrainOptions`. Values are Python literals.
    Raises ValueError naming the key."""
    option_fields = {f.name for f in dataclasses.fields(options)}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set: expected key=value, got {item!r}")
        value = _parse_value(raw.strip())
        head, _, rest = key.partition(".")
        if head in ("model", "data", "schedule", "test", "name"):
            config = _replace_path(config, key.split("."), value, key)
        elif (head == "train" and rest in option_fields) or key in option_fields:
            name = rest if head == "train" else key
            options = dataclasses.replace(
                options, **{name: _coerce(key, getattr(options, name), value)})
        else:
            raise ValueError(f"--set {key}: unknown key; use model.*, data.*, schedule.*, "
                             f"test.* or train.<{'|'.join(sorted(option_fields))}>")
    return config, options
