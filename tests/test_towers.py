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
    from open_clip.transformer import QuickGELU

    assert _activations(loaded) == {QuickGELU}  # every OpenAI CLIP was trained with QuickGELU
    assert torch.equal(loaded.visual.conv1.weight, model.visual.conv1.weight)
    assert torch.equal(loaded.token_embedding.weight, model.token_embedding.weight)


def test_unknown_architecture_and_tag_have_clear_errors():
    with pytest.raises(TowerLoadError, match="unknown model architecture"):
        load_clip("ViT-Nope-1", None)
    with pytest.raises(TowerLoadError, match="neither a local file nor a known open_clip tag"):
        load_clip("PKD-Tiny-Student", "no-such-tag")


def test_failed_download_tells_the_user_to_pass_a_local_file():
    with pytest.raises(TowerLoadError, match="weights file beside the tag"):
        load_clip("ViT-B-16", "openai")


def _activations(model) -> set[type]:
    return {type(block.mlp.gelu) for block in model.visual.transformer.resblocks}


@pytest.fixture(scope="module")
def vit_b16_state_dict(tmp_path_factory):
    """A real-size ViT-B/16 CLIP state dict (random weights) in open_clip's layout, as a local `.bin` file: the
    layout of the `openai` tag's download, which holds no hint of the activation it was trained with."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    path = tmp_path_factory.mktemp("vitb16") / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return path, model.visual.conv1.weight.detach().clone()


def test_openai_state_dict_as_a_local_file_keeps_quick_gelu(vit_b16_state_dict):
    from open_clip.transformer import QuickGELU

    path, conv1 = vit_b16_state_dict
    with pytest.raises(TowerLoadError, match="--teacher-pretrained openai --teacher-weights"):
        load_clip("ViT-B-16", str(path))  # which activation? the file cannot say: refused, never silently GELU
    model, pre = load_clip("ViT-B-16", "openai", weights=str(path))
    assert _activations(model) == {QuickGELU}
    assert torch.equal(model.visual.conv1.weight, conv1)
    assert pre.image_size == 224 and pre.interpolation == "bicubic"
    model, _ = load_clip("ViT-B-16-quickgelu", str(path))
    assert _activations(model) == {QuickGELU}
    model, _ = load_clip("ViT-B-16", "laion2b_s34b_b88k", weights=str(path))
    assert _activations(model) == {torch.nn.GELU}


def test_weights_file_errors_are_clear(tmp_path, tiny_weights):
    with pytest.raises(TowerLoadError, match="does not exist"):
        load_clip("ViT-B-16", "openai", weights=str(tmp_path / "missing.bin"))
    with pytest.raises(TowerLoadError, match="both"):
        load_clip("PKD-Tiny-Student", str(tiny_weights["student"]), weights=str(tiny_weights["student"]))
