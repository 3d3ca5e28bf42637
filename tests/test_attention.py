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


# ─── The explicit path, Softmax(QKᵀ/√d)V (a course assignment): one test per property ──────────────


def explicit_weights(q, k, mask=None):
    """The attention weights the explicit path uses, read off its output with V = the identity (d ≥ Lk)."""
    lk, d = k.shape[-2], k.shape[-1]
    v = torch.eye(lk, d).expand(*k.shape[:-2], lk, d)
    return attention(q, k, v, mask=mask, explicit=True)[..., :lk]


def test_attention_weights_over_the_keys_sum_to_one():
    """Each query spreads a total weight of 1 over the keys: softmax over the last axis of QKᵀ (the keys)."""
    q, k, _ = _qkv(lq=5, lk=9)
    out = attention(q, k, torch.ones_like(k), explicit=True)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5), (
        "each query's weights over the keys must sum to 1 — the softmax goes over the last axis of QKᵀ (the keys), not over "
        f"the queries: with V = 1 every output must be 1, yours ranges from {out.min():.3g} to {out.max():.3g}")


def test_attention_divides_the_scores_by_sqrt_d():
    """One query, two keys whose scores q·k differ by s: the weights' log-ratio is s/√d."""
    d = 16
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 2, d)
    k[..., 0, 0] = 2.0  # q·k₁ − q·k₂ = 2
    w = explicit_weights(q, k)[0, 0, 0]
    scale = float(torch.log(w[0] / w[1])) / 2
    named = {"the 1/√d is missing": 1.0, "divided by d, not by √d": 1 / d, "multiplied by √d instead of divided": d**0.5}
    name = next((f": {k}" for k, c in named.items() if abs(scale - c) < 1e-3 * c), "")
    assert abs(scale - d**-0.5) < 1e-4, (
        f"the scores QKᵀ must be divided by √d = {d**0.5:g} (d = {d}, the size of one head): yours behave as if multiplied "
        f"by {scale:.4g}{name}")


def test_masked_keys_get_no_weight():
    """Where the bool mask is False the weight is exactly 0; the keys a query may see share all of its weight."""
    q, k, _ = _qkv(b=1, heads=2, lq=5, lk=6, d=8, seed=3)
    mask = torch.ones(5, 6, dtype=torch.bool).tril()  # query i sees keys 0…i; every row (and every row of ~mask) sees one
    w = explicit_weights(q, k, mask)
    rule = "where the mask is False the key must get no weight: set those scores to −inf before the softmax, masked_fill(~mask, −inf)"
    assert w.isfinite().all(), f"{rule}; yours gives NaN or inf weights"
    assert w[..., mask].abs().max() > 0, f"{rule}; yours gives weight 0 to every key the mask allows: the mask is inverted (True = may attend)"
    hidden = float(w[..., ~mask].abs().max())
    if hidden > 1e-6:
        zero_fill = torch.softmax((q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~mask, 0), -1)
        name = " — that is what a score of 0 gets: fill with −inf, not 0" if torch.allclose(w, zero_fill, atol=1e-5) else ""
        pytest.fail(f"{rule}; yours gives masked keys weight up to {hidden:.3g}{name}")
    sums = w.sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5), (
        f"the keys a query may see must share all of its weight (each row sums to 1), yours sum to {sums.min():.3g}…{sums.max():.3g}: "
        "mask the scores before the softmax, not the weights after it")


def test_explicit_and_sdpa_paths_agree():
    q, k, v = _qkv()
    fast = attention(q, k, v, explicit=False)
    slow = attention(q, k, v, explicit=True)
    assert fast.shape == (2, 4, 7, 16)
    assert (fast - slow).abs().max().item() < 1e-5, f"the explicit path differs from torch's fused attention by {(fast - slow).abs().max():.3g}"


def test_explicit_and_sdpa_agree_with_causal_mask():
    q, k, v = _qkv(lq=9, lk=9)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    fast = attention(q, k, v, mask=causal, explicit=False)
    slow = attention(q, k, v, mask=causal, explicit=True)
    assert (fast - slow).abs().max().item() < 1e-5, f"with a causal mask the explicit path differs from torch's fused attention by {(fast - slow).abs().max():.3g}"
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
