"""Checkpoint folders in the official (Hugging Face) layout: config.json plus model.safetensors or
pytorch_model.bin (single or sharded), read and written with clear errors naming the file."""
from __future__ import annotations

import json
import os
from typing import Dict, List

import torch
from torch import nn

from .config import MoLEConfig

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
BIN_WEIGHTS = "pytorch_model.bin"
LUT_KEY = "model.moe_table.weight"


def _read_config(path: str, where: str) -> MoLEConfig:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}: {path!r} is not a directory (expected a Hugging Face-format folder "
                                f"with {CONFIG_NAME} and {SAFE_WEIGHTS} or {BIN_WEIGHTS})")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{where}: {path!r} has no {CONFIG_NAME}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: {cfg_path} is not valid JSON ({e})") from None
    return MoLEConfig.from_dict(d, source=f"{where}: {cfg_path}")


def _weight_files(path: str, where: str) -> List[str]:
    """The weight files of a folder: single or sharded (``*.index.json``), safetensors preferred."""
    for single, index in ((SAFE_WEIGHTS, SAFE_WEIGHTS + ".index.json"), (BIN_WEIGHTS, BIN_WEIGHTS + ".index.json")):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
        ipath = os.path.join(path, index)
        if os.path.isfile(ipath):
            try:
                with open(ipath, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{where}: {ipath} is not a valid shard index ({e!r})") from None
            files = [os.path.join(path, s) for s in shards]
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
        if not isinstance(part, dict):
            raise ValueError(f"{where}: {fpath} does not hold a state dict")
        sd.update(part)
    return sd


def _save_state_dict(sd: Dict[str, torch.Tensor], path: str, safe: bool) -> None:
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    if safe:
        from safetensors.torch import save_file

        save_file(sd, os.path.join(path, SAFE_WEIGHTS), metadata={"format": "pt"})
    else:
        torch.save(sd, os.path.join(path, BIN_WEIGHTS))


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
