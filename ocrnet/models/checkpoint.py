"""Checkpoints: mmsegmentation import, our own format, ImageNet backbone initialisation.

Accepted inputs of :func:`load_checkpoint`:

- a mmsegmentation checkpoint, ``{"state_dict": {"backbone.*", "decode_head.0.*",
  "decode_head.1.*"}, "meta": ...}`` (a ``module.`` prefix left by DistributedDataParallel is
  removed);
- our format, written by :func:`save_checkpoint` / :func:`convert_checkpoint`:
  ``{"format": "ocrnet", "version": 1, "state_dict": ..., "meta": {...}}``;
- a bare state dict.

mmengine training checkpoints (``message_hub``, optimizer state) are read too: their OpenMMLab
objects become inert placeholders, and any other non-tensor Python object is refused.

Loading is strict and all-or-nothing: every key, shape and tensor type is checked against the
model before ``load_state_dict`` runs, so a failure leaves the model's weights untouched. Files
are read with ``torch.load(weights_only=True)``: no code from the file is executed.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.fileio import atomic_write

__all__ = ["CheckpointError", "CheckpointInvalid", "FORMAT", "VERSION", "convert_checkpoint",
           "describe_state_dict", "load_backbone_pretrained", "load_checkpoint",
           "read_checkpoint", "save_checkpoint"]

FORMAT = "ocrnet"
VERSION = 1
_MAX_LISTED = 12  # keys listed per category in error messages

# Keys of the official ImageNet classification checkpoints that the segmentation backbone does
# not have: HRNet-Image-Classification's head (incre_modules, downsamp_modules, final_layer,
# classifier) and the ResNet classifier (fc).
IMAGENET_HEAD_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.",
                          "fc.")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message names the file."""


class CheckpointInvalid(RuntimeError):
    """A training checkpoint that cannot be resumed from (truncated, corrupt, incomplete);
    raised by :mod:`ocrnet.engine.checkpointing`."""


def _strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Remove ``prefix`` when every key carries it (a DDP ``module.`` wrapper)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


# Training checkpoints written by mmengine (mmsegmentation 1.x) also hold the runner's state:
# ``message_hub`` with mmengine HistoryBuffer objects and numpy arrays. Those classes are
# rebuilt as inert placeholders (attributes only, no code of theirs runs) so the weights can
# still be read with weights_only=True and without OpenMMLab installed.
_OPAQUE_PACKAGES = ("mmengine", "mmcv", "mmseg", "mmdet", "mmpretrain", "mmcls")
_NUMPY_GLOBALS = ("_reconstruct", "scalar", "ndarray", "dtype")


class _RefusedGlobals(Exception):
    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


