"""The CPU kernel picks an AVX-512, AVX2+FMA or Eigen GEMM at run time; every path must agree
with NumPy, including sizes that fall off the SIMD register tiles and transposes, with the
ReLU / exact-GELU epilogue (vectorised on AVX-512, std::erf elsewhere), GroupedLayerNorm and
FusedAttention."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent("""
    import json
    import math
    import numpy as np
    from tfweave.ops import grouped_matmul as gmm

    erf = np.vectorize(math.erf, otypes=[np.float64])
    ACTIVATIONS = {"relu": lambda z: np.maximum(z, 0.0),
                   "gelu": lambda z: 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))}

    rng = np.random.default_rng(0)
    worst = 0.0
    # (sizes, K, M): remainders against the 14/6-row, 32/16-column and 8x8 transpose blocks,
    # depths across the 256-deep blocks, and more rows than one 252-row block; for the
    # few-row dot kernel (transpose_w): every row plan (4-row blocks, then 1-3 rows or one
    # block of 5 or 6), depths with and without a partial 16-vector, 4-column remainders;
    # blocked weights (w_blocked) where M % 4 == 0 and K % 16 == 0, past 32 rows too.
    for sizes, k, m in [([15, 0, 7, 1], 70, 45), ([300, 3], 9, 33), ([5, 13], 600, 17),
                        ([0, 29], 257, 64), ([2], 1, 1), ([6, 10, 4, 32], 48, 22),
                        ([1, 2, 3, 4, 5, 6, 7, 8, 33, 0], 64, 36)]:
        sizes = np.array(sizes)
        x = rng.standard_normal((sizes.sum(), k)).astype(np.float32)
        w = rng.standard_normal((len(sizes), k, m)).astype(np.float32)
        dy = rng.standard_normal((sizes.sum(), m)).astype(np.float32)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        y = gmm.grouped_matmul(x, w, sizes).numpy()
        yt = gmm.grouped_matmul(x, np.ascontiguousarray(w.transpose(0, 2, 1)), sizes,
                                transpose_w=True).numpy()
        bias = rng.standard_normal((len(sizes), m)).astype(np.float32)
        activated = {name: gmm.grouped_matmul(x, w, sizes, bias, activation=name).numpy()
                     for name in ACTIVATIONS}
        blocked = None
        if k % 16 == 0 and m % 4 == 0:
            blocked = gmm.grouped_matmul(
                x, gmm.block_weights(np.ascontiguousarray(w.transpose(0, 2, 1))), sizes, bias,
                transpose_w=True, activation="gelu").numpy()
        dw = gmm.grouped_matmul_weight_grad(x, dy, sizes).numpy()
        dwt = gmm.grouped_matmul_weight_grad(x, dy, sizes, transpose_w=True).numpy()
        for g in range(len(sizes)):
            rows = slice(offsets[g], offsets[g + 1])
            ref = x[rows].astype(np.float64) @ w[g]
            ref_dw = x[rows].T.astype(np.float64) @ dy[rows]
            scale = 1.0 + np.sqrt(k)
            worst = max(worst, np.abs(y[rows] - ref).max(initial=0) / scale,
                        np.abs(yt[rows] - ref).max(initial=0) / scale,
                        np.abs(dw[g] - ref_dw).max(initial=0) / (1 + np.sqrt(sizes[g])),
                        np.abs(dwt[g] - ref_dw.T).max(initial=0) / (1 + np.sqrt(sizes[g])))
            for name, act in ACTIVATIONS.items():
                want = act(ref + bias[g])
                worst = max(worst, np.abs(activated[name][rows] - want).max(initial=0) / scale)
                if blocked is not None and name == "gelu":
                    worst = max(worst, np.abs(blocked[rows] - want).max(initial=0) / scale)
        # GroupedLayerNorm (vectorised on AVX-512, scalar otherwise), H = m: tails of 16 too
        gamma = rng.standard_normal((len(sizes), m)).astype(np.float32)
        beta = rng.standard_normal((len(sizes), m)).astype(np.float32)
        normed = gmm.grouped_layer_norm(y, sizes, gamma, beta, epsilon=1e-3).numpy()
        for g in range(len(sizes)):
            rows = slice(offsets[g], offsets[g + 1])
            z = y[rows].astype(np.float64)
            z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-3)
            worst = max(worst, np.abs(normed[rows] - (z * gamma[g] + beta[g])).max(initial=0))
    # FusedAttention (vectorised on AVX-512, scalar otherwise): head sizes with and without a
    # partial 16-vector, value heads of another size, a mask broadcast over the heads with a
    # query that sees no key (uniform weights, as Keras's masked softmax gives)
    for b, t, s, n, h, hv in [(3, 5, 7, 2, 20, 33), (2, 8, 8, 4, 64, 64), (1, 1, 3, 1, 1, 17)]:
        q = rng.standard_normal((b, t, n, h)).astype(np.float32)
        k = rng.standard_normal((b, s, n, h)).astype(np.float32)
        v = rng.standard_normal((b, s, n, hv)).astype(np.float32)
        mask = rng.random((b, 1, t, s)) > 0.3
        mask[0, 0, 0] = False
        got = gmm.fused_attention(q, k, v, mask, scale=0.3, masked_value=-1e9).numpy()
        scores = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), k) * 0.3
        scores = np.where(np.broadcast_to(mask, scores.shape), scores, -1e9)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        want = np.einsum("bnts,bsnh->btnh", weights, v)
        worst = max(worst, np.abs(got - want).max(initial=0))
    print("RESULT " + json.dumps({"worst": float(worst)}))
""")


def _worst_error(stdout: str) -> float:
    line = next(l for l in stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])["worst"]


def test_default_gemm_path_matches_numpy_on_awkward_sizes(grouped_matmul_library, capsys):
    exec(CHECK, {})  # in this process: the best ISA this CPU has
    assert _worst_error(capsys.readouterr().out) < 1e-5


@pytest.mark.parametrize("isa", ["avx2", "none"])
def test_capped_gemm_paths_match_numpy_on_awkward_sizes(grouped_matmul_library, isa):
    # The ISA is chosen once per process, so each cap runs in its own interpreter.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TFWEAVE_GEMM_ISA=isa)
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _worst_error(result.stdout) < 1e-5
