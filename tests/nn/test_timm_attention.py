"""The timm drop-in: patched == unpatched timm ViTs, and captured exports, q/k/v and output
gradients against an independent oracle built from hooks on the UNPATCHED model."""

import copy
import gc
import pickle
import threading

import pytest
import timm
import torch
from timm.layers import Attention, AttentionPoolLatent
from torch import nn
from utils import assert_close

import wsss_fast
from wsss_fast.nn import Capture, capture, patch_timm

# Extended by the owner of each backend as it learns the attention op.
ATTENTION_BACKENDS = ["reference", "torch", "triton"]

IMG = 48  # 3 x 3 patches of 16: N = 9 + prefix tokens
TINY = dict(img_size=IMG, depth=2, embed_dim=48, num_heads=3, num_classes=5, pretrained=False)

# name -> (timm model name, overrides); prefix tokens: 1, 2, 1 + 2 registers, 0.
MODELS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=2)),
    "no_class_token": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    "qk_norm": ("vit_tiny_patch16_224", dict(qk_norm=True)),
    "no_qkv_bias": ("vit_tiny_patch16_224", dict(qkv_bias=False)),
    "scale_norm": ("vit_tiny_patch16_224", dict(scale_attn_norm=True)),
}


def build(kind: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny timm model with weights large enough that attention is far from uniform."""
    name, kw = MODELS[kind]
    torch.manual_seed(seed)
    model = timm.create_model(name, **{**TINY, **kw, **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1 and pname.endswith("weight"):  # norm scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def images(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, Attention)]


class Oracle:
    """q, k, v and softmax probabilities of an UNPATCHED model, from forward hooks on each
    ``attn.qkv`` (and, with ``outputs=True``, each layer's attention output taken at the input of
    ``attn.proj`` and re-split into heads). Everything stays in the autograd graph."""

    def __init__(self, model: nn.Module, *, outputs: bool = False):
        self.qkv, self.outputs, self.handles = [], [], []
        for attn in attention_modules(model):
            assert type(attn) is Attention, "the oracle must run on timm's own Attention"
            self.handles.append(attn.qkv.register_forward_hook(self._qkv_hook(attn)))
            if outputs:
                self.handles.append(attn.proj.register_forward_pre_hook(self._proj_hook(attn)))

    def _qkv_hook(self, attn):
        def hook(_mod, _inp, out):
            B, N, _ = out.shape
            qkv = out.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            self.qkv.append((attn.q_norm(q), attn.k_norm(k), v, attn.scale))

        return hook

    def _proj_hook(self, attn):
        def hook(_mod, args):
            (x,) = args
            B, N, C = x.shape
            o = x.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
            self.outputs.append(o)
            return (o.transpose(1, 2).reshape(B, N, C),)

        return hook

    def probs(self, dtype=torch.float64) -> list[torch.Tensor]:
        """Per layer ``P = softmax(q k^T scale)``, ``[B, H, N, N]``, materialised."""
        return [
            torch.softmax((q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * s, dim=-1)
            for q, k, _, s in self.qkv
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


def patched_pair(kind: str, **overrides) -> tuple[nn.Module, nn.Module]:
    ref = build(kind, **overrides)
    return ref, patch_timm(copy.deepcopy(ref))


backends = pytest.mark.parametrize("backend", ATTENTION_BACKENDS)


@backends
@pytest.mark.parametrize("kind", list(MODELS))
def test_patched_equals_unpatched(backend, kind):
    ref, model = patched_pair(kind)
    x = images()
    assert all(type(m).__name__ == "PatchedAttention" for m in attention_modules(model))
    assert len(attention_modules(model)) == TINY["depth"]
    with torch.no_grad(), wsss_fast.use_backend(backend):
        expected, actual = ref(x), model(x)
        expected_f, actual_f = ref.forward_features(x), model.forward_features(x)
    assert_close(actual, expected, name=f"{kind} logits")
    assert_close(actual_f, expected_f, name=f"{kind} features")
    assert actual_f.shape[1] == 9 + ref.num_prefix_tokens


def test_bare_attention_gated_head_dim_dim_out():
    """Options VisionTransformer does not expose: gate, attn_head_dim != dim / heads, dim_out."""
    torch.manual_seed(0)
    ref = Attention(
        24,
        num_heads=2,
        attn_head_dim=16,  # a head dim every backend takes
        dim_out=20,
        qkv_bias=True,
        qk_norm=True,
        scale_norm=True,
        gated=True,
        norm_layer=nn.LayerNorm,
    ).eval()
    model = patch_timm(copy.deepcopy(ref))
    x = torch.randn(3, 11, 24)
    for backend in ATTENTION_BACKENDS:
        with torch.no_grad(), wsss_fast.use_backend(backend):
            assert_close(model(x), ref(x), name=f"{backend} gated attention")


def test_state_dict_untouched_and_idempotent():
    ref = build("qk_norm")
    model = copy.deepcopy(ref)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = [id(p) for p in model.parameters()]
    assert patch_timm(model) is model
    classes = [type(m) for m in model.modules()]
    patch_timm(model)
    assert [type(m) for m in model.modules()] == classes
    after = model.state_dict()
    assert list(after) == list(before) == list(ref.state_dict())
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert [id(p) for p in model.parameters()] == params_before
    # Loading an unpatched checkpoint into a patched model (and back) works unchanged.
    model.load_state_dict(ref.state_dict())
    ref.load_state_dict(model.state_dict())


def test_pickle_round_trip():
    ref, model = patched_pair("vit")
    loaded = pickle.loads(pickle.dumps(model))
    assert all(type(m).__name__ == "PatchedAttention" for m in attention_modules(loaded))
    x = images()
    with torch.no_grad():
        assert_close(loaded(x), ref(x), name="unpickled logits")


@backends
@pytest.mark.parametrize("kind", ["vit", "deit_distilled", "registers", "no_class_token"])
def test_mean_and_rows_exports_match_oracle(backend, kind):
    ref, model = patched_pair(kind)
    x = images()
    oracle = Oracle(ref)
    with torch.no_grad():
        ref(x)
    probs = oracle.probs()
    num_rows = max(ref.num_prefix_tokens, 1)
    with torch.no_grad(), wsss_fast.use_backend(backend):
        with capture(model, export="mean") as mean_cap:
            model(x)
        with capture(model, export="rows", num_rows=num_rows) as rows_cap:
            model(x)
    assert len(mean_cap.exports) == len(rows_cap.exports) == len(probs) == TINY["depth"]
    assert mean_cap.names == ["blocks.0.attn", "blocks.1.attn"]
    for layer, p in enumerate(probs):
        assert p.max() > 0.5, "oracle attention should be peaked for this test to mean anything"
        assert mean_cap.exports[layer].dtype == torch.float32
        assert_close(mean_cap.exports[layer], p.mean(1).float(), name=f"mean export layer {layer}")
        assert_close(
            rows_cap.exports[layer], p[:, :, :num_rows].float(), name=f"rows export layer {layer}"
        )


@backends
@pytest.mark.parametrize("kind", ["qk_norm", "no_qkv_bias"])
def test_keep_qkv_matches_oracle(backend, kind):
    ref, model = patched_pair(kind)
    x = images()
    oracle = Oracle(ref)
    with torch.no_grad():
        ref(x)
    with torch.no_grad(), wsss_fast.use_backend(backend):
        with capture(model, keep_qkv=True, keep_outputs=True) as cap:
            model(x)
    assert cap.exports == []
    assert len(cap.q) == len(cap.k) == len(cap.v) == len(cap.outputs) == TINY["depth"]
    probs = oracle.probs()
    for layer, (q, k, v, _) in enumerate(oracle.qkv):
        B, H, N, D = q.shape
        assert cap.q[layer].shape == (B, H, N, D)
        assert_close(cap.q[layer], q, name=f"q layer {layer}")
        assert_close(cap.k[layer], k, name=f"k layer {layer}")
        assert_close(cap.v[layer], v, name=f"v layer {layer}")
        expected_out = (probs[layer] @ v.double()).float()
        assert_close(cap.outputs[layer], expected_out, name=f"attention output layer {layer}")


@backends
@pytest.mark.parametrize("export", ["mean", "rows"])
def test_export_gradient_trains_qkv(backend, export):
    """A loss on the exports reaches every layer's qkv weight, with the oracle's gradient."""
    ref, model = patched_pair("qk_norm")
    x = images()
    g = torch.Generator()  # reseeded so both losses weight the exports alike

    def loss_of(exports):
        return sum((e * torch.randn(e.shape, generator=g)).sum() for e in exports)

    oracle = Oracle(ref)
    ref(x)
    probs = oracle.probs(torch.float32)
    g.manual_seed(3)
    ref_exports = [p.mean(1) if export == "mean" else p[:, :, :1] for p in probs]
    ref_grads = torch.autograd.grad(
        loss_of(ref_exports), [m.qkv.weight for m in attention_modules(ref)]
    )

    g.manual_seed(3)
    with wsss_fast.use_backend(backend), capture(model, export=export) as cap:
        model(x)
    assert all(e.requires_grad for e in cap.exports)
    loss_of(cap.exports).backward()
    for layer, (attn, expected) in enumerate(zip(attention_modules(model), ref_grads, strict=True)):
        assert attn.qkv.weight.grad is not None and attn.qkv.weight.grad.abs().max() > 0
        assert_close(attn.qkv.weight.grad, expected, name=f"qkv.weight grad layer {layer}")
        assert attn.q_norm.weight.grad is not None


@backends
@pytest.mark.parametrize("kind", ["vit", "deit_distilled", "registers"])
def test_gradient_wrt_outputs_matches_oracle(backend, kind):
    """GETAM's use: d(class score) / d(per-layer attention output [B, H, N, D])."""
    ref, model = patched_pair(kind)
    x = images()
    oracle = Oracle(ref, outputs=True)
    ref_logits = ref(x)
    ref_grads = torch.autograd.grad(ref_logits[:, 2].sum(), oracle.outputs)

    with wsss_fast.use_backend(backend), capture(model, keep_outputs=True) as cap:
        logits = model(x)
    assert_close(logits, ref_logits, name="logits")
    grads = torch.autograd.grad(logits[:, 2].sum(), cap.outputs)
    assert len(grads) == len(ref_grads) == TINY["depth"]
    for layer, (got, expected) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(cap.outputs[layer], oracle.outputs[layer], name=f"output layer {layer}")
        assert got.abs().max() > 0
        assert_close(got, expected, name=f"grad wrt output layer {layer}")


def test_unsupported_attention_refused_by_name():
    from timm.models.eva import EvaAttention
    from timm.models.swin_transformer import WindowAttention

    class MyAttention(Attention):
        pass

    timm_attn = Attention(16, num_heads=2)
    for odd, cls_name in [
        (WindowAttention(16, num_heads=2, window_size=4), "WindowAttention"),
        (EvaAttention(16, num_heads=2, norm_layer=nn.LayerNorm), "EvaAttention"),
        (MyAttention(16, num_heads=2), "MyAttention"),
        (nn.MultiheadAttention(16, 2), "MultiheadAttention"),
    ]:
        model = nn.Sequential(timm_attn, odd)
        with pytest.raises(TypeError, match=rf"1 \(.*{cls_name}\)[\s\S]*skip="):
            patch_timm(model)
        assert type(timm_attn) is Attention, "a refused model must be left entirely unpatched"

    with pytest.raises(TypeError, match="holds no timm.layers.Attention"):
        patch_timm(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(RuntimeError, match=r"wsss_fast.patch_timm\(model\) first"):
        capture(build("vit"), export="mean")


def test_skip_leaves_attention_pool_unpatched():
    ref = build("vit", global_pool="map")
    with pytest.raises(TypeError, match="AttentionPoolLatent"):
        patch_timm(copy.deepcopy(ref))
    model = patch_timm(copy.deepcopy(ref), skip=(AttentionPoolLatent,))
    assert type(model.attn_pool) is AttentionPoolLatent
    x = images()
    with torch.no_grad(), capture(model, export="mean") as cap:
        assert_close(model(x), ref(x), name="map-pool logits")
    assert len(cap.exports) == TINY["depth"]


def test_forward_refuses_attention_dropout_and_masks():
    model = patch_timm(build("vit", attn_drop_rate=0.1))
    x = images()
    with pytest.raises(NotImplementedError, match=r"PatchedAttention.*attn_drop_rate=0"):
        model.train()(x)
    with torch.no_grad():
        model.eval()(x)  # dropout is off in eval mode
        attn = model.blocks[0].attn
        tokens = torch.randn(2, 10, TINY["embed_dim"])
        with pytest.raises(NotImplementedError, match="without wsss_fast.patch_timm"):
            attn(tokens, attn_mask=torch.zeros(10, 10, dtype=torch.bool))
        with pytest.raises(NotImplementedError, match="attn_mask and is_causal"):
            attn(tokens, is_causal=True)
    # proj_drop in training is fine: only attention-probability dropout is refused.
    patch_timm(build("vit", proj_drop_rate=0.1)).train()(x)


def _live_tensor_ids() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}


def test_nothing_retained_outside_capture():
    model = patch_timm(build("vit"))
    x = images()
    with capture(model, export="mean", keep_outputs=True, keep_qkv=True) as cap:
        model(x)
    recorded = (len(cap.exports), len(cap.outputs), len(cap.q))
    before = _live_tensor_ids()
    out = model(x)  # with grad: any stray reference would keep graph tensors alive
    out.sum().backward()
    del out
    assert _live_tensor_ids() - before == set()
    assert (len(cap.exports), len(cap.outputs), len(cap.q)) == recorded == (2, 2, 2)
    with pytest.raises(RuntimeError, match="already entered"):
        with cap:
            pass


def test_captures_nest_and_stay_in_their_thread_and_model():
    model, other = patch_timm(build("vit")), patch_timm(build("vit", seed=1))
    x = images()
    with torch.no_grad():
        with capture(model, keep_outputs=True) as outer:
            with capture(model, export="mean") as inner:
                model(x)
                other(x)  # not the captured model: records nowhere
            thread = threading.Thread(target=model, args=(x,))
            thread.start()
            thread.join()  # a fresh thread has no active capture
            model(x)
        assert isinstance(outer, Capture)
        assert len(inner.exports) == 2 and inner.outputs == []
        assert len(outer.outputs) == 4 and outer.exports == []
        assert_close(outer.outputs[0], outer.outputs[2], name="same input, same output")

        with capture(model, export="mean"), capture(model, export="rows"):
            with pytest.raises(ValueError, match="different exports"):
                model(x)