class _Opaque:
    """Placeholder for a training-state object of an OpenMMLab class; keeps its state."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _safe_load(path: Path) -> Any:
    """torch.load(weights_only=True), retried with the training-state classes allowed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            names = []  # not a readable zip archive
        if not names:
            raise err  # a damaged pickle, not a question of allowed classes
        allowed: list[Any] = []
        refused = []
        for name in names:
            module, _, attr = name.rpartition(".")
            top = module.split(".")[0]
            if top in _OPAQUE_PACKAGES:
                allowed.append((type(attr, (_Opaque,), {}), name))
            elif top == "numpy" and attr in _NUMPY_GLOBALS:
                allowed.append(getattr(importlib.import_module(module), attr))
            else:
                refused.append(name)
        if refused:
            raise _RefusedGlobals(refused) from None
        if any(name.startswith("numpy.") for name in names):
            import numpy as np  # arrays also need their dtype classes allowed

            allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint file -> (state dict, meta dict) without touching any model.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable (corrupt, truncated, not a torch file) or no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        obj = _safe_load(path)
    except _RefusedGlobals as exc:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: it references Python objects that safe "
            f"loading (weights_only=True) refuses: {', '.join(exc.names)}") from None
    except Exception as exc:  # zipfile, pickle, EOF and torch errors alike
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} ({path.stat().st_size} bytes): the file is "
            f"corrupt, truncated or not a PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"],
                                                                         Mapping):
        sd = obj["state_dict"]
        if isinstance(obj.get("meta"), Mapping):
            meta = dict(obj["meta"])
        if obj.get("format") == FORMAT:
            meta.setdefault("format", FORMAT)
            meta.setdefault("version", obj.get("version"))
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        sd = obj["model"]
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        sd = obj
    else:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no state dict (expected a dict "
                              "with 'state_dict', or a dict of tensors)")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r}: state dict entries that are not "
                              f"tensors: {_listing(map(str, bad))}")
    return _strip_prefix(sd, "module."), meta


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def describe_state_dict(sd: Mapping[str, Any]) -> str:
    """A short human description of a segmentor state dict (architecture and classes), from
    the key layout and a few shapes; works on tensors and on meta-device state dicts."""

    def shape(key: str) -> tuple[int, ...] | None:
        v = sd.get(key)
        return tuple(v.shape) if v is not None else None

    parts = []
    if "backbone.stem.0.weight" in sd:
        blocks = [len({k.split(".")[2] for k in sd if k.startswith(f"backbone.layer{i}.")})
                  for i in range(1, 5)]
        depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}.get(tuple(blocks))
        parts.append(f"ResNetV1c-{depth}" if depth else f"ResNetV1c (blocks {blocks})")
    elif "backbone.transition1.0.0.weight" in sd:
        width = shape("backbone.transition1.0.0.weight")[0]
        stage3 = len({k.split(".")[2] for k in sd if k.startswith("backbone.stage3.")})
        blocks = len({k.split(".")[5] for k in sd
                      if k.startswith("backbone.stage2.0.branches.0.")})
        small = "-Small" if (stage3, blocks) == (3, 2) else ""
        parts.append(f"HRNetV2p-W{width}{small}")
    elif any(k.startswith("backbone.") for k in sd):
        parts.append("an unknown backbone")
    else:
        parts.append("no backbone keys")
    cls = shape("decode_head.1.conv_seg.weight") or shape("decode_head.0.conv_seg.weight")
    parts.append(f"{cls[0]} classes" if cls else "no classifier")
    return ", ".join(parts)


def _raise_misfit(header: str, problems: Mapping[str, list[str]],
                  notes: Iterable[str] = ()) -> None:
    """Raise CheckpointError listing every non-empty category of ``problems``; no-op if none."""
    if not any(problems.values()):
        return
    lines = [header, *(f"  {note}" for note in notes)]
    lines += [f"  {what} ({len(keys)}): {_listing(keys)}" for what, keys in problems.items()
              if keys]
    lines.append("  nothing was loaded")
    raise CheckpointError("\n".join(lines))


def _key_problems(own: Mapping[str, Tensor], sd: Mapping[str, Tensor],
                  optional: str | None = None) -> dict[str, list[str]]:
    """Missing / unexpected keys and shape mismatches of ``sd`` against ``own``; keys ending
    in ``optional`` may be missing."""
    return {
        "missing keys": [k for k in own if k not in sd
                         and not (optional and k.endswith(optional))],
        "unexpected keys": [k for k in sd if k not in own],
        "shape mismatches": [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                             for k in own if k in sd and sd[k].shape != own[k].shape],
    }


