"""The references of ``wsss_fast.ops.reference`` against independent computations.

Every expected value comes from a different route than the reference takes: PyTorch's own
``scaled_dot_product_attention``, per-head and per-pair loops in NumPy, closed-form counts,
``matrix_power``, autograd through a materialised attention matrix, and per-pixel loops for
PAR and PAMR. Oracle comparisons run in float64, where ``torch.testing.assert_close``'s float64
tolerances (rtol 1e-7, atol 1e-7) apply.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

from wsss_fast.ops import reference as ref

F64 = torch.float64
SEEDS = (0, 1)


def _randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=F64).to(dtype)


def _rand(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator, dtype=F64)


def _qkv(*shape: int, seed: int, dtype: torch.dtype = F64) -> tuple[torch.Tensor, ...]:
    return tuple(_randn(*shape, seed=seed + i, dtype=dtype) for i in range(3))


def _cases(names: tuple[str, ...], *cases: tuple) -> list:
    """Parameter tuples with readable ids: ``_cases(("N", "prefix"), (5, 1))`` -> ``N5-prefix1``."""
    return [
        pytest.param(*case, id="-".join(f"{n}{v}" for n, v in zip(names, case, strict=True)))
        for case in cases
    ]


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# --------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("n", [1, 5, 17], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("scale", [None, 0.3], ids=["scale_default", "scale0.3"])
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_attention_out_matches_sdpa(n, scale, seed):
    q, k, v = _qkv(2, 3, n, 8, seed=seed)
    out = ref.attention(q, k, v, scale=scale)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=scale))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_attention_low_precision_inputs_give_output_in_their_dtype(dtype):
    q, k, v = _qkv(1, 2, 7, 4, seed=3, dtype=dtype)
    out = ref.attention(q, k, v)
    assert out.dtype == dtype
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    tolerance = 1e-3 if dtype == torch.float16 else 1e-6
    assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def _per_head_probabilities(q: torch.Tensor, k: torch.Tensor, scale: float) -> np.ndarray:
    """``P[b, h]`` built head by head and row by row in NumPy."""
    qn, kn = q.numpy(), k.numpy()
    batch, heads, n, _ = qn.shape
    p = np.empty((batch, heads, n, n))
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                p[b, h, i] = _np_softmax(kn[b, h] @ qn[b, h, i] * scale)
    return p


@pytest.mark.parametrize("n", [1, 5, 17], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_attention_mean_export_matches_per_head_loop(n, seed):
    q, k, v = _qkv(2, 3, n, 8, seed=seed)
    out, mean = ref.attention(q, k, v, export="mean", export_dtype=F64)
    p = _per_head_probabilities(q, k, 8**-0.5)
    heads = p.shape[1]
    expected = sum(p[:, h] for h in range(heads)) / heads
    assert mean.shape == (2, n, n)
    assert_close(mean, torch.from_numpy(expected))
    assert_close(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize(("n", "num_rows"), _cases(("N", "rows"), (1, 1), (5, 1), (5, 3), (17, 2)))
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_attention_rows_export_matches_per_head_loop(n, num_rows, seed):
    q, k, v = _qkv(2, 3, n, 8, seed=seed)
    _, rows = ref.attention(q, k, v, scale=0.7, export="rows", num_rows=num_rows, export_dtype=F64)
    expected = _per_head_probabilities(q, k, 0.7)[:, :, :num_rows, :]
    assert rows.shape == (2, 3, num_rows, n)
    assert_close(rows, torch.from_numpy(expected))


@pytest.mark.parametrize("export_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("export", ["mean", "rows"])
def test_attention_export_comes_back_in_export_dtype(export, export_dtype):
    q, k, v = _qkv(1, 2, 5, 4, seed=0, dtype=torch.float16)
    out, exported = ref.attention(q, k, v, export=export, export_dtype=export_dtype)
    assert out.dtype == torch.float16
    assert exported.dtype == export_dtype


@pytest.mark.parametrize("export", [None, "mean", "rows"], ids=str)
def test_attention_gradcheck(export):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 5, 3, seed=4))
    assert gradcheck(
        lambda q, k, v: ref.attention(q, k, v, export=export, num_rows=2, export_dtype=F64),
        (q, k, v),
    )


# ----------------------------------------------------------------------------- affinity_loss


def _random_labels(batch: int, num_patches: int, *, seed: int, classes: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes + 1, (batch, num_patches), generator=generator)
    return torch.where(labels == classes, torch.tensor(255), labels)


def _affinity_loss_pair_loop(q, k, labels, num_prefix, scale):
    """AReAM's loss accumulated pair by pair over valid label pairs in NumPy."""
    qn, kn, y = q.numpy(), k.numpy(), labels.numpy()
    batch, heads, n, _ = qn.shape
    pos_sum = neg_sum = 0.0
    n_pos = n_neg = 0
    for b in range(batch):
        for i in range(n - num_prefix):
            for j in range(n - num_prefix):
                if y[b, i] == 255 or y[b, j] == 255:
                    continue
                ti, tj = num_prefix + i, num_prefix + j
                logit = sum(qn[b, h, ti] @ kn[b, h, tj] for h in range(heads)) / heads * scale
                z = 1.0 / (1.0 + math.exp(-logit))
                if y[b, i] == y[b, j]:
                    pos_sum += 1.0 - z
                    n_pos += 1
                else:
                    neg_sum += z
                    n_neg += 1
    return 0.5 * pos_sum / (n_pos + 1) + 0.5 * neg_sum / (n_neg + 1)


