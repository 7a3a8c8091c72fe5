"""Reading some tensors of a Hugging Face checkpoint folder and adding new ones, without loading the model.

A checkpoint holds its weights in one file (``model.safetensors`` or ``pytorch_model.bin``) or in shards
listed by an index (``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``, whose
``weight_map`` names the file of every tensor). Adding tensors writes them to a new file in the same
format and lists them in the index; a single-file checkpoint becomes a two-shard one (its file is renamed,
since ``from_pretrained`` prefers a single file to an index). Nothing else is read or rewritten, so
converting a 13B checkpoint touches a few megabytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch

FORMATS = (  # (single file, index, new file for added tensors, shard name pattern)
    ("model.safetensors", "model.safetensors.index.json", "model-meteor-projectors.safetensors",
     "model-{:05d}-of-{:05d}.safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-meteor-projectors.bin",
     "pytorch_model-{:05d}-of-{:05d}.bin"),
)


class CheckpointFilesError(ValueError):
    pass


@dataclass
class WeightFiles:
    folder: str
    single: str  # the single-file name of this format
    index: str  # the index name of this format
    added: str  # where added tensors go
    shard_pattern: str
    weight_map: Dict[str, str]  # tensor name -> file name
    indexed: bool

    @property
    def safetensors(self) -> bool:
        return self.single.endswith(".safetensors")


_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_json_object(path: str, what: str, error: type = ValueError) -> dict:
    """The JSON object in ``path``, or ``error`` naming the file when it is unreadable or not an object
    (``what`` says which object was expected, e.g. "a model config")."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not {what}")
    return data


def _load_bin(path: str) -> Dict[str, torch.Tensor]:
    # mmap: tensors are read from disk only when their data is used
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _keys(path: str, safetensors: bool) -> List[str]:
    if safetensors:
        from safetensors import safe_open

        with safe_open(path, "pt") as fh:
            return list(fh.keys())
    return list(_load_bin(path))


def _file_bytes(path: str, safetensors: bool) -> int:
    """Bytes of the tensors in one weights file, from their shapes and dtypes (no data is read)."""
    if not safetensors:
        return sum(t.numel() * t.element_size() for t in _load_bin(path).values())
    from safetensors import safe_open

    total = 0
    with safe_open(path, "pt") as fh:
        for key in fh.keys():
            piece = fh.get_slice(key)
            numel = 1
            for dim in piece.get_shape():
                numel *= dim
            total += numel * _SAFETENSORS_BYTES.get(piece.get_dtype(), 4)
    return total


def weight_files(folder: str) -> WeightFiles:
    """How ``folder`` stores its weights (safetensors preferred, as ``from_pretrained`` does)."""
    for single, index, added, pattern in FORMATS:
        if os.path.isfile(os.path.join(folder, single)):
            path = os.path.join(folder, single)
            weight_map = {k: single for k in _keys(path, single.endswith(".safetensors"))}
            return WeightFiles(folder, single, index, added, pattern, weight_map, indexed=False)
        if os.path.isfile(os.path.join(folder, index)):
            with open(os.path.join(folder, index), encoding="utf-8") as fh:
                weight_map = dict(json.load(fh)["weight_map"])
            return WeightFiles(folder, single, index, added, pattern, weight_map, indexed=True)
    raise CheckpointFilesError(
        f"{folder} has no model weights (model.safetensors, pytorch_model.bin or their .index.json): not a "
        "full checkpoint (a projector-only pretraining output has just mm_projector.bin)"
    )


def read_tensors(files: WeightFiles, names: Iterable[str]) -> Dict[str, torch.Tensor]:
    """The named tensors, reading only the files that hold them."""
    wanted: Dict[str, List[str]] = {}
    for name in names:
        if name not in files.weight_map:
            raise CheckpointFilesError(f"{files.folder} has no tensor {name!r}")
        wanted.setdefault(files.weight_map[name], []).append(name)
    out: Dict[str, torch.Tensor] = {}
    for file_name, keys in wanted.items():
        path = os.path.join(files.folder, file_name)
        if files.safetensors:
            from safetensors import safe_open

            with safe_open(path, "pt") as fh:
                out.update({k: fh.get_tensor(k) for k in keys})
        else:
            state = _load_bin(path)
            out.update({k: state[k].clone() for k in keys})
    return out


def _total_size(files: WeightFiles, index_data: Optional[dict]) -> int:
    if index_data is not None and "total_size" in index_data.get("metadata", {}):
        return int(index_data["metadata"]["total_size"])
    return sum(_file_bytes(os.path.join(files.folder, f), files.safetensors) for f in set(files.weight_map.values()))


def add_tensors(files: WeightFiles, tensors: Dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` into ``files.folder`` next to its weights; returns the new file's name."""
    clash = sorted(set(tensors) & set(files.weight_map))
    if clash:
        raise CheckpointFilesError(f"{files.folder} already has tensors named {clash[:3]}")
    folder = files.folder
    index_path = os.path.join(folder, files.index)
    index_data = None
    if files.indexed:
        with open(index_path, encoding="utf-8") as fh:
            index_data = json.load(fh)
        added = files.added
    else:
        # from_pretrained reads a single file before an index: the single file becomes shard 1 of 2.
        renamed = files.shard_pattern.format(1, 2)
        added = files.shard_pattern.format(2, 2)
        total = _total_size(files, None)
        os.replace(os.path.join(folder, files.single), os.path.join(folder, renamed))
        files.weight_map = {k: renamed for k in files.weight_map}
        index_data = {"metadata": {"total_size": total}, "weight_map": dict(files.weight_map)}
    if os.path.exists(os.path.join(folder, added)):
        raise CheckpointFilesError(f"{os.path.join(folder, added)} already exists")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if files.safetensors:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(folder, added), metadata={"format": "pt"})
    else:
        torch.save(tensors, os.path.join(folder, added))
    total = _total_size(files, index_data) + sum(t.numel() * t.element_size() for t in tensors.values())
    index_data.setdefault("metadata", {})["total_size"] = total
    index_data["weight_map"].update({k: added for k in tensors})
    index_data["weight_map"] = dict(sorted(index_data["weight_map"].items()))
    with open(index_path, "w", encoding="utf-8") as fh:
        json.dump(index_data, fh, indent=2)
        fh.write("\n")
    files.weight_map.update({k: added for k in tensors})
    files.indexed = True
    return added
