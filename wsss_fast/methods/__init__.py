"""AReAM, GETAM and CRT: losses, CAM and pseudo-label logic, one module each.

Every method module registers its config section (``register_section``) on import and defines
one method class that the engine drives. Besides the training protocol of
:class:`wsss_fast.engine.loop.Method` (``build_model``, ``training_step``, optional
``param_groups``), a method class gives the inference commands two calls:

* ``cams(model, image, label, eval_cfg) -> [B, C, H, W]``: evaluation CAMs in ``[0, 1]`` of
  normalised images at their own size, absent classes zero, with the scales / flip / fusion of
  ``eval_cfg`` (the engine's ``eval`` section);
* ``pseudo_masks(cam, image01, label, eval_cfg) -> [B, H, W]``: int64 pseudo masks (0
  background, ``c + 1`` class ``c``, 255 ignored) from those CAMs and the ``[0, 1]`` images.

:data:`METHODS` names the module of each method; :func:`method_class` imports it.
"""

from __future__ import annotations

import importlib

from wsss_fast.methods.aream import AReAM, AReAMConfig

__all__ = ["METHODS", "AReAM", "AReAMConfig", "method_class", "register_all"]

METHODS: dict[str, tuple[str, str]] = {
    "aream": ("wsss_fast.methods.aream", "AReAM"),
    "getam": ("wsss_fast.methods.getam", "GETAM"),
    "crt": ("wsss_fast.methods.crt", "CRT"),
}
"""Method name (the config's ``method:``) -> (module, class)."""


def method_class(name: str) -> type:
    """The method class registered as ``name`` (its module imported, its section registered)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    module, cls = METHODS[name]
    return getattr(importlib.import_module(module), cls)


def register_all() -> None:
    """Import every method module, so every config section is registered."""
    for name in METHODS:
        method_class(name)