@pytest.mark.parametrize(
    ("n", "num_prefix"), _cases(("N", "prefix"), (1, 0), (5, 1), (9, 0), (17, 2))
)
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_affinity_loss_matches_pair_loop(n, num_prefix, seed):
    q, k, _ = _qkv(2, 3, n, 4, seed=seed)
    labels = _random_labels(2, n - num_prefix, seed=seed)
    loss = ref.affinity_loss(q, k, labels, num_prefix=num_prefix, scale=0.8)
    assert loss.shape == () and loss.dtype == F64
    expected = _affinity_loss_pair_loop(q, k, labels, num_prefix, 0.8)
    assert_close(loss, torch.tensor(expected, dtype=F64))


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_affinity_loss_counts_follow_closed_form(seed):
    # With q = 0, Z = 1/2 everywhere, so loss = (n_pos/(n_pos+1) + n_neg/(n_neg+1)) / 4.
    batch, num_prefix, num_patches, classes = 3, 1, 40, 4
    k = _randn(batch, 2, num_prefix + num_patches, 4, seed=seed)
    labels = _random_labels(batch, num_patches, seed=seed, classes=classes)
    n_pos = n_neg = 0
    for b in range(batch):
        valid = labels[b][labels[b] != 255]
        per_class = torch.bincount(valid, minlength=classes)
        n_pos += int((per_class**2).sum())
        n_neg += len(valid) ** 2 - int((per_class**2).sum())
    loss = ref.affinity_loss(torch.zeros_like(k), k, labels, num_prefix=num_prefix)
    expected = (n_pos / (n_pos + 1) + n_neg / (n_neg + 1)) / 4
    assert_close(loss, torch.tensor(expected, dtype=F64))


