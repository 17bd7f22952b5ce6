import pytest
import torch

from sam3d.models.volumetric.prompt3d import PromptEncoder3D, points_to_grid, sample_point_tokens


def _encoder() -> PromptEncoder3D:
    torch.manual_seed(0)
    return PromptEncoder3D(dim=16, depth=2, num_heads=2, mlp_dim=32, num_queries=3).eval()


def test_sampling_reads_the_clicked_voxel():
    """A map holding each token's centre (in voxels) is linear, so trilinear sampling at a
    click returns the click itself (away from the border)."""
    shape, tok = (32, 24, 16), (8, 6, 4)
    centres = [(torch.arange(n, dtype=torch.float64) + 0.5) * 4 - 0.5 for n in tok]
    grids = torch.meshgrid(*centres, indexing="ij")
    fmap = torch.stack(grids)[None]  # 1 x 3 x 8 x 6 x 4
    points = torch.tensor([[[5.0, 7.25, 3.5], [20.0, 10.0, 9.0], [26.0, 17.5, 11.0]]])
    got = sample_point_tokens(fmap, points.double(), shape)
    torch.testing.assert_close(got, points.double())


def test_grid_maps_voxel_centres_to_align_corners_false():
    grid = points_to_grid(torch.tensor([[[0.0, 0.0, 0.0], [31.0, 15.0, 7.0]]]), (32, 16, 8))
    # (x, y, z) = (k, j, i); first voxel centre at -1 + 1/size, last at 1 - 1/size
    expected = torch.tensor(
        [[-1 + 1 / 8, -1 + 1 / 16, -1 + 1 / 32], [1 - 1 / 8, 1 - 1 / 16, 1 - 1 / 32]]
    )
    torch.testing.assert_close(grid[0, 0, 0], expected)


def test_output_shape_and_any_number_of_clicks():
    enc = _encoder()
    emb = torch.randn(2, 16, 4, 3, 5)
    for n in (0, 1, 7):
        out = enc(emb, torch.rand(2, n, 3) * 12, torch.ones(2, n, dtype=torch.long), (16, 12, 20))
        assert out.shape == emb.shape and torch.isfinite(out).all()


def test_negative_label_changes_the_output():
    enc = _encoder()
    emb = torch.randn(1, 16, 4, 4, 4)
    pts = torch.tensor([[[6.0, 7.0, 8.0]]])
    pos = enc(emb, pts, torch.tensor([[1]]), (16, 16, 16))
    neg = enc(emb, pts, torch.tensor([[0]]), (16, 16, 16))
    assert (pos - neg).abs().max() > 1e-3


def test_click_order_does_not_matter():
    enc = _encoder()
    emb = torch.randn(1, 16, 4, 4, 4)
    pts = torch.tensor([[[1.0, 2.0, 3.0], [9.0, 4.0, 12.0], [14.0, 14.0, 2.0]]])
    lab = torch.tensor([[1, 0, 1]])
    perm = torch.tensor([2, 0, 1])
    a = enc(emb, pts, lab, (16, 16, 16))
    b = enc(emb, pts[:, perm], lab[:, perm], (16, 16, 16))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_padded_batch_equals_single_runs():
    enc = _encoder()
    emb = torch.randn(2, 16, 4, 4, 4)
    p0 = torch.tensor([[[3.0, 4.0, 5.0], [10.0, 2.0, 7.0], [12.0, 12.0, 1.0]]])
    p1 = torch.tensor([[[8.0, 8.0, 8.0]]])
    l0, l1 = torch.tensor([[1, 0, 1]]), torch.tensor([[1]])
    pad_pts = torch.cat([p0, torch.cat([p1, torch.full((1, 2, 3), 99.0)], 1)])
    pad_lab = torch.cat([l0, torch.cat([l1, torch.full((1, 2), -1)], 1)])
    batch = enc(emb, pad_pts, pad_lab, (16, 16, 16))
    torch.testing.assert_close(batch[:1], enc(emb[:1], p0, l0, (16, 16, 16)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[1:], enc(emb[1:], p1, l1, (16, 16, 16)), rtol=1e-5, atol=1e-5)


def test_bad_point_shapes_are_refused():
    enc = _encoder()
    emb = torch.randn(1, 16, 4, 4, 4)
    with pytest.raises(ValueError, match="B x N x 3"):
        enc(emb, torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.long), (16, 16, 16))
    with pytest.raises(ValueError, match="point_labels"):
        enc(emb, torch.zeros(1, 2, 3), torch.ones(1, 3, dtype=torch.long), (16, 16, 16))


def test_vit_b_prompt_encoder_size():
    # Two blocks of: self-attn 4*(256^2+256), two cross-attns 3*(256*128+128)+128*256+256 each,
    # MLP 2*256*2048+2048+256, four LayerNorms, 10 queries; plus the 2 x 256 label embedding.
    per_block = 4 * (256 * 256 + 256) + 2 * (3 * (256 * 128 + 128) + 128 * 256 + 256)
    per_block += 2 * 256 * 2048 + 2048 + 256 + 4 * 2 * 256 + 10 * 256
    enc = PromptEncoder3D()
    assert sum(p.numel() for p in enc.parameters()) == 2 * per_block + 2 * 256
