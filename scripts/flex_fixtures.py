#!/usr/bin/env python3
"""Generate FlexAttention reference fixtures for the specs in `examples/`.

For every case below this script re-implements the spec's mask and score mod as
a PyTorch FlexAttention `mask_mod` / `score_mod`, runs
`torch.nn.attention.flex_attention.flex_attention` eagerly on the CPU in float32
(GQA through `enable_gqa=True`), and writes one folder per case:

    tests/fixtures/<case>/
        q.npy         float32 [B, H, Q, D]
        k.npy, v.npy  float32 [B, HKV, KV, D]
        <buffer>.npy  one per spec buffer, named after it
                      (int -> int64, float -> float32, bool -> bool)
        out.npy       float32 [B, H, Q, D]   FlexAttention output
        lse.npy       float32 [B, H, Q]      log-sum-exp, natural log
        case.json     {"spec", "entry", "params", "q_offset", "shape", "note"}

`params` holds the param overrides as strings, exactly as they would be given
to `attnc run --param NAME=VALUE`. `q_offset` is the query offset: attnc's `q`
is the query's row index plus the offset. FlexAttention has no offset, so the
mods below add it to `q_idx` themselves.

A query that sees no key gets out = 0 and lse = -inf from FlexAttention, as in
attnc; the script checks this for every fully masked row (and fixes the
outputs up if a torch version ever behaves differently, so the fixtures always
follow the attnc definition). It also reruns every case in float64 and checks
that the float32 outputs agree to 2e-6, so that a 1e-5 comparison against
attnc's f64 reference interpreter is meaningful.

Usage (from the repository root):

    python scripts/flex_fixtures.py [--out tests/fixtures] [--cases NAME ...]

Needs torch (with torch.nn.attention.flex_attention) and numpy.
"""

import argparse
import json
import math
import shutil
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

try:  # newer torch: lse comes back through return_aux
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # older torch: return_lse=True
    AuxRequest = None

B, H, HKV, D = 2, 4, 2, 16

# FlexAttention's eager path warns that it is unfused; that is what we want.
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def run_flex(q, k, v, mask_mod, score_mod, scale, q_len, kv_len):
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, None, None, q_len, kv_len, device="cpu")
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True)
    if AuxRequest is not None:
        out, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
        lse = aux.lse
    else:
        out, lse = flex_attention(q, k, v, return_lse=True, **kwargs)
    return out, lse


def dense_mask(mask_mod, q_len, kv_len):
    """The mask as a dense [Q, KV] bool array (mask mods here ignore b and h)."""
    if mask_mod is None:
        return np.ones((q_len, kv_len), dtype=bool)
    qi = torch.arange(q_len)[:, None].expand(q_len, kv_len)
    ki = torch.arange(kv_len)[None, :].expand(q_len, kv_len)
    zero = torch.zeros((), dtype=torch.int64)
    return mask_mod(zero, zero, qi, ki).numpy()


# ---------------------------------------------------------------------------
# Buffers (numpy, in the dtype the fixture stores them).


def doc_ids(rng, n, lengths):
    assert sum(lengths) == n, (sum(lengths), n)
    ids = np.concatenate([np.full(l, i, dtype=np.int64) for i, l in enumerate(lengths)])
    # Document ids are arbitrary labels; shuffle them so nothing relies on order.
    labels = rng.permutation(len(lengths) * 3)[: len(lengths)] + 5
    return labels[ids].astype(np.int64)


def alibi_slopes(n_heads):
    # Press et al.: 2^(-8 i / H) for i = 1..H.
    return np.array([2.0 ** (-8.0 * (i + 1) / n_heads) for i in range(n_heads)], dtype=np.float32)


def ancestors(parent):
    """anc[i, j] is true iff j == i or j is reached from i by following parent."""
    n = len(parent)
    anc = np.zeros((n, n), dtype=bool)
    for i in range(n):
        j, steps = i, 0
        while j != -1:
            anc[i, j] = True
            j = int(parent[j])
            steps += 1
            assert steps <= n, "parent has a cycle"
    return anc


