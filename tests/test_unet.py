import math

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from course_lib.unet import (Attention, DownBlock, ResBlock, UNet, UpBlock, group_norm,
                             sinusoidal_embedding)

RECIPE = dict(base=32, channel_mults=(1, 2, 2), depth=1, attention_resolutions=(7, 8),
              image_size=28, dropout=0.0, num_steps=1000)


def randomize(model: nn.Module) -> nn.Module:
    """Undo the zero initialisation of the output convolution so every path carries signal."""
    torch.manual_seed(0)
    for p in model.parameters():
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.02)
    return model


def test_sinusoidal_embedding_matches_diffusers_and_the_formula():
    t = torch.tensor([0, 1, 17, 999])
    ours = sinusoidal_embedding(t, 32)
    torch.testing.assert_close(ours, get_timestep_embedding(t, 32, flip_sin_to_cos=False,
                                                            downscale_freq_shift=0))
    k, half = 5, 16
    assert ours[2, k].item() == pytest.approx(math.sin(17 * 10_000 ** (-k / half)), abs=1e-6)
    assert ours[2, half + k].item() == pytest.approx(math.cos(17 * 10_000 ** (-k / half)),
                                                     abs=1e-6)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(t, 31)


def test_group_norm_has_up_to_32_groups_of_at_least_4_channels():
    assert group_norm(32).num_groups == 8 and group_norm(256).num_groups == 32
    assert group_norm(6).num_groups == 1
    for bad in (2, 130):
        with pytest.raises(ValueError, match=f"cannot split {bad} channels"):
            group_norm(bad)


def test_res_block_skip_is_1x1_conv_only_when_channels_change():
    assert isinstance(ResBlock(32, 64, 128).skip, nn.Conv2d)
    assert ResBlock(32, 64, 128).skip.kernel_size == (1, 1)
    assert isinstance(ResBlock(32, 32, 128).skip, nn.Identity)


def test_res_block_is_gn_swish_conv_plus_time_then_gn_swish_conv_plus_skip():
    block = ResBlock(8, 16, 12).eval()
    x, emb = torch.randn(2, 8, 5, 5), torch.randn(2, 12)
    silu = nn.functional.silu
    h = block.conv1(silu(block.norm1(x))) + block.time(silu(emb)).view(2, 16, 1, 1)
    expected = block.skip(x) + block.conv2(silu(block.norm2(h)))
    torch.testing.assert_close(block(x, emb), expected)
    assert not torch.allclose(block(x, emb), block(x, emb + 1))  # the time embedding matters



def test_adaptive_norm_res_block_is_diffusers_scale_shift_resnet_block():
    """AdaGN (Dhariwal & Nichol sec. 3): the second GroupNorm's output scaled by 1 + e_s and
    shifted by e_b, as diffusers' ResnetBlock2D with time_embedding_norm="scale_shift"."""
    from diffusers.models.resnet import ResnetBlock2D
    block = randomize(ResBlock(8, 16, 12, adaptive_norm=True)).eval()
    peer = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=2,
                         groups_out=4, eps=1e-5, time_embedding_norm="scale_shift").eval()
    names = {"time": "time_emb_proj", "skip": "conv_shortcut"}
    peer.load_state_dict({names.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v
                          for k, v in block.state_dict().items()})
    x, emb = torch.randn(2, 8, 5, 5), torch.randn(2, 12)
    torch.testing.assert_close(block(x, emb), peer(x, emb))
    assert block.time.out_features == 2 * 16
    silu = nn.functional.silu
    scale, shift = block.time(silu(emb)).view(2, 32, 1, 1).chunk(2, dim=1)
    h = block.norm2(block.conv1(silu(block.norm1(x)))) * (1 + scale) + shift
    torch.testing.assert_close(block(x, emb), block.skip(x) + block.conv2(silu(h)))
    with pytest.raises(ValueError, match="adaptive_norm must be True or False"):
        UNet(**RECIPE, adaptive_norm="yes")