def _check_against(model: nn.Module, sd: Mapping[str, Tensor], source: str) -> None:
    """Raise CheckpointError unless ``sd`` has exactly the model's keys, shapes and kinds."""
    own = model.state_dict()
    problems = _key_problems(own, sd)
    problems["dtype kind mismatches"] = [
        f"{k} ({sd[k].dtype} vs model {own[k].dtype})" for k in own
        if k in sd and sd[k].is_floating_point() != own[k].is_floating_point()]
    theirs, ours = describe_state_dict(sd), describe_state_dict(own)
    notes = [f"the checkpoint is {theirs}; the model is {ours}"] if theirs != ours else []
    _raise_misfit(f"checkpoint {source} does not fit the model:", problems, notes)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a mmsegmentation or ocrnet checkpoint into ``model`` strictly.

    Returns:
        the checkpoint's meta dict (mmseg's ``meta`` or ours; empty for bare state dicts).

    Raises:
        FileNotFoundError, CheckpointError: nothing is loaded in either case.
    """
    sd, meta = read_checkpoint(path)
    _check_against(model, sd, repr(str(path)))
    model.load_state_dict(sd, strict=True)
    return meta


def save_checkpoint(model_or_state: nn.Module | Mapping[str, Tensor], path: str | os.PathLike,
                    meta: Mapping[str, Any] | None = None) -> Path:
    """Write our format atomically (:func:`ocrnet.utils.fileio.atomic_write`: a reader never
    sees a half-written file); the destination's folder must exist."""
    sd = (model_or_state.state_dict() if isinstance(model_or_state, nn.Module)
          else dict(model_or_state))
    payload = {"format": FORMAT, "version": VERSION,
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in sd.items()},
               "meta": dict(meta or {})}
    return atomic_write(path, lambda f: torch.save(payload, f))


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike,
                       config: Any = None) -> Path:
    """Convert a mmsegmentation checkpoint (or ours) to our format at ``dst``.

    Args:
        config: optional config name / object; when given (or when the source's meta names a
            registered config) the weights are first checked strictly against that model
            (built on the "meta" device, so no memory is spent on it).

    Returns:
        ``dst`` as a Path.
    """
    from ..configs import CONFIGS, get_config  # local: keep this module import-light
    from .segmentor import build_segmentor

    sd, meta = read_checkpoint(src)
    name = config if config is not None else meta.get("config")
    if isinstance(name, str) and config is None and name not in CONFIGS:
        name = None  # mmseg stores the whole config text here; not a registry name
    out_meta: dict[str, Any] = {"source": os.path.basename(os.fspath(src)),
                                "source_format": meta.get("format", "mmsegmentation"),
                                "architecture": describe_state_dict(sd)}
    for key in ("mmseg_version", "dataset_meta"):
        if key in meta:
            out_meta[key] = meta[key]
    if name is not None:
        cfg = get_config(name)
        with torch.device("meta"):
            model = build_segmentor(cfg, init=False)
        _check_against(model, sd, repr(os.fspath(src)))
        out_meta["config"] = cfg.name
    return save_checkpoint(sd, dst, out_meta)


def load_backbone_pretrained(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Initialise a backbone from an ImageNet checkpoint (official HRNet / ResNetV1c layout).

    ``model`` is a segmentor (its ``.backbone`` is used) or a backbone. The file's keys may be
    bare (``conv1.weight``, ``stem.0.weight``) or carry ``backbone.`` / ``module.`` prefixes;
    the classification head keys (HRNet's ``incre_modules``, ``downsamp_modules``,
    ``final_layer``, ``classifier``; ResNet's ``fc``) are ignored. Everything else must match
    the backbone exactly (only BatchNorm ``num_batches_tracked`` counters may be absent); on any
    mismatch nothing is loaded.

    Returns:
        the ignored (classification head) keys.
    """
    backbone = getattr(model, "backbone", model)
    sd, _ = read_checkpoint(path)
    sd = _strip_prefix(sd, "backbone.")
    ignored = [k for k in sd if k.startswith(IMAGENET_HEAD_PREFIXES)]
    sd = {k: v for k, v in sd.items() if k not in set(ignored)}
    own = backbone.state_dict()
    # BN batch counters are absent from some older ImageNet files; they play no part in the
    # forward pass (momentum is set), so the model's own counters are kept for those.
    _raise_misfit(f"backbone checkpoint {str(path)!r} does not fit {type(backbone).__name__}:",
                  _key_problems(own, sd, optional="num_batches_tracked"))
    backbone.load_state_dict({**own, **sd}, strict=True)
    return ignored
