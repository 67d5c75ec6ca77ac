"""Typed run configuration: nested dataclasses loaded from YAML with ``key=value`` overrides.

A config is a :class:`Config` of sections (``data``, ``model``, ``optim``, ``schedule``,
``train``, ``eval``) plus the section a method registers with :func:`register_section`.
Overrides use dotted paths and are parsed to the field's type; an unknown key raises
:class:`ConfigError` listing the valid keys of its section.

Example::

    from wsss_fast.engine import load_config
    cfg = load_config("configs/aream_voc.yaml", ["optim.lr=1e-4", "train.epochs=3"])
    cfg.optim.lr          # 0.0001 (a float, even though YAML reads "1e-4" as a string)
    save_config(cfg, "runs/x/config.yaml")
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsss_fast.data.io import atomic_write_bytes

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "register_section",
    "save_config",
]


class ConfigError(ValueError):
    """A config key is unknown, a value has the wrong type, or a setting is out of range."""


def _check_choice(section: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r}; expected one of {sorted(choices)}")


@dataclass
class DataConfig:
    """Which data set and how it is loaded (see :func:`wsss_fast.data.build_dataset`)."""

    kind: str = "synthetic"
    root: str = "data/synthetic"
    train_split: str = "train"
    crop_size: int = 224
    # "train": rescale/flip/jitter/crop (AFA, AReAM Conformer); "timm": RandomResizedCrop recipe
    # (AReAM MCTformer); "none": images as stored (they must share one size to batch).
    augment: str = "train"
    scale_range: tuple[float, float] = (0.5, 2.0)
    """``augment: train``: the random rescale range (AFA/AReAM: 0.5-2.0). On small images a
    narrower range keeps the image labels true of the crop (the synthetic configs use one)."""
    resize_long: tuple[int, int] | None = None
    """``augment: train``: resize the long side to a random length in ``[low, high]`` pixels in
    place of the ``scale_range`` rescale (GETAM: [230, 292]; CRT, IRN: [210, 420])."""
    color_jitter: bool = True
    """``augment: train``: colour jitter (0.4, 0.4, 0.2, 0.1) with probability 0.8."""
    synthetic: dict[str, Any] = field(default_factory=dict)
    """``kind: synthetic``: :func:`~wsss_fast.data.make_synthetic` arguments for a root that does
    not exist yet (``num_train``, ``size``, ``object_size``, ``clutter``, ...)."""
    saliency_dir: str | None = None
    """Optional folder of saliency maps, ``<name>.png`` per image (relative to ``root`` unless
    absolute), binarised at > 0 and moved with the crop; GETAM uses them when present."""
    batch_size: int = 8
    """Per process; the global batch is ``batch_size * world_size * optim.accum_steps``."""
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self):
        _check_choice("data", "augment", self.augment, {"train", "timm", "none"})
        lo, hi = (float(v) for v in self.scale_range)
        if not 0 < lo <= hi:
            raise ConfigError(
                f"data.scale_range={list(self.scale_range)}; expected [low, high] with 0 < low <= high"
            )
        self.scale_range = (lo, hi)
        if self.resize_long is not None:
            try:
                lo, hi = (int(v) for v in self.resize_long)
            except (TypeError, ValueError):
                lo = hi = 0
            if not 0 < lo <= hi:
                raise ConfigError(
                    f"data.resize_long={self.resize_long!r}; expected [low, high] pixels with "
                    "0 < low <= high, or null for the scale_range rescale"
                )
            self.resize_long = (lo, hi)


@dataclass
class ModelConfig:
    """The network; methods read what they need from here."""

    backbone: str = "deit_small_patch16_224"
    num_classes: int = 20
    pretrained: str | None = None
    """Local file with backbone weights (timm checkpoint or safetensors); nothing is downloaded."""
    checkpoint_blocks: bool = False
    """Recompute backbone blocks in backward (less memory, about a third more compute); a method
    applies it with ``wsss_fast.engine.checkpoint_blocks(model.blocks, cfg.model.checkpoint_blocks)``."""
    backend: str | None = None
    """Op backend for ``wsss_fast.set_backend`` (None: the default choice)."""


@dataclass
class OptimConfig:
    """Optimizer, gradient accumulation and clipping."""

    name: str = "adamw"
    lr: float = 6.25e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    poly_quirk: bool = False
    """SGD as the published ``PolyOptimizer`` builds it (PSA/IRN, GETAM, CRT): momentum equals
    ``weight_decay`` and weight decay is 0 except in parameter groups that set their own
    (reference/methods.md §2.7). Pair with ``schedule.name=poly``."""
    accum_steps: int = 1
    grad_clip: float = 0.0
    """Max global gradient norm; 0 turns clipping off."""

    def __post_init__(self):
        _check_choice("optim", "name", self.name, {"adamw", "sgd"})
        if self.poly_quirk and self.name != "sgd":
            raise ConfigError("optim.poly_quirk=true needs optim.name=sgd")
        if self.accum_steps < 1:
            raise ConfigError(f"optim.accum_steps={self.accum_steps}; expected >= 1")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per optimizer step (see :mod:`.schedule`)."""

    name: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    """Added to ``warmup_epochs`` converted to steps."""
    warmup_start: float = 0.0
    """Warm-up starts at ``warmup_start * lr`` and rises linearly to ``lr``."""
    min_lr_ratio: float = 0.0
    power: float = 0.9
    """Exponent of the poly schedule."""

    def __post_init__(self):
        _check_choice("schedule", "name", self.name, {"cosine", "poly", "constant"})