def test_attention_is_softmax_over_pixels_plus_input():
    torch.manual_seed(0)
    attn = Attention(8)
    x = torch.randn(2, 8, 3, 4)
    q, k, v = attn.qkv(attn.norm(x)).reshape(2, 3, 8, 12).unbind(1)  # [B, C, HW] each
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(8), dim=-1)  # [B, HW, HW]
    out = (v @ weights.transpose(1, 2)).reshape(2, 8, 3, 4)
    torch.testing.assert_close(attn(x), x + attn.out(out), rtol=1e-5, atol=1e-5)


def test_attention_context_hook_appends_tokens_to_keys_and_values():
    torch.manual_seed(0)
    attn = Attention(8, context_dim=6)
    x, context = torch.randn(2, 8, 3, 3), torch.randn(2, 5, 6)
    q, k, v = attn.qkv(attn.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)
    k_c, v_c = attn.context_kv(context).chunk(2, dim=2)
    k, v = torch.cat([k, k_c], 1), torch.cat([v, v_c], 1)
    out = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), -1) @ v  # [B, 9, 8]
    expected = x + attn.out(out.transpose(1, 2).reshape(2, 8, 3, 3))
    torch.testing.assert_close(attn(x, context), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="context_dim"):
        Attention(8)(x, context)



def test_context_mask_hides_padding_tokens():
    torch.manual_seed(0)
    attn = Attention(8, context_dim=6)
    x, context = torch.randn(2, 8, 3, 3), torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    padded = context.clone()
    padded[0, 2:] = 100.0  # whatever sits in the masked positions must not matter
    out = attn(x, padded, mask)
    torch.testing.assert_close(out[0], attn(x[:1], context[:1, :2])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], attn(x[1:], context[1:])[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(attn(x, padded)[0], out[0])


def test_out_channels_for_a_conditioning_image():
    model = UNet(**{**RECIPE, "in_channels": 2}, out_channels=1).eval()
    out = model(torch.randn(2, 2, 28, 28), torch.tensor([3, 4]))
    assert out.shape == (2, 1, 28, 28) and model.out_channels == 1


def test_a_first_level_wider_than_base_reaches_the_output():
    """channel_mults[0] > 1: the last up block ends at base * channel_mults[0] channels, which the
    output's norm and convolution take (a U-Net for 4-channel 8x8 latents, notebook 11)."""
    model = UNet(in_channels=4, base=32, channel_mults=(2, 4), depth=1,
                 attention_resolutions=(4,), image_size=8, dropout=0.0)
    assert model.norm_out.num_channels == model.conv_out.in_channels == 64
    assert model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2])).shape == (2, 4, 8, 8)


def test_down_and_up_blocks_pass_skips_by_concatenation():
    down = DownBlock(8, 16, depth=2, time_dim=12, attention=True, dropout=0.0, context_dim=None)
    up = UpBlock(16, 16, 8, depth=2, time_dim=12, attention=False, dropout=0.0,
                 context_dim=None)
    x, emb, skips = torch.randn(2, 8, 8, 8), torch.randn(2, 12), []
    h = down(x, emb, skips, None, None)
    assert h.shape == (2, 16, 4, 4) and [s.shape for s in skips] == [(2, 16, 8, 8)] * 2
    assert len(down.attn) == 2 and len(up.attn) == 0
    assert up.res[0].conv1.in_channels == 16 + 16 and up.res[1].conv1.in_channels == 8 + 16
    out = up(h, emb, skips, None, None)
    assert out.shape == (2, 8, 8, 8) and skips == []


@pytest.mark.parametrize("size", [28, 32])
def test_unet_serves_28_and_32(size, device):
    model = UNet(**{**RECIPE, "image_size": size}).to(device)
    x, t = torch.randn(3, 1, size, size, device=device), torch.tensor([0, 500, 999],
                                                                       device=device)
    assert model(x, t).shape == x.shape
    assert model.mid_attn is not None  # the middle runs at 7x7 or 8x8


def test_recipe_size_and_zero_output_at_init():
    model = UNet(**RECIPE)
    assert sum(p.numel() for p in model.parameters()) == 509_857
    x = torch.randn(2, 1, 28, 28)
    assert model(x, torch.tensor([3, 4])).abs().max() == 0  # eps_theta starts at 0


