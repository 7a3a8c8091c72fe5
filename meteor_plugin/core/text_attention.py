"""Text-to-visual attention rows and METEOR's head selection by visual attention value (VAV).

Only the score rows of the query tokens are formed (q_text . k_all), never a full attention map, so
the model itself can run SDPA or FlashAttention. Inputs are already projected and rotated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .select import topk_mask


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style rotary embedding, ``x * cos + rotate_half(x) * sin``. x: (B, H, T, d); cos, sin: (B, T, d).

    Written per half with fused multiply-adds into one output rather than through a rotated copy of ``x``
    and a concatenation: the same values, several times faster on a CPU, where rotating every key was most
    of Stage 3's scoring time."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., :half], x[..., half:]
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):  # out= has no grad
        return torch.cat((torch.addcmul(x1 * cos[..., :half], x2, sin[..., :half], value=-1),
                          torch.addcmul(x2 * cos[..., half:], x1, sin[..., half:])), dim=-1)
    out = torch.empty_like(x)  # x's own layout: the projection's (B, T, H, d) memory, read and written in order
    first, second = out[..., :half], out[..., half:]
    torch.mul(x1, cos[..., :half], out=first).addcmul_(x2, sin[..., :half], value=-1)
    torch.mul(x2, cos[..., half:], out=second).addcmul_(x1, sin[..., half:])
    return out


def mean_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    q_index: torch.Tensor,
    q_valid: torch.Tensor,
    key_valid: torch.Tensor,
    scale: float,
    chunk: int = 64,
    key_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention probabilities of the query tokens, averaged over the valid queries of each sample.

    q: (B, H, Q, d); k: (B, Hkv, L, d) (GQA heads are repeated here); q_index: (B, Q) the position of
    each query in the sequence (keys after it are causally hidden); q_valid: (B, Q); key_valid:
    (B, L). Returns (B, H, L) float32: for each head, mean over queries of softmax(q k^T * scale).
    Samples with no valid query get zeros. ``key_bias`` (B, L) is added to the logits of every query (the
    layer's own additive mask, under proportional attention).
    """
    b, h, nq, _ = q.shape
    hkv, length = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads cannot share {hkv} key heads")
    k = k.repeat_interleave(h // hkv, dim=1) if hkv != h else k
    keys = torch.arange(length, device=q.device)
    total = torch.zeros(b, h, length, dtype=torch.float32, device=q.device)
    for start in range(0, nq, chunk):
        qs = q[:, :, start : start + chunk]
        idx = q_index[:, start : start + chunk]
        valid = q_valid[:, start : start + chunk]
        logits = torch.matmul(qs.float(), k.float().transpose(-1, -2)).mul_(scale)  # (B, H, c, L), a new tensor
        if key_bias is not None:
            logits += key_bias.float()[:, None, None, :]
        visible = key_valid[:, None, :] & (keys[None, None, :] <= idx[:, :, None])  # (B, c, L)
        visible |= keys[None, None, :] == idx[:, :, None]  # a query always sees itself
        probs = torch.softmax(logits.masked_fill_(~visible[:, None], float("-inf")), dim=-1)
        total += torch.matmul(valid.to(probs.dtype)[:, None, None, :], probs).squeeze(2)  # the valid queries' sum
    count = q_valid.sum(dim=1).clamp(min=1).float()
    return total / count[:, None, None]


@dataclass
class VisualRelevance:
    scores: torch.Tensor  # (B, L): attention of the selected heads on each position
    mass: torch.Tensor  # (B,): visual attention value summed over the selected heads
    heads: torch.Tensor  # (B, H) bool: heads selected per sample
    head_vav: torch.Tensor  # (B, H): visual attention value of every head


def select_heads(attn: torch.Tensor, visual: torch.Tensor, top_heads: int) -> VisualRelevance:
    """Rank heads by VAV (attention mass on visual positions) and score tokens with the top ones.

    attn: (B, H, L) from ``mean_query_attention``; visual: (B, L) bool. Token scores are the mean
    attention of the selected heads; ``mass`` is the sum of their VAV, as in METEOR's
    ``K = lambda * sum_h sum_i a_{i,h}``.
    """
    b, h, _ = attn.shape
    vav = (attn * visual[:, None, :]).sum(dim=-1)  # (B, H)
    top = int(min(max(top_heads, 1), h))
    heads = topk_mask(vav, torch.full((b,), top, device=attn.device), torch.ones_like(vav, dtype=torch.bool))
    w = heads.float()
    scores = (attn * w[:, :, None]).sum(dim=1) / top
    mass = (vav * w).sum(dim=1)
    return VisualRelevance(scores=scores, mass=mass, heads=heads, head_vav=vav)


def attention_spread(scores: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """How many visual tokens the attention is spread over: the perplexity ``exp(H)`` of the scores
    renormalised over each sample's visual tokens. scores: (B, L) >= 0; visual: (B, L) bool. (B,), in
    [1, visual count]; 0 for a sample without visual tokens or attention on them.

    Stage 3's budget signal ``llm_budget_signal="spread"``: unlike the attention mass (the paper's
    ``sum_h sum_i a``), it does not depend on how much attention sinks and text take, only on how many
    image regions the question looks at, so a question about one small glyph gets fewer tokens than one
    that counts every object."""
    w = (scores.double() * visual).clamp(min=0)
    total = w.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, w / total.clamp(min=1e-300), torch.zeros_like(w))
    entropy = -(p * torch.log(p.clamp(min=1e-300))).sum(dim=1)
    return torch.where(total[:, 0] > 0, torch.exp(entropy), torch.zeros_like(entropy)).float()


@torch.no_grad()  # a token budget, not a quantity to differentiate (and its states are scaled in place)
def attended_regions(scores: torch.Tensor, visual: torch.Tensor, hidden: torch.Tensor,
                     sharpness: float = 16.0) -> torch.Tensor:
    """How many distinct image regions the attention is spread over: the similarity-sensitive effective number
    ``1 / sum_ij p_i p_j Z_ij`` (Leinster and Cobbold's diversity of order 2) of the scores renormalised over
    each sample's visual tokens, with ``Z_ij = max(0, cos(h_i - m, h_j - m)) ** sharpness`` for the visual
    tokens' hidden states ``h`` centred on their mean ``m``. scores: (B, L) >= 0; visual: (B, L) bool; hidden:
    (B, L, D). (B,), in [1, visual count]; 0 for a sample without visual tokens or attention on them.

    Stage 3's budget signal ``llm_budget_signal="regions"``. The perplexity (``attention_spread``) counts
    tokens: a global question whose attention spreads evenly over many look-alike background tokens gets as
    many as one that counts objects all over the image. Here tokens that look alike count as one region, so
    the global question gets few and the counting question many. ``sharpness`` sets how alike two tokens
    must be to count as one (``cos ** 16`` is 0.5 at a cosine of 0.957). Centring removes the offset that all
    of a model's visual tokens share, which would otherwise make every pair look alike."""
    out = torch.zeros(scores.shape[0], dtype=torch.float32, device=scores.device)
    for i in range(scores.shape[0]):
        v = torch.nonzero(visual[i]).flatten()  # rows by index: cheaper than a boolean mask on the states
        w = scores[i][v].float().clamp(min=0)
        if w.numel() == 0 or float(w.sum()) <= 0:
            continue
        p = w / w.sum()
        first, count = int(v[0]), v.numel()
        # The centred states, a new tensor scaled in place below: one pass from a single image's contiguous run
        # of rows, a copy then a pass otherwise.
        rows = hidden[i, first:first + count] if int(v[-1]) - first + 1 == count else hidden[i].index_select(0, v)
        rows = rows.float()
        x = rows - rows.mean(dim=0, keepdim=True)
        norm = x.norm(dim=-1)
        typical = norm <= 1e-6 * float(norm.max().clamp(min=1e-30))  # at the mean: alike, whatever their cosine
        x *= norm.clamp(min=1e-30).reciprocal()[:, None]
        same = bool(typical.any())
        zp = torch.empty_like(p)  # (Z p) row by row, summed against p once at the end
        # p Z p by blocks of rows, each against its own and the later columns (Z is symmetric): never the whole
        # (N, N) matrix in memory, and half its products; the earlier columns' share comes from the earlier rows.
        for start in range(0, x.shape[0], _REGION_ROWS):
            end = min(start + _REGION_ROWS, x.shape[0])
            z = _power(torch.mm(x[start:end], x[start:].T).clamp_(min=0, max=1), sharpness)
            if same:
                z[typical[start:end][:, None] & typical[None, start:]] = 1.0
            z[:, :end - start].fill_diagonal_(1.0)  # each token is its own region's
            torch.mv(z[:, end - start:], p[end:], out=zp[start:end]).mul_(2.0)
            zp[start:end].addmv_(z[:, :end - start], p[start:end])
        out[i] = float(1.0 / torch.dot(p.double(), zp.double()))
    return out


_REGION_ROWS = 128  # rows of the similarity matrix held at once in `attended_regions`


def _power(z: torch.Tensor, exponent: float) -> torch.Tensor:
    """``z ** exponent``; a whole exponent by repeated squaring, as ``pow`` with a float exponent is several
    times slower on a CPU and was most of `attended_regions`' elementwise work."""
    n = int(exponent)
    if n != exponent or not 1 <= n <= 1024:
        return z.pow_(exponent)
    if n & (n - 1) == 0:  # a power of two (the default 16): square in place, no copies
        while n > 1:
            z.mul_(z)
            n >>= 1
        return z
    base, result = z, None
    while n:
        if n & 1:
            result = base.clone() if result is None else result.mul_(base)
        n >>= 1
        if n:
            base = base * base
    return result
