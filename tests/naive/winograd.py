"""Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016), the textbook way: the matrices, one 2x2 output tile at a time. NCHW.
The weight gradient also by F(4x4, 3x3) (``F4``: a 6x6 patch per 4x4 outputs).

For a 4x4 input patch d of channel c and the 3x3 kernel g of filter f and channel c,

    Y = A^T [ sum_c (G g G^T) * (B^T d B) ] A

(* elementwise) is the 2x2 block of the cross-correlation's outputs the patch covers. Inputs
are zero-padded by ``padding = ((top, bottom), (left, right))``; a last tile that would run
past the output is computed on zeros and cut. Sums in float64; the result has x's dtype.
"""

import numpy as np

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)
F2 = (BT, G, AT)
F4 = (
    np.array(
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64
    ),
    np.array(
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64
    ),
    np.array(
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
        dtype=np.float64,
    ),
)  # fmt: skip


def winograd_conv2d(x, w, b, padding=((0, 0), (0, 0))):
    """y (N, F, OH, OW) of the 3x3, stride-1 cross-correlation of x (N, C, H, W) with w
    (F, C, 3, 3) plus b (F,), by F(2x2, 3x3)."""
    N, C, H, W = x.shape
    F = w.shape[0]
    (pt, pb), (pl, pr) = padding
    OH, OW = H + pt + pb - 2, W + pl + pr - 2
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    # the padded input, extended with zeros to whole tiles
    xp = np.zeros((N, C, 2 * TH + 2, 2 * TW + 2))
    xp[:, :, pt : pt + H, pl : pl + W] = x
    U = np.einsum("ai,fcij,bj->fcab", G, w.astype(np.float64), G)  # G g G^T
    y = np.zeros((N, F, 2 * TH, 2 * TW))
    for n in range(N):
        for ty in range(TH):
            for tx in range(TW):
                d = xp[n, :, 2 * ty : 2 * ty + 4, 2 * tx : 2 * tx + 4]
                V = np.einsum("ai,cij,bj->cab", BT, d, BT)  # B^T d B
                M = np.einsum("fcab,cab->fab", U, V)  # the sum over channels
                y[n, :, 2 * ty : 2 * ty + 2, 2 * tx : 2 * tx + 2] = np.einsum(
                    "ai,fij,bj->fab", AT, M, AT
                )
    y += b.astype(np.float64)[None, :, None, None]
    return y[:, :, :OH, :OW].astype(x.dtype)


def winograd_conv2d_backward_weight(x, dy, padding=((0, 0), (0, 0)), matrices=F2):
    """dw (F, C, 3, 3) of that cross-correlation from its gradient dy (N, F, OH, OW), by the
    same algorithm run backwards (the adjoint of each step): per tile the m x m gradient is
    spread to the patch's size, A dy A^T, multiplied elementwise with the patch's B^T d B,
    summed over every tile, and brought back to 3x3 by G^T (.) G. ``matrices``: (B^T, G,
    A^T) of F(2x2, 3x3) (``F2``, m = 2) or F(4x4, 3x3) (``F4``, m = 4)."""
    BTm, Gm, ATm = matrices
    m, a = ATm.shape
    N, C, H, W = x.shape
    F, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    (pt, pb), (pl, pr) = padding
    TH, TW = (OH + m - 1) // m, (OW + m - 1) // m
    xp = np.zeros((N, C, m * TH + a - m, m * TW + a - m))
    xp[:, :, pt : pt + H, pl : pl + W] = x
    dyp = np.zeros((N, F, m * TH, m * TW))  # outputs past OH, OW: no gradient
    dyp[:, :, :OH, :OW] = dy
    S = np.zeros((F, C, a, a))
    for n in range(N):
        for ty in range(TH):
            for tx in range(TW):
                d = xp[n, :, m * ty : m * ty + a, m * tx : m * tx + a]
                V = np.einsum("ai,cij,bj->cab", BTm, d, BTm)
                g = dyp[n, :, m * ty : m * ty + m, m * tx : m * tx + m]
                Z = np.einsum("ia,fij,jb->fab", ATm, g, ATm)  # A dy A^T
                S += np.einsum("fab,cab->fcab", Z, V)
    return np.einsum("ai,fcab,bj->fcij", Gm, S, Gm).astype(x.dtype)