def test_every_parameter_gets_a_gradient_and_t_matters():
    model = randomize(UNet(**{**RECIPE, "channel_mults": (1, 2, 2, 2), "image_size": 32,
                              "attention_resolutions": (8, 4), "depth": 2}))
    x = torch.randn(2, 1, 32, 32)
    out = model(x, torch.tensor([1, 900]))
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert not torch.allclose(out[0], model(x, torch.tensor([700, 900]))[0])


def test_conditioning_hook():
    model = randomize(UNet(**RECIPE, context_dim=6)).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 20])
    plain = model(x, t)
    torch.testing.assert_close(model(x, t, cond=torch.zeros(2, model.time_dim)), plain)
    assert not torch.allclose(model(x, t, cond=torch.randn(2, model.time_dim)), plain)
    assert not torch.allclose(model(x, t, context=torch.randn(2, 4, 6)), plain)


def test_unet_errors():
    model = UNet(**RECIPE)
    with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
        model(torch.zeros(2, 1, 32, 32), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer steps"):
        model(torch.zeros(2, 1, 28, 28), torch.tensor([0.5, 0.1]))
    with pytest.raises(ValueError, match=r"\[B\] = \[2\]"):
        model(torch.zeros(2, 1, 28, 28), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"0\.\.999"):
        model(torch.zeros(2, 1, 28, 28), torch.tensor([1, 1000]))
    with pytest.raises(ValueError, match="cond must be"):
        model(torch.zeros(2, 1, 28, 28), torch.tensor([1, 2]), cond=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="divisible"):
        UNet(image_size=28, channel_mults=(1, 2, 2, 2))


@pytest.mark.parametrize("change, message", [
    ({"base": 4096}, r"base must be an integer in 1\.\.512, got 4096"),
    ({"num_steps": 1e12}, r"num_steps must be an integer in 1\.\.100000, got 1000000000000\.0"),
    ({"depth": 0}, r"depth must be an integer in 1\.\.8"),
    ({"image_size": -28}, r"image_size must be an integer"),
    ({"channel_mults": (1, 2, 64)}, r"channel_mults\[2\] must be an integer in 1\.\.16"),
    ({"channel_mults": 2}, r"channel_mults must be a list of 2 to 8 integers"),
    ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
])
def test_sizes_beyond_any_course_model_are_refused_before_a_layer_is_built(change, message,
                                                                           monkeypatch):
    def no_layers(*args, **kwargs):
        raise AssertionError("a layer was built before the sizes were checked")

    monkeypatch.setattr(nn.Module, "__init__", no_layers)
    with pytest.raises(ValueError, match=message):
        UNet(**{**RECIPE, **change})


def test_level_table_follows_the_tensor_through_the_recipe_network():
    from course_lib.unet import level_table

    model = UNet(**RECIPE)
    rows = level_table(model)
    assert [r["part"] for r in rows] == ["time embedding (sinusoid + MLP)", "input convolution",
                                         "down 1", "down 2", "middle", "up 2", "up 1",
                                         "output (GroupNorm, swish, convolution)"]
    assert [r["resolution"] for r in rows[2:]] == ["28x28 -> 14x14", "14x14 -> 7x7", "7x7",
                                                   "7x7 -> 14x14", "14x14 -> 28x28", "28x28"]
    assert [r["channels"] for r in rows[1:]] == ["1 -> 32", "32 -> 32", "32 -> 64", "64 -> 64",
                                                 "64 + 64 skip -> 64", "64 + 32 skip -> 32",
                                                 "32 -> 1"]
    assert [r["self-attention"] for r in rows] == [False] * 4 + [True] + [False] * 3
    assert sum(r["parameters"] for r in rows) == sum(p.numel() for p in model.parameters())
    deeper = UNet(base=16, channel_mults=(1, 2, 4), depth=2, attention_resolutions=(14,))
    rows = level_table(deeper)
    assert [r["residual blocks"] for r in rows[2:7]] == [2, 2, 2, 2, 2]
    assert [r["self-attention"] for r in rows[2:7]] == [False, True, False, True, False]
    assert sum(r["parameters"] for r in rows) == sum(p.numel() for p in deeper.parameters())