# ---------------------------------------------------------------------------
# Cases. Each `mods(bufs, off)` returns (mask_mod, score_mod) given the torch
# buffers (float buffers already in the compute dtype) and the query offset.


def fconst(x):
    """A float constant for a score mod. FlexAttention traces the mods with
    dynamo, which cannot lift a captured Python float; a 0-d tensor works. As a
    0-d tensor it does not change the dtype the score is computed in."""
    return torch.tensor(x, dtype=torch.float64)


def m_causal(bufs, off):
    def mask(b, h, q, kv):
        return q + off >= kv

    return mask, None


def m_dense(bufs, off):
    return None, None


def m_sliding_window(window):
    def mods(bufs, off):
        def mask(b, h, q, kv):
            qa = q + off
            return (qa >= kv) & (qa - kv < window)

        return mask, None

    return mods


def m_sliding_window_bidir(window):
    def mods(bufs, off):
        def mask(b, h, q, kv):
            return (q + off - kv).abs() <= window // 2

        return mask, None

    return mods


def m_streaming_llm(sinks, window):
    def mods(bufs, off):
        def mask(b, h, q, kv):
            qa = q + off
            return (qa >= kv) & ((kv < sinks) | (qa - kv < window))

        return mask, None

    return mods


def m_longformer(window):
    def mods(bufs, off):
        g = bufs["global"]

        def mask(b, h, q, kv):
            qa = q + off
            return g[qa] | g[kv] | ((qa - kv).abs() <= window // 2)

        return mask, None

    return mods


def m_prefix_lm(prefix):
    def mods(bufs, off):
        def mask(b, h, q, kv):
            return (kv < prefix) | (q + off >= kv)

        return mask, None

    return mods


def m_packed_docs(bufs, off):
    doc = bufs["doc"]

    def mask(b, h, q, kv):
        qa = q + off
        return (doc[qa] == doc[kv]) & (qa >= kv)

    return mask, None


def m_chunked(chunk):
    def mods(bufs, off):
        def mask(b, h, q, kv):
            qa = q + off
            # torch's // on integer tensors is floor division, like attnc's `/`.
            return (qa // chunk == kv // chunk) & (qa >= kv)

        return mask, None

    return mods


def m_dilated(window, dilation):
    def mods(bufs, off):
        def mask(b, h, q, kv):
            d = q + off - kv
            # torch's % follows the divisor's sign, like attnc's `%`.
            return (d >= 0) & (d < window * dilation) & (d % dilation == 0)

        return mask, None

    return mods


def m_block_sparse(bufs, off):
    layout = bufs["layout"]

    def mask(b, h, q, kv):
        return layout[(q + off) // 16, kv // 16]

    return mask, None


def m_spec_tree(prompt):
    def mods(bufs, off):
        anc = bufs["__ancestor"]  # dense ancestor relation of `parent`

        def mask(b, h, q, kv):
            qa = q + off
            return ((kv < prompt) & (qa >= kv)) | ((kv >= prompt) & anc[qa, kv])

        return mask, None

    return mods


def m_alibi(bufs, off):
    slope = bufs["slope"]

    def mask(b, h, q, kv):
        return q + off >= kv

    def score(s, b, h, q, kv):
        return s - slope[h] * (q + off - kv)

    return mask, score


def m_softcap(cap):
    def mods(bufs, off):
        cap_t = fconst(cap)

        def score(s, b, h, q, kv):
            return cap_t * torch.tanh(s / cap_t)

        return None, score

    return mods


def m_t5_bias(bufs, off):
    rel_bias = bufs["rel_bias"]

    def score(s, b, h, q, kv):
        rel = kv - (q + off)
        n = rel.abs()
        half = torch.where(rel > 0, 16, 0)
        # 8 + 2 * log2(n / 8) == 8 + log(n / 8) / log(128 / 8) * 8 (T5), exact
        # at the bucket boundaries; computed in float64 so it matches attnc's
        # f64 evaluation whatever the score dtype.
        nf = n.clamp(min=8).to(torch.float64)
        log_bucket = (8 + (2.0 * torch.log2(nf / 8.0)).to(torch.int64)).clamp(max=15)
        bucket = (half + torch.where(n < 8, n, log_bucket)).clamp(0, 31)
        return s + rel_bias[h, bucket]

    return None, score


def m_neighborhood_2d(width, radius):
    def mods(bufs, off):
        def mask(b, h, q, kv):
            qa = q + off
            dr = qa // width - kv // width
            dc = qa % width - kv % width
            return (dr.abs() <= radius) & (dc.abs() <= radius)

        return mask, None

    return mods


def m_natten_morton(radius):
    def mods(bufs, off):
        def even_bits(x):
            x = x & 0x55555555
            x = (x | (x >> 1)) & 0x33333333
            x = (x | (x >> 2)) & 0x0F0F0F0F
            x = (x | (x >> 4)) & 0x00FF00FF
            return (x | (x >> 8)) & 0xFFFF

        def mask(b, h, q, kv):
            qa = q + off
            dx = even_bits(qa) - even_bits(kv)
            dy = even_bits(qa >> 1) - even_bits(kv >> 1)
            return (dx.abs() <= radius) & (dy.abs() <= radius)

        return mask, None

    return mods


def m_gemma2_local(window, cap):
    def mods(bufs, off):
        cap_t = fconst(cap)

        def mask(b, h, q, kv):
            qa = q + off
            return (qa >= kv) & (qa - kv < window)

        def score(s, b, h, q, kv):
            return cap_t * torch.tanh(s / cap_t)

        return mask, score

    return mods


def m_packed_alibi(bufs, off):
    doc = bufs["doc"]
    slope = bufs["slope"]

    def mask(b, h, q, kv):
        qa = q + off
        return (doc[qa] == doc[kv]) & (qa >= kv)

    def score(s, b, h, q, kv):
        return s - slope[h] * (q + off - kv)

    return mask, score


def m_doc_offsets(num_docs):
    def mods(bufs, off):
        offsets = bufs["offsets"]

        def doc_of(p):
            d = torch.zeros_like(p)
            for i in range(1, num_docs):
                d = d + (offsets[i] <= p).to(torch.int64)
            return d

        def mask(b, h, q, kv):
            qa = q + off
            return (doc_of(qa) == doc_of(kv)) & (qa >= kv)

        return mask, None

    return mods


def m_sandwich(half_dim, weight):
    def mods(bufs, off):
        w = fconst(weight)
        freqs = [fconst(10000.0 ** (i / half_dim)) for i in range(1, half_dim + 1)]

        def mask(b, h, q, kv):
            return q + off >= kv

        def score(s, b, h, q, kv):
            d = (q + off - kv).to(s.dtype)
            bias = torch.zeros_like(s)
            for f in freqs:
                bias = bias + torch.cos(d / f)
            return s + w * bias

        return mask, score

    return mods


def m_gelu_score(bufs, off):
    def mask(b, h, q, kv):
        return q + off >= kv

    def score(s, b, h, q, kv):
        return fconst(0.5) * s * (1.0 + torch.erf(s * fconst(0.70710678)))

    return mask, score


def m_mla_rope(rope_dim, rope_scale):
    def mods(bufs, off):
        q_pe, k_pe = bufs["q_pe"], bufs["k_pe"]
        c = fconst(rope_scale)

        def mask(b, h, q, kv):
            return q + off >= kv

        def score(s, b, h, q, kv):
            acc = torch.zeros_like(s)
            for i in range(rope_dim):
                acc = acc + q_pe[b, h, q + off, i] * k_pe[b, kv, i]
            return s + c * acc

        return mask, score

    return mods


def build_cases():
    """Each case: name, spec entry, params (overrides), q_len, kv_len, q_offset,
    hkv, buffers(rng) -> dict of numpy arrays, mods, scale, note."""
    return [
        dict(name="dense", entry="dense", params={}, Q=41, KV=77, off=0,
             mods=m_dense,
             note="no mask: every row fully visible; Q != KV"),
        dict(name="causal", entry="causal", params={}, Q=67, KV=67, off=0,
             mods=m_causal,
             note="prefill, Q == KV"),
        dict(name="causal_decode_mqa", entry="causal", params={}, Q=23, KV=85, off=62,
             hkv=1, mods=m_causal,
             note="decoding with a KV cache: q_offset = KV - Q; MQA (HKV = 1); every row "
                  "sees all keys up to and including its own position"),
        dict(name="sliding_window", entry="sliding_window", params={"window": 16},
             Q=90, KV=90, off=0, mods=m_sliding_window(16),
             note="prefill, window 16"),
        dict(name="sliding_window_empty_rows", entry="sliding_window", params={"window": 16},
             Q=37, KV=53, off=60, mods=m_sliding_window(16),
             note="queries at positions 60..96 but keys only 0..52: rows with q >= 68 see "
                  "no key (out = 0, lse = -inf)"),
        dict(name="sliding_window_bidir", entry="sliding_window_bidir", params={"window": 20},
             Q=73, KV=73, off=0, mods=m_sliding_window_bidir(20),
             note="|q - kv| <= 10"),
        dict(name="streaming_llm", entry="streaming_llm", params={"sinks": 4, "window": 16},
             Q=37, KV=100, off=63, mods=m_streaming_llm(4, 16),
             note="decode-style call: 4 sink tokens + causal window 16, q_offset = KV - Q"),
        dict(name="longformer_global", entry="longformer_global", params={"window": 12},
             Q=83, KV=83, off=0,
             buffers=lambda rng, Q, KV: {"global": np.isin(np.arange(KV), [0, 17, 50, 82])},
             mods=m_longformer(12),
             note="global tokens at 0, 17, 50, 82; local |q - kv| <= 6"),
        dict(name="prefix_lm", entry="prefix_lm", params={"prefix": 23}, Q=70, KV=70, off=0,
             mods=m_prefix_lm(23),
             note="bidirectional prefix of 23 tokens, causal after it"),
        dict(name="packed_docs", entry="packed_docs", params={}, Q=95, KV=95, off=0,
             buffers=lambda rng, Q, KV: {"doc": doc_ids(rng, KV, [30, 7, 1, 40, 17])},
             mods=m_packed_docs,
             note="5 packed documents of lengths 30, 7, 1, 40, 17 (shuffled ids)"),
        dict(name="chunked", entry="chunked", params={"chunk": 16}, Q=45, KV=70, off=40,
             mods=m_chunked(16),
             note="chunks of 16; queries at positions 40..84 but keys only 0..69: rows with "
                  "q >= 80 (chunk 5 starts past the keys) see no key"),
        dict(name="dilated_sliding", entry="dilated_sliding",
             params={"window": 6, "dilation": 3}, Q=89, KV=89, off=0,
             mods=m_dilated(6, 3),
             note="6 keys per query, every 3rd position back from q"),
        dict(name="block_sparse", entry="block_sparse", params={}, Q=75, KV=90, off=0,
             buffers=lambda rng, Q, KV: {"layout": block_layout(rng, Q, KV)},
             mods=m_block_sparse,
             note="layout [5, 6] of 16 x 16 blocks, random with the diagonal set and query "
                  "block 2 all false (rows 32..47 see no key); partial last blocks"),
        dict(name="spec_tree", entry="spec_tree", params={"prompt": 50}, Q=19, KV=69, off=50,
             buffers=lambda rng, Q, KV: {"parent": tree_parents(rng, 50, KV)},
             mods=m_spec_tree(50),
             note="prompt of 50 tokens, a random draft tree of 19 tokens after it; the call "
                  "verifies the tree: Q = 19, q_offset = 50"),
        dict(name="alibi", entry="alibi", params={}, Q=61, KV=61, off=0,
             buffers=lambda rng, Q, KV: {"slope": alibi_slopes(H)},
             mods=m_alibi,
             note="causal ALiBi with the paper's slopes 2^(-8 i / H)"),
        dict(name="softcap", entry="softcap", params={"cap": 3.0, "qpas": 4.0},
             Q=58, KV=58, off=0, mods=m_softcap(3.0), scale=1.0 / math.sqrt(4.0),
             note="no mask; scale = 1 / sqrt(4.0) = 0.5, soft cap 3.0"),
        dict(name="t5_bias", entry="t5_bias", params={}, Q=99, KV=99, off=0,
             buffers=lambda rng, Q, KV: {"rel_bias": rng.standard_normal((H, 32)).astype(np.float32)},
             mods=m_t5_bias,
             note="no mask; distances up to 98 reach every bucket 0..31"),
        dict(name="neighborhood_2d", entry="neighborhood_2d", params={"W": 9, "R": 2},
             Q=63, KV=63, off=0, mods=m_neighborhood_2d(9, 2),
             note="7 x 9 image, 5 x 5 neighbourhood cut at the borders"),
        dict(name="natten_morton", entry="natten_morton", params={"R": 1},
             Q=64, KV=64, off=0, mods=m_natten_morton(1),
             note="8 x 8 image in Z order, 3 x 3 neighbourhood cut at the borders"),
        dict(name="gemma2_local", entry="gemma2_local", params={"window": 24, "cap": 2.0},
             Q=81, KV=81, off=0, mods=m_gemma2_local(24, 2.0),
             note="window 24, soft cap 2.0"),
        dict(name="packed_alibi", entry="packed_alibi", params={}, Q=40, KV=95, off=55,
             buffers=lambda rng, Q, KV: {"doc": doc_ids(rng, KV, [20, 33, 2, 25, 15]),
                                         "slope": alibi_slopes(H)},
             mods=m_packed_alibi,
             note="5 packed documents of lengths 20, 33, 2, 25, 15; the call covers "
                  "positions 55..94 (q_offset 55)"),
        dict(name="doc_offsets", entry="doc_offsets", params={"num_docs": 5}, Q=80, KV=80, off=0,
             buffers=lambda rng, Q, KV: {"offsets": np.array([0, 20, 27, 28, 61, 80], dtype=np.int64)},
             mods=m_doc_offsets(5),
             note="5 documents starting at 0, 20, 27, 28, 61 (one of length 1); the table "
                  "has num_docs + 1 = 6 entries"),
        dict(name="sandwich", entry="sandwich", params={"half_dim": 8, "weight": 0.1},
             Q=70, KV=70, off=0, mods=m_sandwich(8, 0.1),
             note="causal, 8 frequencies, weight 0.1"),
        dict(name="gelu_score", entry="gelu_score", params={}, Q=66, KV=66, off=0,
             mods=m_gelu_score,
             note="causal, exact GELU of each logit"),
        dict(name="mla_rope", entry="mla_rope", params={"rope_dim": 4, "rope_scale": 0.25},
             Q=60, KV=60, off=0,
             buffers=lambda rng, Q, KV: {
                 "q_pe": rng.standard_normal((B, H, Q, 4)).astype(np.float32),
                 "k_pe": rng.standard_normal((B, KV, 4)).astype(np.float32)},
             mods=m_mla_rope(4, 0.25),
             note="causal; rotary parts of length 4, the key's shared by the heads"),
    ]


def block_layout(rng, q_len, kv_len):
    qb, kb = -(-q_len // 16), -(-kv_len // 16)
    layout = rng.random((qb, kb)) < 0.35
    for i in range(min(qb, kb)):
        layout[i, i] = True
    layout[2, :] = False
    return layout


def tree_parents(rng, prompt, kv_len):
    parent = np.full(kv_len, -1, dtype=np.int64)
    for j in range(prompt + 1, kv_len):
        # Bias towards recent nodes so the tree has some depth.
        lo = max(prompt, j - 4)
        parent[j] = rng.integers(lo, j)
    return parent


# ---------------------------------------------------------------------------


def to_torch(name, arr, dtype):
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if arr.dtype == np.float32:
        t = t.to(dtype)
    return t


def generate(case, out_dir):
    name = case["name"]
    q_len, kv_len, off = case["Q"], case["KV"], case["off"]
    hkv = case.get("hkv", HKV)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    q = rng.standard_normal((B, H, q_len, D)).astype(np.float32)
    k = rng.standard_normal((B, hkv, kv_len, D)).astype(np.float32)
    v = rng.standard_normal((B, hkv, kv_len, D)).astype(np.float32)
    bufs = case.get("buffers", lambda rng, Q, KV: {})(rng, q_len, kv_len)
    for bname, arr in bufs.items():
        assert arr.dtype in (np.int64, np.float32, np.bool_), (bname, arr.dtype)

    results = {}
    for dtype in (torch.float32, torch.float64):
        tb = {n: to_torch(n, a, dtype) for n, a in bufs.items()}
        if "parent" in bufs:
            tb["__ancestor"] = torch.from_numpy(ancestors(bufs["parent"]))
        mask_mod, score_mod = case["mods"](tb, off)
        tq, tk, tv = (torch.from_numpy(x).to(dtype) for x in (q, k, v))
        out, lse = run_flex(tq, tk, tv, mask_mod, score_mod, case.get("scale"), q_len, kv_len)
        results[dtype] = (out.detach().numpy(), lse.detach().numpy())
        if dtype == torch.float32:
            visible = dense_mask(mask_mod, q_len, kv_len)

    out32, lse32 = results[torch.float32]
    out64, lse64 = results[torch.float64]
    empty = ~visible.any(axis=1)  # [Q] rows that see no key

    # Fully masked rows: attnc defines out = 0, lse = -inf.
    bad = (out32[:, :, empty, :] != 0).any() or not np.all(np.isneginf(lse32[:, :, empty]))
    if bad:
        print(f"  {name}: FlexAttention did not give out = 0 / lse = -inf on fully masked "
              f"rows; fixing them up", file=sys.stderr)
        out32[:, :, empty, :] = 0.0
        lse32[:, :, empty] = -np.inf
        out64[:, :, empty, :] = 0.0
        lse64[:, :, empty] = -np.inf
    assert np.all(np.isfinite(out32)), name
    assert np.all(np.isfinite(lse32[:, :, ~empty])), name

    # float32 FlexAttention agrees with float64 FlexAttention.
    d_out = float(np.abs(out32 - out64).max())
    d_lse = float(np.abs(lse32[:, :, ~empty] - lse64[:, :, ~empty]).max()) if (~empty).any() else 0.0
    assert d_out < 2e-6 and d_lse < 2e-6, (name, d_out, d_lse)

    case_dir = out_dir / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    np.save(case_dir / "q.npy", q)
    np.save(case_dir / "k.npy", k)
    np.save(case_dir / "v.npy", v)
    for bname, arr in bufs.items():
        np.save(case_dir / f"{bname}.npy", arr)
    np.save(case_dir / "out.npy", out32.astype(np.float32))
    np.save(case_dir / "lse.npy", lse32.astype(np.float32))

    density = float(visible.mean())
    note = case["note"] + (
        f". visible fraction {density:.3f}, fully masked rows {int(empty.sum())} of {q_len}"
    )
    meta = {
        "spec": f"examples/{case['entry']}.attn",
        "entry": case["entry"],
        "params": {k: str(v) for k, v in case["params"].items()},
        "q_offset": off,
        "shape": {"B": B, "H": H, "HKV": hkv, "Q": q_len, "KV": kv_len, "D": D},
        "note": note,
    }
    (case_dir / "case.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"  {name:28s} Q={q_len:3d} KV={kv_len:3d} off={off:3d} HKV={hkv} "
          f"visible={density:.3f} empty_rows={int(empty.sum()):2d} "
          f"|f32-f64| out={d_out:.1e} lse={d_lse:.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/fixtures", help="output folder")
    ap.add_argument("--cases", nargs="*", help="only these cases (default: all)")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, numpy {np.__version__}")
    cases = build_cases()
    unknown = set(args.cases or []) - {c["name"] for c in cases}
    if unknown:
        sys.exit(f"unknown cases: {', '.join(sorted(unknown))}")
    for case in cases:
        if not args.cases or case["name"] in args.cases:
            generate(case, out_dir)


if __name__ == "__main__":
    main()
