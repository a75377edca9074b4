"""Finding and reading checkpoints: HF safetensors directories (sharded too) and GGUF files."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the file and tensor."""


@dataclass(frozen=True)
class Checkpoint:
    directory: str
    gguf_file: str | None = None  # file name inside ``directory`` when the weights are GGUF

    @property
    def display(self) -> str:
        return os.path.join(self.directory, self.gguf_file) if self.gguf_file else self.directory


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_checkpoint(path: str) -> Checkpoint:
    """A directory with config.json + safetensors, a directory with one .gguf, a .gguf path, or a Hugging Face
    hub id ("org/name") already in the local hub cache (nothing is downloaded)."""
    path = os.path.expanduser(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return Checkpoint(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    if not os.path.isdir(path):
        if _HUB_ID.match(path):
            return resolve_checkpoint(_cached_hub_snapshot(path))
        raise CheckpointError(f"{path}: no such checkpoint directory or .gguf file")
    if os.path.isfile(os.path.join(path, "config.json")):
        return Checkpoint(os.path.abspath(path))
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return Checkpoint(os.path.abspath(path), ggufs[0])
    if len(ggufs) > 1:
        raise CheckpointError(f"{path}: several .gguf files ({', '.join(ggufs)}); pass one file's path")
    raise CheckpointError(f"{path}: neither config.json nor a .gguf file found")


def _cached_hub_snapshot(repo_id: str) -> str:
    """The local snapshot of a hub model, found offline (``local_files_only``)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise CheckpointError(
            f"{repo_id}: not a local directory, and no snapshot of the hub model {repo_id!r} is in the local "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}); nothing is downloaded: fetch it first "
            f"(`hf download {repo_id}`) or pass the path of a checkpoint directory or .gguf file") from None


def load_config(ckpt: Checkpoint) -> Any:
    from transformers import AutoConfig

    try:
        if ckpt.gguf_file:
            return AutoConfig.from_pretrained(ckpt.directory, gguf_file=ckpt.gguf_file)
        return AutoConfig.from_pretrained(ckpt.directory)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt.display}: cannot read config: {str(e).splitlines()[0]}") from e


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(ckpt: Checkpoint) -> Any | None:
    """The checkpoint's tokenizer, or None when it ships none (prompts must then be token ids)."""
    from transformers import AutoTokenizer

    if ckpt.gguf_file:
        return AutoTokenizer.from_pretrained(ckpt.directory, gguf_file=ckpt.gguf_file)
    if not any(os.path.isfile(os.path.join(ckpt.directory, f)) for f in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(ckpt.directory)


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
        if missing:
            raise CheckpointError(f"{index}: lists shard {missing[0]} which does not exist")
        return files
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weight files")
    return files


def iter_safetensors(directory: str) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(tensor name, tensor, file) for every tensor of every shard."""
    from safetensors import SafetensorError, safe_open

    for file_name in _safetensors_files(directory):
        path = os.path.join(directory, file_name)
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), path
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({str(e).splitlines()[0]})") from e