def test_affinity_loss_all_ignored_is_zero_with_finite_gradients():
    q, k, _ = (t.requires_grad_() for t in _qkv(2, 2, 6, 4, seed=5))
    labels = torch.full((2, 5), 255)
    loss = ref.affinity_loss(q, k, labels, num_prefix=1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_affinity_loss_low_precision_inputs_give_float32_scalar():
    q, k, _ = _qkv(1, 2, 6, 4, seed=6, dtype=torch.float16)
    loss = ref.affinity_loss(q, k, _random_labels(1, 4, seed=6), num_prefix=2)
    assert loss.shape == () and loss.dtype == torch.float32


@pytest.mark.parametrize("num_prefix", [0, 2], ids=lambda p: f"prefix{p}")
def test_affinity_loss_gradcheck(num_prefix):
    q, k, _ = (t.requires_grad_() for t in _qkv(2, 2, 6, 3, seed=7))
    labels = _random_labels(2, 6 - num_prefix, seed=7)
    assert gradcheck(lambda q, k: ref.affinity_loss(q, k, labels, num_prefix=num_prefix), (q, k))


# --------------------------------------------------------------------------------- propagate


def _propagate_by_sdpa(q, k, cam, num_prefix, weights, scale):
    """DESIGN §3.3: attention whose values are the CAM, zero on prefix keys, summed over layers."""
    num_layers, _, heads, _, _ = q.shape
    values = F.pad(cam, (num_prefix, 0)).transpose(1, 2)  # [B, N, C], zero rows on prefix keys
    values = values.unsqueeze(1).expand(-1, heads, -1, -1)
    total = 0
    for layer in range(num_layers):
        out = F.scaled_dot_product_attention(q[layer], k[layer], values, scale=scale)
        total = total + weights[layer] * out.mean(dim=1)[:, num_prefix:, :]
    return total.transpose(1, 2)


@pytest.mark.parametrize(
    ("n", "num_prefix"), _cases(("N", "prefix"), (1, 0), (5, 1), (17, 2), (17, 0))
)
@pytest.mark.parametrize("custom_weights", [False, True], ids=["mean_layers", "weighted"])
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_propagate_matches_layerwise_sdpa_with_cam_values(n, num_prefix, custom_weights, seed):
    num_layers = 3
    q, k, _ = _qkv(num_layers, 2, 3, n, 8, seed=seed)
    cam = _randn(2, 4, n - num_prefix, seed=seed + 10)
    weights = _rand(num_layers, seed=seed) if custom_weights else None
    out = ref.propagate(q, k, cam, num_prefix=num_prefix, weights=weights, scale=0.4)
    expected_weights = weights if custom_weights else torch.full((num_layers,), 1 / num_layers)
    expected = _propagate_by_sdpa(q, k, cam, num_prefix, expected_weights, 0.4)
    assert out.shape == cam.shape
    assert_close(out, expected)


def test_propagate_output_in_cam_dtype():
    q, k, _ = _qkv(2, 1, 2, 6, 4, seed=8, dtype=torch.float16)
    cam = _randn(1, 3, 5, seed=8, dtype=torch.bfloat16)
    assert ref.propagate(q, k, cam, num_prefix=1).dtype == torch.bfloat16


def test_propagate_gradcheck():
    q, k, _ = (t.requires_grad_() for t in _qkv(2, 1, 2, 5, 3, seed=9))
    cam = _randn(1, 2, 4, seed=9).requires_grad_()
    weights = torch.tensor([0.3, 0.7], dtype=F64)
    assert gradcheck(
        lambda q, k, cam: ref.propagate(q, k, cam, num_prefix=1, weights=weights),
        (q, k, cam),
    )


# ------------------------------------------------------------------------------- random_walk


@pytest.mark.parametrize("steps", [0, 1, 3, 8], ids=lambda s: f"steps{s}")
@pytest.mark.parametrize("beta", [1.0, 3.5], ids=lambda b: f"beta{b}")
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_random_walk_matches_matrix_power(steps, beta, seed):
    aff = _rand(2, 7, 7, seed=seed) + 0.05
    cam = _randn(2, 3, 7, seed=seed + 1)
    a = aff.numpy() ** beta
    transition = a / a.sum(axis=1, keepdims=True)
    expected = cam.numpy() @ np.stack([np.linalg.matrix_power(t, steps) for t in transition])
    out = ref.random_walk(aff, cam, beta=beta, steps=steps)
    assert_close(out, torch.from_numpy(expected))


def test_random_walk_transition_is_column_stochastic_and_proportional_to_aff_power():
    aff = _rand(2, 6, 6, seed=11) + 0.1
    identity = torch.eye(6, dtype=F64).expand(2, 6, 6)
    transition = ref.random_walk(aff, identity, beta=2.0, steps=1)  # e_i @ T = row i of T
    assert_close(transition.sum(dim=1), torch.ones(2, 6, dtype=F64))
    column_ratio = transition / aff**2
    assert_close(column_ratio, column_ratio[:, :1, :].expand_as(column_ratio))


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_random_walk_outputs_are_convex_combinations(seed):
    # Columns of T sum to 1, so (cam @ T)_j averages cam: constants stay, values stay in range.
    aff = _rand(1, 9, 9, seed=seed)
    constant = torch.full((1, 2, 9), 3.25, dtype=F64)
    assert_close(ref.random_walk(aff, constant, beta=8.0, steps=5), constant)
    cam = _randn(1, 4, 9, seed=seed)
    out = ref.random_walk(aff, cam, beta=8.0, steps=5)
    assert (out >= cam.amin(dim=-1, keepdim=True) - 1e-12).all()
    assert (out <= cam.amax(dim=-1, keepdim=True) + 1e-12).all()


def test_random_walk_output_in_cam_dtype():
    aff = _rand(1, 5, 5, seed=12).float() + 0.1
    cam = _randn(1, 2, 5, seed=12, dtype=torch.float16)
    assert ref.random_walk(aff, cam, beta=2.0, steps=2).dtype == torch.float16


def test_random_walk_gradcheck():
    aff = (_rand(2, 5, 5, seed=13) + 0.2).requires_grad_()
    cam = _randn(2, 3, 5, seed=14).requires_grad_()
    assert gradcheck(lambda a, c: ref.random_walk(a, c, beta=2.5, steps=3), (aff, cam))


# --------------------------------------------------------------------------------- getam_map


def _getam_map_by_autograd(q, k, v, grad_out, row, scale):
    """The map from autograd's d(score)/dP on a materialised P, with score = <P v, grad_out>."""
    p = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1).detach().requires_grad_()
    score = (p @ v * grad_out).sum()
    (grad_p,) = torch.autograd.grad(score, p)
    a, g = p.detach()[..., row, :], grad_p[..., row, :]
    return F.relu(g * a).mean(dim=-2) * F.relu(g).mean(dim=-2)


