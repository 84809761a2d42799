"""Google's .npz checkpoint layout: read it into our model, and write our model out in it.

The layout is a flat mapping of Flax parameter paths to arrays (``Transformer/encoderblock_0/
MultiHeadDotProductAttention_1/query/kernel`` for a ViT, ``MixerBlock_0/token_mixing/Dense_0/
kernel`` for an MLP-Mixer). Loading builds one table from Google key to our parameter and a
layout kind that says how the axes differ, converts and checks every tensor, and only then copies:
a checkpoint that does not fit raises one ``CheckpointError`` listing every missing, unexpected
and mis-shaped key and every array that is no weight (not floating point, or NaN or infinite
values), and leaves the model untouched.
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import scipy.ndimage
import torch

from models.configs import CONFIGS, is_mixer
from models.errors import UserError, one_line

log = logging.getLogger(__name__)

# Prefixes under which Google's files store the parameters (older files nest them in the optimizer).
_PREFIXES = ("", "opt/target/")
_POSEMB = "Transformer/posembed_input/pos_embedding"
# The patch embedding's kernel, which every file of the family has: ViT, Mixer.
_STEMS = ("embedding/kernel", "stem/kernel")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


@dataclass(frozen=True)
class _Entry:
    key: str  # Google's name, without prefix
    param: str  # our state_dict name
    kind: str  # how the axes differ, see _to_torch


def _to_torch(array: np.ndarray, kind: str) -> np.ndarray:
    """Rearrange a Flax array into the PyTorch layout of the same parameter."""
    if kind == "conv":  # (kh, kw, in, out) -> (out, in, kh, kw)
        return array.transpose(3, 2, 0, 1)
    if kind == "dense":  # (in, out) -> (out, in)
        return array.T
    if kind == "heads_in":  # (D, heads, head_dim) -> (heads * head_dim, D)
        return array.reshape(array.shape[0], -1).T
    if kind == "heads_out":  # (heads, head_dim, D) -> (D, heads * head_dim)
        return array.reshape(-1, array.shape[-1]).T
    if kind == "heads_bias":  # (heads, head_dim) -> (heads * head_dim,)
        return array.reshape(-1)
    return array


def _google_shape(shape: tuple[int, ...], kind: str, heads: int) -> tuple[int, ...]:
    """The shape Google's file stores for a parameter of our ``shape``."""
    if kind == "conv":
        out, cin, kh, kw = shape
        return (kh, kw, cin, out)
    if kind == "dense":
        return shape[::-1]
    if kind == "heads_in":
        return (shape[1], heads, shape[0] // heads)
    if kind == "heads_out":
        return (heads, shape[1] // heads, shape[0])
    if kind == "heads_bias":
        return (heads, shape[0] // heads)
    return shape


def _to_google(tensor: torch.Tensor, kind: str, heads: int) -> np.ndarray:
    array = tensor.detach().cpu().float().numpy()
    target = _google_shape(tuple(array.shape), kind, heads)
    if kind == "conv":
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    if kind in ("dense", "heads_in", "heads_out"):
        return np.ascontiguousarray(array.T.reshape(target))
    return array.reshape(target)


def _resnet_key(name: str) -> tuple[str, str]:
    """Our ResNet parameter name -> (Google key, kind): ``body.block1.unit1.gn1.weight`` ->
    ``block1/unit1/gn1/scale``."""
    path = name.replace("root.conv.", "conv_root.").replace("root.gn.", "gn_root.")
    path = path.replace("body.", "").replace("downsample.", "conv_proj.")
    module, leaf = path.rsplit(".", 1)
    if re.search(r"conv[^.]*$", module):
        return module.replace(".", "/") + "/kernel", "conv"
    return module.replace(".", "/") + ("/scale" if leaf == "weight" else "/bias"), "plain"


def _mixer_layout(model: torch.nn.Module) -> list[_Entry]:
    """Every parameter of an MlpMixer with its Google key (``vit_jax/models_mixer.py``)."""
    entries = [
        _Entry("stem/kernel", "stem.weight", "conv"),
        _Entry("stem/bias", "stem.bias", "plain"),
    ]
    for i in range(len(model.blocks)):
        g, t = f"MixerBlock_{i}/", f"blocks.{i}."
        for flax, ours in (("LayerNorm_0", "token_norm"), ("LayerNorm_1", "channel_norm")):
            entries.append(_Entry(f"{g}{flax}/scale", f"{t}{ours}.weight", "plain"))
            entries.append(_Entry(f"{g}{flax}/bias", f"{t}{ours}.bias", "plain"))
        for mlp in ("token_mixing", "channel_mixing"):
            for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
                entries.append(_Entry(f"{g}{mlp}/{dense}/kernel", f"{t}{mlp}.{fc}.weight", "dense"))
                entries.append(_Entry(f"{g}{mlp}/{dense}/bias", f"{t}{mlp}.{fc}.bias", "plain"))
    entries += [
        _Entry("pre_head_layer_norm/scale", "pre_head_layer_norm.weight", "plain"),
        _Entry("pre_head_layer_norm/bias", "pre_head_layer_norm.bias", "plain"),
        _Entry("head/kernel", "head.weight", "dense"),
        _Entry("head/bias", "head.bias", "plain"),
    ]
    return entries


def _heads(model: torch.nn.Module) -> int:
    """The attention head count that the ``heads_*`` layouts split by (a Mixer has none)."""
    return 1 if is_mixer(model.config) else model.config.transformer.num_heads


def _describe(model: torch.nn.Module) -> str:
    """The model's sizes, for error messages."""
    patches = "x".join(map(str, model.config.patches.size))
    if is_mixer(model.config):
        return (
            f"Mixer, hidden size {model.config.hidden_dim}, {len(model.blocks)} blocks, "
            f"patches {patches}, {model.n_patches} patches per image"
        )
    layers = len(model.transformer.encoder.layer)
    return f"hidden size {model.config.hidden_size}, {layers} layers, patches {patches}"


def _layout(model: torch.nn.Module) -> list[_Entry]:
    """Every parameter of ``model`` with its Google key, in state_dict order."""
    if is_mixer(model.config):
        return _mixer_layout(model)
    entries = []
    hybrid_prefix = "transformer.embeddings.hybrid_model."
    for name, _ in model.named_parameters():
        if name.startswith(hybrid_prefix):
            key, kind = _resnet_key(name[len(hybrid_prefix) :])
            entries.append(_Entry(key, name, kind))
    emb = "transformer.embeddings."
    entries += [
        _Entry("embedding/kernel", emb + "patch_embeddings.weight", "conv"),
        _Entry("embedding/bias", emb + "patch_embeddings.bias", "plain"),
        _Entry("cls", emb + "cls_token", "plain"),
        _Entry(_POSEMB, emb + "position_embeddings", "plain"),
    ]
    for i in range(len(model.transformer.encoder.layer)):
        g, t = f"Transformer/encoderblock_{i}/", f"transformer.encoder.layer.{i}."
        attn = g + "MultiHeadDotProductAttention_1/"
        pairs = [
            ("LayerNorm_0", "attention_norm", "plain", "plain"),
            ("LayerNorm_2", "ffn_norm", "plain", "plain"),
            ("MlpBlock_3/Dense_0", "ffn.fc1", "dense", "plain"),
            ("MlpBlock_3/Dense_1", "ffn.fc2", "dense", "plain"),
        ]
        for flax, ours, weight_kind, bias_kind in pairs:
            scale = "scale" if weight_kind == "plain" else "kernel"
            entries.append(_Entry(f"{g}{flax}/{scale}", f"{t}{ours}.weight", weight_kind))
            entries.append(_Entry(f"{g}{flax}/bias", f"{t}{ours}.bias", bias_kind))
        for proj in ("query", "key", "value"):
            entries.append(_Entry(f"{attn}{proj}/kernel", f"{t}attn.{proj}.weight", "heads_in"))
            entries.append(_Entry(f"{attn}{proj}/bias", f"{t}attn.{proj}.bias", "heads_bias"))
        entries.append(_Entry(f"{attn}out/kernel", f"{t}attn.out.weight", "heads_out"))
        entries.append(_Entry(f"{attn}out/bias", f"{t}attn.out.bias", "plain"))
    entries += [
        _Entry(
            "Transformer/encoder_norm/scale", "transformer.encoder.encoder_norm.weight", "plain"
        ),
        _Entry("Transformer/encoder_norm/bias", "transformer.encoder.encoder_norm.bias", "plain"),
    ]
    if hasattr(model, "pre_logits"):
        entries.append(_Entry("pre_logits/kernel", "pre_logits.weight", "dense"))
        entries.append(_Entry("pre_logits/bias", "pre_logits.bias", "plain"))
    entries.append(_Entry("head/kernel", "head.weight", "dense"))
    entries.append(_Entry("head/bias", "head.bias", "plain"))
    return entries


def resize_pos_embed(posemb: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
    """Resize a (1, 1 + gh * gw, D) position embedding to a new grid, keeping the class token.

    Bilinear with aligned corners through ``scipy.ndimage.zoom(order=1)``: the same values as
    Google's ``vit_jax/checkpoint.py`` and the reference implementation.
    """
    posemb = np.asarray(posemb, dtype=np.float32)
    token, grid = posemb[:, :1], posemb[0, 1:]
    old = math.isqrt(len(grid))
    if old * old != len(grid):
        raise CheckpointError(
            f"position embedding has {len(grid)} patch tokens, not a square grid; cannot resize"
        )
    zoom = (new_grid[0] / old, new_grid[1] / old, 1)
    grid = scipy.ndimage.zoom(grid.reshape(old, old, -1), zoom, order=1)
    grid = grid.reshape(1, new_grid[0] * new_grid[1], -1)
    return np.concatenate([token, grid], axis=1)


_NPY_MAGIC = b"\x93NUMPY"


def _is_array(archive: zipfile.ZipFile, name: str) -> bool:
    if not name.endswith(".npy"):
        return False
    with archive.open(name) as member:
        return member.read(len(_NPY_MAGIC)) == _NPY_MAGIC


def npz_problem(file: str | Path | BinaryIO, thorough: bool = False) -> str | None:
    """What ``file`` is instead of an .npz of arrays, e.g. "an HTML page" or "a truncated or
    damaged zip archive (...)"; None when it is one.

    Reads the zip's directory and the first bytes of each member, not the arrays. ``thorough``,
    for a file just downloaded, also reads every member against its CRC and asks for the key that
    every ViT checkpoint of Google's has, ``embedding/kernel`` (under one of ``_PREFIXES``).
    """
    try:
        with open(file, "rb") if isinstance(file, str | Path) else nullcontext(file) as f:
            head = f.read(64)
            f.seek(0)
            if not head:
                return "an empty file"
            if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
                return "an HTML page"
            if head.startswith(_NPY_MAGIC):
                return "a single array (.npy), not an .npz of weights"
            if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
                return f"not a zip archive (starts with {head[:16]!r})"
            with zipfile.ZipFile(f) as archive:
                names = archive.namelist()
                not_arrays = [name for name in names if not _is_array(archive, name)]
                damaged = archive.testzip() if thorough else None
    except (zipfile.BadZipFile, EOFError, ValueError) as error:
        return f"a truncated or damaged zip archive ({type(error).__name__}: {one_line(error)})"
    except OSError as error:
        return f"a file that cannot be read ({error.strerror or one_line(error)})"
    if not names:
        return "an empty zip archive"
    if not_arrays:
        return f"a zip archive of other files than arrays ({describe_keys(not_arrays)})"
    if damaged is not None:
        return f"a damaged zip archive (member {damaged} fails its CRC check)"
    keys = sorted(name[: -len(".npy")] for name in names)
    if thorough and not any(f"{p}{stem}" in keys for p in _PREFIXES for stem in _STEMS):
        return (
            "an .npz without Google's ViT keys (no embedding/kernel, nor a Mixer's stem/kernel, "
            f"in {describe_keys(keys)})"
        )
    return None


def check_downloaded_npz(file: BinaryIO) -> None:
    """``download_file``'s ``verify`` for Google's checkpoints: a ``CheckpointError`` (a
    ``ValueError``) saying what ``file`` is, unless it is a complete .npz in Google's layout."""
    if problem := npz_problem(file, thorough=True):
        raise CheckpointError(problem)


def read_npz(path: str | Path) -> Mapping[str, np.ndarray]:
    """``np.load`` that turns a missing, truncated or foreign file into one CheckpointError
    saying what the file is."""
    where = Path(path).absolute()
    if not where.exists():
        raise CheckpointError(f"checkpoint {where} does not exist")
    try:
        problem = npz_problem(where)
        data = None if problem else np.load(where, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        problem = f"{type(error).__name__}: {one_line(error)}"
    if problem:
        raise CheckpointError(
            f"checkpoint {where} is not a readable .npz ({problem}); replace it with an .npz in "
            "Google's layout (an official checkpoint, or one that export.py wrote)"
        )
    return data


def describe_keys(keys: list[str], limit: int = 4) -> str:
    """The first ``limit`` items, then how many more: for one-line error messages."""
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _summary(keys: set[str], prefix: str, get) -> str:
    """What a checkpoint holds, in model terms, for error messages."""
    block = re.compile(rf"{re.escape(prefix)}(Transformer/encoderblock|MixerBlock)_(\d+)/")
    layers = {m.groups() for k in keys if (m := block.match(k))}
    mixer = any(kind == "MixerBlock" for kind, _ in layers)
    parts = [f"{len(layers)} {'blocks' if mixer else 'layers'}"]
    stem = next((prefix + s for s in _STEMS if prefix + s in keys), None)
    kernel = get(stem) if stem else None
    if kernel is not None and kernel.ndim == 4:
        kh, kw, cin, hidden = kernel.shape
        parts = [f"hidden size {hidden}", *parts, f"patches {kh}x{kw}"]
        if f"{prefix}conv_root/kernel" in keys:
            parts.append("ResNet stem")
    return ("Mixer, " if mixer else "") + ", ".join(parts)


def _shape_of(keys: set[str], prefix: str, get) -> tuple | None:
    """(Mixer?, width, blocks, patch, ResNet stem?) of a checkpoint, or None if unknown."""
    block = re.compile(rf"{re.escape(prefix)}(Transformer/encoderblock|MixerBlock)_(\d+)/")
    layers = {m.groups() for k in keys if (m := block.match(k))}
    stem = next((prefix + s for s in _STEMS if prefix + s in keys), None)
    kernel = get(stem) if stem else None
    if not layers or kernel is None or kernel.ndim != 4:
        return None
    mixer = any(kind == "MixerBlock" for kind, _ in layers)
    resnet = f"{prefix}conv_root/kernel" in keys
    return mixer, kernel.shape[3], len(layers), kernel.shape[0], resnet


def _config_shape(config) -> tuple:
    if is_mixer(config):
        return True, config.hidden_dim, config.num_blocks, config.patches.size[0], False
    resnet = config.get("resnet") is not None
    return False, config.hidden_size, config.transformer.num_layers, config.patches.size[0], resnet


def fitting_types(keys: set[str], prefix: str, get) -> list[str]:
    """The ``--model_type``s whose shapes a checkpoint has (``testing`` aside)."""
    shape = _shape_of(keys, prefix, get)
    return [
        name
        for name, config in CONFIGS.items()
        if name != "testing" and shape is not None and _config_shape(config) == shape
    ]


def _unusable(array: np.ndarray) -> str | None:
    """Why an array of the right key cannot be a weight, or None: strings, objects, integers,
    booleans or complex numbers, or values that are not finite (a damaged file)."""
    if array.dtype.kind != "f":
        return f"has dtype {array.dtype}, not floating point"
    finite = np.isfinite(array)
    if not finite.all():
        return f"holds {array.size - np.count_nonzero(finite)} NaN or infinite values"
    return None


def load_npz_weights(model: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Copy a Google checkpoint into ``model``; see the module docstring for the guarantees."""
    try:
        keys = set(weights.keys())
    except Exception as error:  # a dict-like that cannot even list its keys
        raise CheckpointError(f"cannot read the checkpoint's keys: {error}") from None
    if odd := sorted(repr(k) for k in keys if not isinstance(k, str)):
        raise CheckpointError(f"checkpoint keys must be strings, found {describe_keys(odd)}")

    def get(key: str) -> np.ndarray:
        try:
            return np.asarray(weights[key])
        except Exception as error:
            raise CheckpointError(
                f"cannot read {key} from the checkpoint ({error}); it may be truncated: "
                "download it again"
            ) from None

    stem = _STEMS[is_mixer(model.config)]
    prefix = next((p for p in _PREFIXES if f"{p}{stem}" in keys), "")
    heads = _heads(model)
    params = dict(model.named_parameters())
    converted: dict[str, torch.Tensor] = {}
    missing, mismatched, unusable, consumed = [], [], [], set()
    for entry in _layout(model):
        key, target = prefix + entry.key, params[entry.param]
        if entry.param.startswith("head.") and model.zero_head:
            consumed.add(key)
            converted[entry.param] = torch.zeros_like(target)
            continue
        if key not in keys:
            missing.append(entry.key)
            continue
        consumed.add(key)
        array = get(key)
        if problem := _unusable(array):
            unusable.append(f"{entry.key} {problem}")
            continue
        expected = _google_shape(tuple(target.shape), entry.kind, heads)
        if entry.key == _POSEMB and array.ndim == 3 and array.shape[-1] == expected[-1]:
            if array.shape != expected:
                grid = model.transformer.embeddings.grid_size
                log.info("resizing position embedding %s -> %s", array.shape, expected)
                array = resize_pos_embed(array, grid)
        elif entry.kind == "plain" and array.size == target.numel() and array.ndim > len(expected):
            array = array.reshape(expected)  # older files store GroupNorm scales as (1, 1, 1, C)
        if array.shape != expected:
            hint = ""
            if entry.param.startswith("head."):
                hint = " (to fine-tune on a new class count use zero_head=True)"
            elif "/token_mixing/" in entry.key and not any("token-" in m for m in mismatched):
                hint = " (token-mixing weights fix the patch count: use the checkpoint's img_size)"
            mismatched.append(f"{entry.key} {array.shape} != expected {expected}{hint}")
            continue
        converted[entry.param] = torch.from_numpy(
            np.ascontiguousarray(_to_torch(array.astype(np.float32), entry.kind))
        )

    pre_logits = {k for k in keys if k.startswith(prefix + "pre_logits/")}
    if pre_logits and not hasattr(model, "pre_logits"):
        consumed |= pre_logits
        if not model.zero_head:
            mismatched.append(
                "pre_logits: the checkpoint's head reads a pre-logits layer the model lacks; "
                "set representation_size (--config representation_size=N) or use zero_head=True"
            )
        else:
            log.info("dropping the checkpoint's pre_logits layer, as fine-tuning does")
    unexpected = sorted(k for k in keys if k.startswith(prefix) and k not in consumed)
    if missing or mismatched or unexpected or unusable:
        problems = []
        if unusable:
            problems.append(f"{len(unusable)} unusable arrays: {describe_keys(unusable)}")
        if missing:
            problems.append(f"{len(missing)} missing keys: {describe_keys(missing)}")
        if mismatched:
            problems.append(f"{len(mismatched)} mismatched shapes: {describe_keys(mismatched)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {describe_keys(unexpected)}")
        verdict = (
            f"does not fit the model ({_describe(model)})"
            if missing or mismatched or unexpected
            else "is damaged (download it again, or export it again)"
        )
        types = fitting_types(keys, prefix, get) if missing or mismatched or unexpected else []
        fits = f"; it is a checkpoint of --model_type {' or '.join(types)}" if types else ""
        raise CheckpointError(
            f"checkpoint ({_summary(keys, prefix, get)}) {verdict}: " + "; ".join(problems) + fits
        )
    with torch.no_grad():
        for name, value in converted.items():
            params[name].copy_(value)


def export_npz_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Our model's weights under Google's keys and layouts, ready for ``np.savez``."""
    heads = _heads(model)
    params = dict(model.named_parameters())
    return {e.key: _to_google(params[e.param], e.kind, heads) for e in _layout(model)}