@dataclass
class TrainConfig:
    """The loop: length, device, precision, logging and checkpoints."""

    epochs: int = 1
    max_steps: int = 0
    """Optimizer steps in all; 0: ``epochs`` full epochs. The schedule spans this length."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``; under torchrun ``cuda`` means
    ``cuda:LOCAL_RANK``."""
    precision: str = "bf16"
    """``bf16`` autocast (CUDA only; CPU runs in fp32), ``fp16`` with a GradScaler, ``fp32``."""
    seed: int = 0
    out_dir: str = "runs/default"
    resume: bool = True
    """Continue from the newest checkpoint in ``out_dir`` when there is one; ``false`` refuses a
    folder that holds checkpoints rather than mixing two runs in it."""
    log_every: int = 10
    ckpt_every: int = 0
    """Write a checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    progress: bool = True
    tensorboard: bool = True
    image_every: int = 100
    """With TensorBoard on: every N optimizer steps (0: never) an ``image | CAM | pseudo mask``
    grid of the current batch's first images, from the method's ``preview`` (when it has one)."""

    def __post_init__(self):
        _check_choice("train", "precision", self.precision, {"bf16", "fp16", "fp32"})


@dataclass
class EvalConfig:
    """CAM inference and evaluation settings."""

    split: str = "val"
    scales: tuple[float, ...] = (1.0,)
    flip: bool = True
    bg_threshold: float = 0.45


_BUILTIN = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}
_SECTIONS: dict[str, type] = {}


def register_section(name: str, cls: type) -> type:
    """Register a method's own config dataclass under top-level key ``name``.

    The section is part of a config when its YAML or overrides name it, or when
    ``method == name``. Usable as ``register_section("aream", AReAMConfig)``.
    """
    if name in _BUILTIN or name == "method":
        raise ConfigError(f"section name {name!r} is taken by the engine")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    _SECTIONS[name] = cls
    return cls


@dataclass
class Config:
    """The whole run configuration; ``cfg.<section>`` reaches registered method sections too."""

    method: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sections: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.method in _SECTIONS and self.method not in self.sections:
            self.sections[self.method] = _SECTIONS[self.method]()

    def __getattr__(self, name):
        # Only called when normal lookup fails; guard "sections" so copy/pickle cannot recurse.
        if name != "sections" and name in self.__dict__.get("sections", {}):
            return self.sections[name]
        raise AttributeError(f"Config has no section {name!r}")


# --- type parsing --------------------------------------------------------------------------


def _coerce(value, tp, path: str):
    """``value`` converted to type ``tp`` or a ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} does not fit {tp}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path)
    if origin in (tuple, list):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {list(value)!r}")
            items = [_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept what Python's float() accepts.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported field type {tp}")


def _hints(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _from_dict(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        where = path or "the top level"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(hints)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e


def config_from_dict(data: dict | None) -> Config:
    """Build a :class:`Config` from a nested mapping (as read from YAML), checking every key."""
    data = dict(data or {})
    sections = {}
    for name in list(data):
        if name in _SECTIONS:
            sections[name] = _from_dict(_SECTIONS[name], data.pop(name), name)
        elif name not in _BUILTIN and name != "method":
            valid = sorted([*_BUILTIN, "method", *_SECTIONS])
            raise ConfigError(f"unknown key {name!r} at the top level; valid keys: {valid}")
    kwargs = {k: _coerce(v, _hints(Config)[k], k) for k, v in data.items()}
    return Config(**kwargs, sections=sections)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Config) -> dict:
    """Nested plain mapping (tuples as lists); method sections sit at the top level as in YAML."""
    out = {"method": cfg.method}
    out.update({name: _plain(getattr(cfg, name)) for name in _BUILTIN})
    out.update({name: _plain(section) for name, section in cfg.sections.items()})
    return out


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML (atomically); :func:`load_config` reads it back unchanged."""
    return atomic_write_bytes(path, config_to_yaml(cfg).encode())


def _parse_override(item: str) -> tuple[list[str], str]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    return key.strip().split("."), raw.strip()


def apply_overrides(data: dict, overrides) -> dict:
    """Apply ``section.key=value`` strings to a nested mapping (a copy is returned).

    Values are read as YAML (``true``, ``[1, 2]``, ``null``) and checked against the field's
    type when the config is built; a field typed ``str`` keeps the raw text.
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for item in overrides:
        keys, raw = _parse_override(item)
        top = keys[0]
        cls = _BUILTIN.get(top) or _SECTIONS.get(top)
        if top == "method":
            if len(keys) != 1:
                raise ConfigError(f"override {item!r}: 'method' has no sub-keys")
            data["method"] = raw
            continue
        if cls is None:
            valid = sorted([*_BUILTIN, "method", *_SECTIONS])
            raise ConfigError(f"override {item!r}: unknown section {top!r}; valid: {valid}")
        node, tp = data.setdefault(top, {}), cls
        for depth, key in enumerate(keys[1:], start=1):
            hints = _hints(tp) if dataclasses.is_dataclass(tp) else None
            if hints is None or key not in hints:
                where = ".".join(keys[:depth])
                valid = sorted(hints) if hints else []
                raise ConfigError(
                    f"override {item!r}: unknown key {key!r} in {where}; valid: {valid}"
                )
            tp = hints[key]
            if depth < len(keys) - 1:
                node = node.setdefault(key, {})
        if len(keys) == 1:
            raise ConfigError(f"override {item!r}: name a key inside section {top!r}")
        keep_text = tp is str or (tp == (str | None) and raw not in ("null", "~"))
        node[keys[-1]] = raw if keep_text else yaml.safe_load(raw)
    return data


def load_config(path: str | os.PathLike | None = None, overrides=()) -> Config:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply
    ``key=value`` overrides, e.g. ``["optim.lr=1e-4", "train.epochs=3"]``.

    A method's section (``aream: {...}``) is only known once the module that calls
    :func:`register_section` is imported; import the method before loading its config.
    """
    data = {}
    if path is not None:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return config_from_dict(apply_overrides(data, overrides))