@pytest.mark.parametrize("n", [1, 5, 17], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("row", [0, -1], ids=["row0", "row_last"])
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_getam_map_matches_autograd_gradient_of_attention(n, row, seed):
    q, k, v = _qkv(2, 3, n, 8, seed=seed)
    grad_out = _randn(2, 3, n, 8, seed=seed + 5)
    out = ref.getam_map(q, k, v, grad_out, row=row)
    assert out.shape == (2, n)
    assert_close(out, _getam_map_by_autograd(q, k, v, grad_out, row, 8**-0.5))


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_getam_map_stacked_layers_sum_per_layer_maps(seed):
    q, k, v = _qkv(3, 2, 2, 7, 4, seed=seed)
    grad_out = _randn(3, 2, 2, 7, 4, seed=seed + 5)
    out = ref.getam_map(q, k, v, grad_out, scale=0.6, row=2)
    expected = sum(
        _getam_map_by_autograd(q[layer], k[layer], v[layer], grad_out[layer], 2, 0.6)
        for layer in range(3)
    )
    assert out.shape == (2, 7)
    assert_close(out, expected)


def test_getam_map_low_precision_inputs_give_float32():
    q, k, v = _qkv(1, 2, 5, 4, seed=15, dtype=torch.bfloat16)
    assert ref.getam_map(q, k, v, v).dtype == torch.float32


@pytest.mark.parametrize("stacked", [False, True], ids=["one_layer", "stacked"])
def test_getam_map_gradcheck_and_gradgradcheck(stacked):
    shape = (2, 1, 2, 3, 2) if stacked else (1, 2, 4, 2)
    q, k, v = (t.requires_grad_() for t in _qkv(*shape, seed=16))
    grad_out = _randn(*shape, seed=20).requires_grad_()
    inputs = (q, k, v, grad_out)
    assert gradcheck(ref.getam_map, inputs)
    assert gradgradcheck(ref.getam_map, inputs)


# ------------------------------------------------------------------------------- par and pamr


def _bilinear_align_corners(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[C, h, w] -> [C, height, width]``, corner pixels aligned, written out per pixel."""
    _, h, w = masks.shape
    out = np.empty((masks.shape[0], height, width))
    for y in range(height):
        sy = y * (h - 1) / (height - 1) if height > 1 else 0.0
        y0 = min(int(math.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(width):
            sx = x * (w - 1) / (width - 1) if width > 1 else 0.0
            x0 = min(int(math.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = (1 - fx) * masks[:, y0, x0] + fx * masks[:, y0, x1]
            bottom = (1 - fx) * masks[:, y1, x0] + fx * masks[:, y1, x1]
            out[:, y, x] = (1 - fy) * top + fy * bottom
    return out


def _window(y, x, d, height, width, with_centre=False):
    """Clamped coordinates and offset length of each tap of the 3x3 window dilated by d."""
    taps = []
    for dy in (-d, 0, d):
        for dx in (-d, 0, d):
            if with_centre or (dy, dx) != (0, 0):
                yy = min(max(y + dy, 0), height - 1)
                xx = min(max(x + dx, 0), width - 1)
                taps.append((yy, xx, math.hypot(dy, dx)))
    return taps


def _refine_per_pixel(image, masks, dilations, iters, affinity):
    """Per-image, per-pixel refinement loop; ``affinity(img, y, x, taps)`` gives the weights."""
    out = []
    for img, m in zip(image.numpy(), masks.numpy(), strict=True):
        _, height, width = img.shape
        if m.shape[-2:] != (height, width):
            m = _bilinear_align_corners(m, height, width)
        ring = {
            (y, x): [tap for d in dilations for tap in _window(y, x, d, height, width)]
            for y in range(height)
            for x in range(width)
        }
        weights = {(y, x): affinity(img, y, x, taps) for (y, x), taps in ring.items()}
        for _ in range(iters):
            new = np.empty_like(m)
            for (y, x), taps in ring.items():
                new[:, y, x] = sum(
                    wt * m[:, yy, xx] for wt, (yy, xx, _) in zip(weights[y, x], taps, strict=True)
                )
            m = new
        out.append(m)
    return torch.from_numpy(np.stack(out))


def _par_affinity(w_pos):
    def affinity(img, y, x, taps):
        lengths = np.array([length for _, _, length in taps])
        position = -((lengths / (lengths.std(ddof=1) + 1e-8) / 0.3) ** 2)
        colour = np.zeros(len(taps))
        for channel in img:
            values = np.array([channel[yy, xx] for yy, xx, _ in taps])
            sigma = values.std(ddof=1)
            colour += -((np.abs(channel[y, x] - values) / (sigma + 1e-8) / 0.3) ** 2)
        return _np_softmax(colour / len(img)) + w_pos * _np_softmax(position)

    return affinity


def _pamr_affinity(dilations):
    def affinity(img, y, x, taps):
        height, width = img.shape[-2:]
        window = [t for d in dilations for t in _window(y, x, d, height, width, with_centre=True)]
        logits = np.zeros(len(taps))
        for channel in img:
            sigma = np.array([channel[yy, xx] for yy, xx, _ in window]).std(ddof=1)
            values = np.array([channel[yy, xx] for yy, xx, _ in taps])
            logits += -np.abs(channel[y, x] - values) / (1e-8 + 0.1 * sigma)
        return _np_softmax(logits / len(img))

    return affinity


PIXEL_CASES = [
    pytest.param((5, 6), (5, 6), (1, 2), id="5x6-d1,2"),
    pytest.param((5, 6), (3, 4), (1, 2), id="5x6-resized_from_3x4-d1,2"),
    pytest.param((7, 9), (7, 9), (1, 2, 4, 8, 12, 24), id="7x9-default_dilations"),
]


@pytest.mark.parametrize(("image_size", "mask_size", "dilations"), PIXEL_CASES)
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_par_matches_per_pixel_loop(image_size, mask_size, dilations, seed):
    image = _rand(2, 3, *image_size, seed=seed)
    masks = _rand(2, 4, *mask_size, seed=seed + 1)
    out = ref.par(image, masks, dilations=dilations, iters=2, w_pos=0.05)
    expected = _refine_per_pixel(image, masks, dilations, 2, _par_affinity(0.05))
    assert out.shape == (2, 4, *image_size)
    assert_close(out, expected)


@pytest.mark.parametrize(("image_size", "mask_size", "dilations"), PIXEL_CASES)
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_pamr_matches_per_pixel_loop(image_size, mask_size, dilations, seed):
    image = 255 * _rand(2, 3, *image_size, seed=seed)
    masks = _rand(2, 4, *mask_size, seed=seed + 1)
    out = ref.pamr(image, masks, dilations=dilations, iters=2)
    expected = _refine_per_pixel(image, masks, dilations, 2, _pamr_affinity(dilations))
    assert out.shape == (2, 4, *image_size)
    assert_close(out, expected)


@pytest.mark.parametrize("iters", [1, 3], ids=lambda i: f"iters{i}")
@pytest.mark.parametrize("w_pos", [0.0, 0.01], ids=lambda w: f"w_pos{w}")
def test_par_weights_per_pixel_sum_to_one_plus_w_pos(iters, w_pos):
    image = _rand(1, 3, 6, 5, seed=17)
    constant = torch.full((1, 2, 6, 5), 0.5, dtype=F64)
    out = ref.par(image, constant, dilations=(1, 3), iters=iters, w_pos=w_pos)
    assert_close(out, torch.full_like(constant, 0.5 * (1 + w_pos) ** iters))


def test_pamr_keeps_constant_masks_constant():
    image = 255 * _rand(1, 3, 6, 5, seed=18)
    constant = torch.full((1, 2, 3, 3), 0.25, dtype=F64)  # resized to 6x5, still constant
    out = ref.pamr(image, constant, dilations=(1, 3), iters=3)
    assert_close(out, torch.full((1, 2, 6, 5), 0.25, dtype=F64))


@pytest.mark.parametrize("refine", [ref.par, ref.pamr], ids=["par", "pamr"])
def test_refinement_output_in_masks_dtype(refine):
    image = _rand(1, 3, 4, 5, seed=19).float()
    masks = _rand(1, 2, 4, 5, seed=19).half()
    out = refine(image, masks, dilations=(1,), iters=1)
    assert out.dtype == torch.float16 and out.shape == (1, 2, 4, 5)
