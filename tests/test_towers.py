"""Loading towers: tiny architectures by name, local open_clip files, OpenAI TorchScript files, clear errors."""
import pytest
import torch

from training.towers import TowerLoadError, load_clip


def test_tiny_architectures_load_by_name():
    for name in ("PKD-Tiny-Teacher", "PKD-Tiny-Student"):
        model, pre = load_clip(name, None)
        assert pre.image_size == 32
        assert model.encode_image(torch.zeros(1, 3, 32, 32)).shape[-1] == model.visual.output_dim


def test_local_state_dict_file_loads_those_weights(tiny_weights):
    model, _ = load_clip("PKD-Tiny-Student", str(tiny_weights["student"]))
    saved = torch.load(tiny_weights["student"], weights_only=True)
    assert torch.equal(model.visual.conv1.weight, saved["visual.conv1.weight"])


def test_openai_torchscript_file_loads(tmp_path, tiny_weights):
    """OpenAI's .pt files are TorchScript archives: make one in that form from a tiny model."""
    model, _ = load_clip("PKD-Tiny-Student", str(tiny_weights["student"]))
    # OpenAI's archives keep the text mask as a plain attribute and carry metadata buffers.
    model.attn_mask = model._buffers.pop("attn_mask")
    model.register_buffer("input_resolution", torch.tensor(32))
    traced = torch.jit.trace_module(model, {"encode_image": torch.zeros(1, 3, 32, 32)}, check_trace=False)
    path = tmp_path / "openai-style.pt"
    torch.jit.save(traced, str(path))
    loaded, _ = load_clip("PKD-Tiny-Student", str(path))
    assert torch.equal(loaded.visual.conv1.weight, model.visual.conv1.weight)
    assert torch.equal(loaded.token_embedding.weight, model.token_embedding.weight)


def test_unknown_architecture_and_tag_have_clear_errors():
    with pytest.raises(TowerLoadError, match="unknown model architecture"):
        load_clip("ViT-Nope-1", None)
    with pytest.raises(TowerLoadError, match="neither a local file nor a known open_clip tag"):
        load_clip("PKD-Tiny-Student", "no-such-tag")


def test_failed_download_tells_the_user_to_pass_a_local_file():
    with pytest.raises(TowerLoadError, match="pass its local path"):
        load_clip("ViT-B-16", "openai")
