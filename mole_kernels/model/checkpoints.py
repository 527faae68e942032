"""Checkpoint folders in the official (Hugging Face) layout: config.json plus model.safetensors or
pytorch_model.bin (single or sharded), read and written with clear errors naming the file."""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Dict, List

import torch
from torch import nn

from .._files import atomic_path, atomic_write
from .config import MoLEConfig

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
BIN_WEIGHTS = "pytorch_model.bin"
_INDEX = ".index.json"
LUT_KEY = "model.moe_table.weight"
# Shard names as Hugging Face writes them (model-00001-of-00002.safetensors, ...).
_HF_SHARD = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")


def _read_json(fpath: str, where: str, what: str):
    try:
        with open(fpath, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: {fpath} is not valid JSON {what} ({e})") from None


def _read_config(path: str, where: str) -> MoLEConfig:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}: {path!r} is not a directory (expected a Hugging Face-format folder "
                                f"with {CONFIG_NAME} and {SAFE_WEIGHTS} or {BIN_WEIGHTS})")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{where}: {path!r} has no {CONFIG_NAME}")
    return MoLEConfig.from_dict(_read_json(cfg_path, where, "(a config)"), source=f"{where}: {cfg_path}")


def _shard_names(ipath: str, where: str) -> List[str]:
    """The shard file names a ``*.index.json`` lists: plain names in its folder, each a weight file."""
    index = _read_json(ipath, where, "(a shard index)")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ValueError(f"{where}: {ipath} is not a valid shard index (expected {{\"weight_map\": {{tensor name: "
                         f"shard file name}}}})")
    shards = sorted(set(weight_map.values()))
    for name in shards:
        # A shard outside the folder, or a file that is not weights, is not something to read (or delete).
        if os.path.basename(name) != name or name in (".", "..") or not name.endswith((".safetensors", ".bin")):
            raise ValueError(f"{where}: {ipath} lists shard {name!r}, which is not a .safetensors/.bin file name in "
                             "its folder")
    return shards


def _weight_files(path: str, where: str) -> List[str]:
    """The weight files of a folder: single or sharded (``*.index.json``), safetensors preferred."""
    for single in (SAFE_WEIGHTS, BIN_WEIGHTS):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
        ipath = os.path.join(path, single + _INDEX)
        if os.path.isfile(ipath):
            files = [os.path.join(path, s) for s in _shard_names(ipath, where)]
            for fpath in files:
                if not os.path.isfile(fpath):
                    raise FileNotFoundError(f"{where}: shard {fpath} listed in {ipath} is missing")
            return files
    raise FileNotFoundError(f"{where}: {path!r} has no {SAFE_WEIGHTS} or {BIN_WEIGHTS} (nor a sharded index)")


def _load_state_dict(files: List[str], where: str) -> Dict[str, torch.Tensor]:
    sd: Dict[str, torch.Tensor] = {}
    for fpath in files:
        try:
            if fpath.endswith(".safetensors"):
                from safetensors.torch import load_file

                part = load_file(fpath, device="cpu")
            else:
                part = torch.load(fpath, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say which
            raise ValueError(f"{where}: cannot read weights from {fpath}: {e}") from e
        if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in part.items()):
            raise ValueError(f"{where}: {fpath} does not hold a state dict (names -> tensors)")
        twice = sorted(set(sd) & set(part))
        if twice:
            raise ValueError(f"{where}: {fpath} repeats tensor(s) of another shard, e.g. {twice[:4]}")
        sd.update(part)
    return sd


def _stale_files(path: str, keep: str) -> List[str]:
    """What a save of ``keep`` would leave behind in ``path`` for a loader to find: the other weight
    file, every shard index and the shards they list or that are named like shards."""
    names = {SAFE_WEIGHTS, BIN_WEIGHTS, SAFE_WEIGHTS + _INDEX, BIN_WEIGHTS + _INDEX}
    for index in (SAFE_WEIGHTS + _INDEX, BIN_WEIGHTS + _INDEX):
        ipath = os.path.join(path, index)
        if os.path.isfile(ipath):
            try:
                names.update(_shard_names(ipath, "save_pretrained"))
            except ValueError:
                pass  # a broken index is removed; what it lists is not trusted
    names.update(n for n in os.listdir(path) if _HF_SHARD.match(n))
    names.discard(keep)
    return sorted(n for n in names if os.path.isfile(os.path.join(path, n)) or os.path.islink(os.path.join(path, n)))


def save_checkpoint(path: str, sd: Dict[str, torch.Tensor], config: dict, safe: bool) -> None:
    """Writes ``config.json`` and the weights (``model.safetensors`` or ``pytorch_model.bin``) into
    the folder ``path``, replacing any earlier checkpoint there.

    Every file is written whole or not at all (:mod:`mole_kernels._files`). The folder changes only
    after the weights are fully written: then ``config.json`` is removed, every weight file, shard
    index and shard of an earlier save that a loader could pick up instead is removed, the weights
    are published and the new ``config.json`` is written last. A crash in that short window leaves a
    folder without ``config.json`` (a loud error on load), never old weights read with a new config.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"save_pretrained: {path!r} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    keep = SAFE_WEIGHTS if safe else BIN_WEIGHTS
    for name in (keep, CONFIG_NAME):  # refused now: found when publishing, the old files would be gone
        if os.path.isdir(os.path.join(path, name)):
            raise ValueError(f"save_pretrained: {os.path.join(path, name)!r} is a directory")
    with atomic_path(os.path.join(path, keep)) as tmp:
        if safe:
            from safetensors.torch import save_file

            save_file(sd, tmp, metadata={"format": "pt"})
        else:
            torch.save(sd, tmp)
        for name in [CONFIG_NAME] + _stale_files(path, keep):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(path, name))
    with atomic_write(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _is_expert_key(k: str) -> bool:
    return ".experts." in k or k.endswith("expert_layernorm.weight")


def _check_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor], where: str, path: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        msg = []
        if missing:
            msg.append(f"missing {len(missing)} tensor(s), e.g. {missing[:4]}")
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:4]}")
        raise ValueError(f"{where}: {path!r} does not match its config.json: " + "; ".join(msg))
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{where}: {path!r}: tensor {k} has shape {list(sd[k].shape)}, the config needs "
                             f"{list(shape)}")
        if not sd[k].is_floating_point():
            raise ValueError(f"{where}: {path!r}: tensor {k} has dtype {sd[k].dtype}, expected a float type")
