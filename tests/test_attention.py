"""attention.py: the explicit softmax(QKᵀ/√d)V equals the fused SDPA kernel, and `Attention`
equals diffusers' `Attention` with the same weights."""

import pytest
import torch

from minipa.attention import (
    Attention,
    attention,
    attention_backend,
    get_attention_backend,
    merge_heads,
    set_attention_backend,
    split_heads,
)


def _qkv(b=2, heads=4, lq=7, lk=11, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, n, d, generator=g) for n in (lq, lk, lk)]


def test_explicit_and_sdpa_paths_agree():
    q, k, v = _qkv()
    fast = attention(q, k, v, explicit=False)
    slow = attention(q, k, v, explicit=True)
    assert fast.shape == (2, 4, 7, 16)
    assert (fast - slow).abs().max().item() < 1e-5


def test_explicit_and_sdpa_agree_with_causal_mask():
    q, k, v = _qkv(lq=9, lk=9)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    fast = attention(q, k, v, mask=causal, explicit=False)
    slow = attention(q, k, v, mask=causal, explicit=True)
    assert (fast - slow).abs().max().item() < 1e-5
    # the first query may only see the first key, so its output is exactly v[..., 0, :]
    assert torch.allclose(slow[:, :, 0], v[:, :, 0], atol=1e-6)


def test_explicit_attention_is_the_softmax_equation():
    q, k, v = _qkv(heads=1, lq=3, lk=5, d=8)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    assert torch.allclose(attention(q, k, v, explicit=True), weights @ v, atol=1e-6)


def test_backend_switch_and_context_manager():
    assert get_attention_backend() == "sdpa"
    with attention_backend("explicit"):
        assert get_attention_backend() == "explicit"
    assert get_attention_backend() == "sdpa"
    with pytest.raises(ValueError, match="backend"):
        set_attention_backend("flash")
    with pytest.raises(ValueError, match="bool"):
        q, k, v = _qkv()
        attention(q, k, v, mask=torch.zeros(7, 11))


def test_attention_module_self_and_cross_shapes_and_key_names():
    sd = Attention(query_dim=320)
    assert sd.heads == 8 and sd.head_dim == 40  # SD 1.5's default: 8 heads
    attn = Attention(query_dim=32, context_dim=24, heads=4)
    x, c = torch.randn(2, 10, 32), torch.randn(2, 77, 24)
    assert attn(x, c).shape == (2, 10, 32)
    assert sorted(attn.state_dict()) == ["to_k.weight", "to_out.0.bias", "to_out.0.weight", "to_q.weight", "to_v.weight"]
    assert split_heads(torch.randn(2, 10, 32), attn.heads).shape == (2, 4, 10, 8)
    assert merge_heads(torch.randn(2, 4, 10, 8)).shape == (2, 10, 32)
    vae_style = Attention(query_dim=12, heads=1, head_dim=12, qkv_bias=True)
    assert vae_style(torch.randn(1, 5, 12)).shape == (1, 5, 12)
    with pytest.raises(ValueError, match="divisible"):
        Attention(query_dim=30, heads=4)


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("explicit", [False, True])
def test_attention_module_matches_diffusers(cross, explicit):
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    torch.manual_seed(0)
    context_dim = 24 if cross else None
    ref = DiffusersAttention(query_dim=32, cross_attention_dim=context_dim, heads=4, dim_head=8, bias=False).eval()
    ours = Attention(query_dim=32, context_dim=context_dim, heads=4, head_dim=8)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 10, 32)
    c = torch.randn(2, 77, 24) if cross else None
    with torch.no_grad(), attention_backend("explicit" if explicit else "sdpa"):
        diff = (ours(x, c) - ref(x, c)).abs().max().item()
    assert diff < 1e-5


def test_the_backend_decides_which_path_runs(monkeypatch):
    """"sdpa" calls PyTorch's fused kernel, "explicit" never does; explicit=… overrides the backend for one call."""
    import minipa.attention as module

    calls = []
    fused = module.F.scaled_dot_product_attention
    monkeypatch.setattr(module.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    q, k, v = _qkv()
    attention(q, k, v)
    assert calls == [1] and get_attention_backend() == "sdpa"
    with attention_backend("explicit"):
        attention(q, k, v)
        assert calls == [1]
        attention(q, k, v, explicit=False)
        assert calls == [1, 1]
    attention(q, k, v, explicit=True)
    assert calls == [1, 1]
