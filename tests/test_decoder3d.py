import pytest
import torch
import torch.nn.functional as F

from sam3d.models.volumetric.decoder3d import MLADecoder3D


@pytest.mark.parametrize("shape", [(16, 16, 16), (8, 16, 24)])
def test_output_shape(shape):
    torch.manual_seed(0)
    dec = MLADecoder3D(in_dim=8, dim=4, num_classes=2, num_levels=3)
    tok = tuple(s // 4 for s in shape)
    maps = [torch.randn(2, 8, *tok) for _ in range(3)]
    small = torch.randn(2, 1, *(s // 2 for s in shape))
    out = dec(maps, small, shape)
    assert out.shape == (2, 2, *shape)


def test_every_level_and_the_image_reach_the_logits():
    torch.manual_seed(0)
    dec = MLADecoder3D(in_dim=8, dim=4, num_levels=4)
    maps = [torch.randn(1, 8, 4, 4, 4, requires_grad=True) for _ in range(4)]
    small = torch.randn(1, 1, 8, 8, 8, requires_grad=True)
    dec(maps, small, (16, 16, 16)).square().sum().backward()
    for t in [*maps, small]:
        assert t.grad.abs().sum() > 0


def test_matches_the_anchor_recipe_step_by_step():
    """Heads: conv-IN-ReLU x2, x2 trilinear (align_corners=True); cat with the image; fuse."""
    torch.manual_seed(0)
    dec = MLADecoder3D(in_dim=8, dim=4, num_levels=2).double()
    maps = [torch.randn(1, 8, 4, 4, 4, dtype=torch.float64) for _ in range(2)]
    small = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)

    def block(x, conv):
        return F.relu(F.instance_norm(F.conv3d(x, conv.weight, padding=1)))

    levels = []
    for head, m in zip(dec.heads, maps):
        y = block(block(m, head[0]), head[3])
        levels.append(F.interpolate(y, scale_factor=2, mode="trilinear", align_corners=True))
    y = block(torch.cat([*levels, small], 1), dec.cls[0])
    y = F.conv3d(y, dec.cls[3].weight, padding=1)
    expected = F.interpolate(y, scale_factor=2, mode="trilinear", align_corners=True)
    torch.testing.assert_close(dec(maps, small, (16, 16, 16)), expected)


def test_vit_b_decoder_size():
    # 4 heads of 3^3 convs 256->128->128 (no bias), a 513->128 fuse conv and 128->2 classifier
    per_head = 27 * (256 * 128 + 128 * 128)
    expected = 4 * per_head + 27 * (513 * 128 + 128 * 2)
    assert sum(p.numel() for p in MLADecoder3D().parameters()) == expected == 7_088_256
