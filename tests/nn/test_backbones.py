"""wsss_fast.nn.backbones: the convolutional stem and the tied query-key initialisation."""

import pytest
import torch
import torch.nn.functional as F

from wsss_fast.nn import ConvStemEmbed, create_vit
from wsss_fast.nn.backbones import tie_query_key

pytest.importorskip("timm")

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=0)


def test_conv_stem_gives_the_patch_grid():
    vit = create_vit("vit_tiny_patch16_224", stem="conv", img_size=64, patch_size=8, **TINY)
    assert isinstance(vit.patch_embed, ConvStemEmbed)
    # log2(8) = 3 stride-2 convolutions, then the 1x1 projection
    strided = [
        m for m in vit.patch_embed.proj if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)
    ]
    assert len(strided) == 3
    tokens = vit.patch_embed(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 64, 32)  # 8 x 8 grid, embed 32
    assert vit(torch.randn(2, 3, 64, 64)).shape == (2, 32)


def test_stem_and_init_errors(tmp_path):
    with pytest.raises(ValueError, match="power of two"):
        create_vit("vit_tiny_patch16_224", stem="conv", img_size=60, patch_size=6, **TINY)
    with pytest.raises(ValueError, match="stem="):
        create_vit("vit_tiny_patch16_224", stem="hybrid", **TINY)
    with pytest.raises(ValueError, match="pretrained"):
        create_vit("vit_tiny_patch16_224", stem="conv", pretrained=tmp_path / "w.pth", **TINY)
    with pytest.raises(ValueError, match="from scratch"):
        create_vit("vit_tiny_patch16_224", qk_init="tied", pretrained=tmp_path / "w.pth", **TINY)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        create_vit("vit_tiny_patch16_224", pretrained=tmp_path / "missing.pth", **TINY)


def test_tied_query_key_makes_attention_a_similarity_kernel():
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", qk_init="tied", img_size=32, **TINY)
    attn = vit.blocks[0].attn
    dim = attn.qkv.in_features
    assert torch.equal(attn.qkv.weight[:dim], attn.qkv.weight[dim : 2 * dim])
    assert torch.count_nonzero(attn.qkv.bias[: 2 * dim]) == 0
    # On layer-normalised random tokens a token attends to itself more than to any other
    # (q_i.k_j = x_i W W^T x_j: a PSD form) for nearly every token, and far above uniform.
    x = F.layer_norm(torch.randn(1, 50, dim), (dim,))
    q, k, _ = attn.qkv(x).reshape(1, 50, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    p = (q @ k.transpose(-1, -2) * attn.head_dim**-0.5).softmax(-1)[0]  # [H, 50, 50]
    diag = p.diagonal(dim1=-2, dim2=-1)
    assert (p.argmax(-1) == torch.arange(50)).float().mean() > 0.9
    assert diag.mean() > 5 / 50
    # timm's own init is close to uniform attention
    plain = create_vit("vit_tiny_patch16_224", img_size=32, **TINY).blocks[0].attn
    q2, k2, _ = plain.qkv(x).reshape(1, 50, 3, 2, 16).permute(2, 0, 3, 1, 4)
    p2 = (q2 @ k2.transpose(-1, -2) * 16**-0.5).softmax(-1)[0]
    assert p2.diagonal(dim1=-2, dim2=-1).mean() < 2 / 50
    assert tie_query_key(torch.nn.Linear(2, 2)) == 0  # no attention layer: nothing changed
