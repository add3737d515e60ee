"""2-D convolution kernels, NCHW (cross-correlation, as PyTorch's conv2d).

Shapes: x (N, C, H, W), weight (F, C, KH, KW), bias (F,), out / dy (N, F, OH, OW). Padding is
given as top/left offsets; the bottom/right padding is whatever the output array's shape implies.
Input row ``oh*stride_h - pad_top + i*dil_h`` and column ``ow*stride_w - pad_left + j*dil_w``
are read by output (oh, ow) and kernel tap (i, j); positions outside the image are zeros:

    out[n, f, oh, ow] = bias[f] + sum_{c, i, j} weight[f, c, i, j] * x[n, c, oh*sh - pt + i*dh, ow*sw - pl + j*dw]

Contract: the kernels trust their inputs (validation lives in fastcnn.functional). All arrays
C-contiguous with the shapes above and one floating dtype (float32 or float64, compiled lazily,
float32 is never promoted to float64); integers are plain Python ints (stride, dilation >= 1,
padding >= 0). Outputs are overwritten, never accumulated, every element written.

How it is computed. NCHW rows are short (11 columns in the reference network's second layer),
too short for a vector loop over output columns to pay for itself. So each input plane is first
copied, per kernel column j, into a zero-padded *column-shifted* plane of the output's width:

    xs[c, j, r, ow] = x[c, r - pad_top, ow*stride_w + j*dil_w - pad_left]   (0 outside the image)

(a partial im2col over kernel columns only: KW copies of the padded input). After that every
kernel tap (c, i, j) is one contiguous run over the flattened output plane, with no bounds tests:
out[f, oh*OW + ow] += weight[f, c, i, j] * xs[c, j, (oh*stride_h + i*dil_h)*OW + ow], a single run
of OH*OW elements when stride_h == 1 (else OH runs of OW). The inner loops fuse 4 taps x 4 output
channels per pass (16 weights held in registers; each output element loaded and stored once per
4 taps, each input element loaded once per 4 filters), and LLVM vectorises them (AVX-512 where
the CPU has it). The backward passes use the same shifted planes: backward-input scatters into
them and folds them back, backward-weight takes dot products of them with dy.

The shifted copies are scratch, allocated once per call outside any prange body and bounded to
about ``_SCRATCH_ELEMENTS`` elements by processing the batch in groups of images (at least one
image per group).

Parallelism: every prange runs over a flattened pair of independent axes ((image, block of 4
output channels), (image, block of 4 input channels), (block of output channels, block of input
channels)), so both cores are busy at batch 1 too (except backward-input of a 1-channel input
at batch 1: one work item); no two iterations write the same element.
"""
import numpy as np
from numba import njit, prange

# Scratch budget (elements) for the column-shifted copies: 2**20 floats = 4 MiB in float32.
# Large enough that the reference network's layers take a whole batch of 64 in one group (fewer
# parallel regions per call: each costs a wait for the slowest thread on a busy machine); the
# speed measured the same from 2**14 to 2**20.
_SCRATCH_ELEMENTS = 1 << 20


@njit(cache=True, inline="always")
def _valid_range(pad, k_offset, stride, size, out_size):
    """[lo, hi) of the output indices o with 0 <= o*stride - pad + k_offset < size."""
    shift = pad - k_offset  # need o*stride >= shift and o*stride < size + shift
    lo = 0
    if shift > 0:
        lo = (shift + stride - 1) // stride
    top = size + shift
    hi = 0
    if top > 0:
        hi = (top + stride - 1) // stride
    if hi > out_size:
        hi = out_size
    if lo > hi:
        lo = hi
    return lo, hi


@njit(cache=True)
def _group_size(N, per_image):
    """Images per scratch group: as many as fit in _SCRATCH_ELEMENTS, at least 1, at most N."""
    return max(1, min(N, _SCRATCH_ELEMENTS // max(per_image, 1)))


@njit(cache=True)
def _shift_columns(xc, dst, pad_top, pad_left, stride_w, dil_w):
    """dst[j, r, ow] = xc[r - pad_top, ow*stride_w + j*dil_w - pad_left], zero outside xc.

    xc (H, W) one input plane; dst (KW, Hp, OW) overwritten.
    """
    H, W = xc.shape
    KW, Hp, OW = dst.shape
    zero = dst.dtype.type(0)
    for j in range(KW):
        ow_lo, ow_hi = _valid_range(pad_left, j * dil_w, stride_w, W, OW)
        col0 = j * dil_w - pad_left
        for r in range(Hp):
            ih = r - pad_top
            d = dst[j, r]
            if ih < 0 or ih >= H:
                for ow in range(OW):
                    d[ow] = zero
            else:
                xr = xc[ih]
                for ow in range(ow_lo):
                    d[ow] = zero
                for ow in range(ow_lo, ow_hi):
                    d[ow] = xr[ow * stride_w + col0]
                for ow in range(ow_hi, OW):
                    d[ow] = zero


# ---- loop bodies: one parallel work item each (serial helpers, so the parallel kernels stay thin) ----

@njit(cache=True, fastmath={"contract"})
def _forward_filters(xg, weight, bias, y, f0, f1, stride_h, dil_h, nrun, runlen):
    """y[f] = bias[f] + sum_{c,i,j} weight[f,c,i,j] * xg[c, j] shifted by row tap i, f in [f0, f1).

    One image: xg (C, KW, Hp*OW) its column-shifted planes, y (F, OH, OW) its output. Taps
    (c, i, j) are taken 4 at a time, in order, for 4 filters at once (f1 - f0 == 4).
    """
    F, C, KH, KW = weight.shape
    OH, OW = y.shape[1], y.shape[2]
    P = OH * OW
    KK = KH * KW
    T = C * KK  # taps, flattened (c, i, j)
    T4 = T - T % 4
    for f in range(f0, f1):
        b = bias[f]
        yf = y[f].reshape(P)
        for p in range(P):
            yf[p] = b
    if f1 - f0 == 4:
        y0 = y[f0].reshape(P); y1 = y[f0 + 1].reshape(P)
        y2 = y[f0 + 2].reshape(P); y3 = y[f0 + 3].reshape(P)
        v0 = weight[f0].reshape(T); v1 = weight[f0 + 1].reshape(T)
        v2 = weight[f0 + 2].reshape(T); v3 = weight[f0 + 3].reshape(T)
        for ta in range(0, T4, 4):  # 4 taps x 4 filters per pass
            tb, tc, td = ta + 1, ta + 2, ta + 3
            ca = ta // KK; ia = (ta - ca * KK) // KW; ja = ta - ca * KK - ia * KW
            cb = tb // KK; ib = (tb - cb * KK) // KW; jb = tb - cb * KK - ib * KW
            cc = tc // KK; ic = (tc - cc * KK) // KW; jc = tc - cc * KK - ic * KW
            cd = td // KK; id_ = (td - cd * KK) // KW; jd = td - cd * KK - id_ * KW
            xa = xg[ca, ja]; xb = xg[cb, jb]; xc = xg[cc, jc]; xd = xg[cd, jd]
            w0a = v0[ta]; w0b = v0[tb]; w0c = v0[tc]; w0d = v0[td]
            w1a = v1[ta]; w1b = v1[tb]; w1c = v1[tc]; w1d = v1[td]
            w2a = v2[ta]; w2b = v2[tb]; w2c = v2[tc]; w2d = v2[td]
            w3a = v3[ta]; w3b = v3[tb]; w3c = v3[tc]; w3d = v3[td]
            for run in range(nrun):
                yb = run * runlen
                oa = (run * stride_h + ia * dil_h) * OW
                ob = (run * stride_h + ib * dil_h) * OW
                oc = (run * stride_h + ic * dil_h) * OW
                od = (run * stride_h + id_ * dil_h) * OW
                sa = xa[oa:oa + runlen]; sb = xb[ob:ob + runlen]
                sc = xc[oc:oc + runlen]; sd = xd[od:od + runlen]
                a0 = y0[yb:yb + runlen]; a1 = y1[yb:yb + runlen]
                a2 = y2[yb:yb + runlen]; a3 = y3[yb:yb + runlen]
                for k in range(runlen):
                    ea = sa[k]; eb = sb[k]; ec = sc[k]; ed = sd[k]
                    a0[k] += w0a * ea + w0b * eb + w0c * ec + w0d * ed
                    a1[k] += w1a * ea + w1b * eb + w1c * ec + w1d * ed
                    a2[k] += w2a * ea + w2b * eb + w2c * ec + w2d * ed
                    a3[k] += w3a * ea + w3b * eb + w3c * ec + w3d * ed
        for ta in range(T4, T):  # the last T % 4 taps, one at a time
            ca = ta // KK; ia = (ta - ca * KK) // KW; ja = ta - ca * KK - ia * KW
            xa = xg[ca, ja]
            w0 = v0[ta]; w1 = v1[ta]; w2 = v2[ta]; w3 = v3[ta]
            for run in range(nrun):
                yb = run * runlen
                oa = (run * stride_h + ia * dil_h) * OW
                sa = xa[oa:oa + runlen]
                a0 = y0[yb:yb + runlen]; a1 = y1[yb:yb + runlen]
                a2 = y2[yb:yb + runlen]; a3 = y3[yb:yb + runlen]
                for k in range(runlen):
                    ea = sa[k]
                    a0[k] += w0 * ea; a1[k] += w1 * ea; a2[k] += w2 * ea; a3[k] += w3 * ea
    else:  # the last F % 4 filters, one at a time
        for f in range(f0, f1):
            yf = y[f].reshape(P)
            vf = weight[f].reshape(T)
            for ta in range(T):
                ca = ta // KK; ia = (ta - ca * KK) // KW; ja = ta - ca * KK - ia * KW
                xa = xg[ca, ja]
                wv = vf[ta]
                for run in range(nrun):
                    yb = run * runlen
                    oa = (run * stride_h + ia * dil_h) * OW
                    sa = xa[oa:oa + runlen]
                    a0 = yf[yb:yb + runlen]
                    for k in range(runlen):
                        a0[k] += wv * sa[k]


@njit(cache=True, fastmath={"contract"})
def _backward_input_channels(dyn, weight, dg, gx, c0, c1, stride_h, stride_w, pad_top, pad_left,
                             dil_h, dil_w, OW, nrun, runlen):
    """gx[c] for the input channels c in [c0, c1) of one image, overwritten.

    dyn (F, OH*OW) the image's dy; gx (C, H, W) the image's dx; dg (C, KW, Hp*OW) scratch for
    column-shifted gradient planes. First dg[c, j] = sum_{f,i} weight[f,c,i,j] * dy[f] shifted
    by row tap i (4 filters x 4 channels per pass when c1 - c0 == 4), then the KW planes are
    folded back into gx, the transpose of _shift_columns.
    """
    F, C, KH, KW = weight.shape
    H, W = gx.shape[1], gx.shape[2]
    L = dg.shape[2]
    Hp = L // OW
    F4 = F - F % 4
    for c in range(c0, c1):
        for j in range(KW):
            d = dg[c, j]
            for k in range(L):
                d[k] = 0
    if c1 - c0 == 4:
        for i in range(KH):
            for j in range(KW):
                d0 = dg[c0, j]; d1 = dg[c0 + 1, j]; d2 = dg[c0 + 2, j]; d3 = dg[c0 + 3, j]
                for f in range(0, F4, 4):  # 4 filters x 4 channels per pass
                    ga = dyn[f]; gb = dyn[f + 1]; gc = dyn[f + 2]; gd = dyn[f + 3]
                    w0a = weight[f, c0, i, j]; w0b = weight[f + 1, c0, i, j]
                    w0c = weight[f + 2, c0, i, j]; w0d = weight[f + 3, c0, i, j]
                    w1a = weight[f, c0 + 1, i, j]; w1b = weight[f + 1, c0 + 1, i, j]
                    w1c = weight[f + 2, c0 + 1, i, j]; w1d = weight[f + 3, c0 + 1, i, j]
                    w2a = weight[f, c0 + 2, i, j]; w2b = weight[f + 1, c0 + 2, i, j]
                    w2c = weight[f + 2, c0 + 2, i, j]; w2d = weight[f + 3, c0 + 2, i, j]
                    w3a = weight[f, c0 + 3, i, j]; w3b = weight[f + 1, c0 + 3, i, j]
                    w3c = weight[f + 2, c0 + 3, i, j]; w3d = weight[f + 3, c0 + 3, i, j]
                    for run in range(nrun):
                        yb = run * runlen
                        xb = (run * stride_h + i * dil_h) * OW
                        sa = ga[yb:yb + runlen]; sb = gb[yb:yb + runlen]
                        sc = gc[yb:yb + runlen]; sd = gd[yb:yb + runlen]
                        a0 = d0[xb:xb + runlen]; a1 = d1[xb:xb + runlen]
                        a2 = d2[xb:xb + runlen]; a3 = d3[xb:xb + runlen]
                        for k in range(runlen):
                            ea = sa[k]; eb = sb[k]; ec = sc[k]; ed = sd[k]
                            a0[k] += w0a * ea + w0b * eb + w0c * ec + w0d * ed
                            a1[k] += w1a * ea + w1b * eb + w1c * ec + w1d * ed
                            a2[k] += w2a * ea + w2b * eb + w2c * ec + w2d * ed
                            a3[k] += w3a * ea + w3b * eb + w3c * ec + w3d * ed
                for f in range(F4, F):  # the last F % 4 filters
                    ga = dyn[f]
                    w0 = weight[f, c0, i, j]; w1 = weight[f, c0 + 1, i, j]
                    w2 = weight[f, c0 + 2, i, j]; w3 = weight[f, c0 + 3, i, j]
                    for run in range(nrun):
                        yb = run * runlen
                        xb = (run * stride_h + i * dil_h) * OW
                        sa = ga[yb:yb + runlen]
                        a0 = d0[xb:xb + runlen]; a1 = d1[xb:xb + runlen]
                        a2 = d2[xb:xb + runlen]; a3 = d3[xb:xb + runlen]
                        for k in range(runlen):
                            ea = sa[k]
                            a0[k] += w0 * ea; a1[k] += w1 * ea; a2[k] += w2 * ea; a3[k] += w3 * ea
    else:  # the last C % 4 channels, one at a time
        for c in range(c0, c1):
            for i in range(KH):
                for j in range(KW):
                    dd = dg[c, j]
                    for f in range(F):
                        ga = dyn[f]
                        wv = weight[f, c, i, j]
                        for run in range(nrun):
                            yb = run * runlen
                            xb = (run * stride_h + i * dil_h) * OW
                            sa = ga[yb:yb + runlen]
                            a0 = dd[xb:xb + runlen]
                            for k in range(runlen):
                                a0[k] += wv * sa[k]
    r_lo = min(pad_top, Hp)  # scratch rows that are image rows: [r_lo, r_hi)
    r_hi = max(min(Hp, H + pad_top), r_lo)
    for c in range(c0, c1):
        g = gx[c]
        for ih in range(H):
            for iw in range(W):
                g[ih, iw] = 0
        for j in range(KW):
            ow_lo, ow_hi = _valid_range(pad_left, j * dil_w, stride_w, W, OW)
            col0 = j * dil_w - pad_left
            dd = dg[c, j]
            for r in range(r_lo, r_hi):
                grow = g[r - pad_top]
                drow = dd[r * OW:(r + 1) * OW]
                for ow in range(ow_lo, ow_hi):
                    grow[ow * stride_w + col0] += drow[ow]


@njit(cache=True, fastmath={"contract", "reassoc"})
def _backward_weight_block(xs, dyg, dweight, f0, f1, c0, c1, first, stride_h, dil_h, OW, nrun,
                           runlen):
    """dweight[f0:f1, c0:c1] += the contribution of one group of images (zeroed first if `first`).

    xs (G, C, KW, Hp*OW) the group's column-shifted planes, dyg (gn, F, OH, OW) its dy. Each
    image adds one dot product over its output plane per weight element, image by image: a
    fixed order (16 dot products sharing their loads when the block is 4 x 4).
    """
    gn, F = dyg.shape[0], dyg.shape[1]
    KH, KW = dweight.shape[2], dweight.shape[3]
    P = dyg.shape[2] * dyg.shape[3]
    if first:
        for f in range(f0, f1):
            for c in range(c0, c1):
                for i in range(KH):
                    for j in range(KW):
                        dweight[f, c, i, j] = 0
    for gi in range(gn):
        dyn = dyg[gi].reshape((F, P))
        if f1 - f0 == 4 and c1 - c0 == 4:  # 16 dot products sharing their loads
            ga = dyn[f0]; gb = dyn[f0 + 1]; gc = dyn[f0 + 2]; gd = dyn[f0 + 3]
            for i in range(KH):
                for j in range(KW):
                    x0 = xs[gi, c0, j]; x1 = xs[gi, c0 + 1, j]
                    x2 = xs[gi, c0 + 2, j]; x3 = xs[gi, c0 + 3, j]
                    z = dweight.dtype.type(0)
                    s00 = z; s01 = z; s02 = z; s03 = z
                    s10 = z; s11 = z; s12 = z; s13 = z
                    s20 = z; s21 = z; s22 = z; s23 = z
                    s30 = z; s31 = z; s32 = z; s33 = z
                    for run in range(nrun):
                        yb = run * runlen
                        xb = (run * stride_h + i * dil_h) * OW
                        ea = ga[yb:yb + runlen]; eb = gb[yb:yb + runlen]
                        ec = gc[yb:yb + runlen]; ed = gd[yb:yb + runlen]
                        u0 = x0[xb:xb + runlen]; u1 = x1[xb:xb + runlen]
                        u2 = x2[xb:xb + runlen]; u3 = x3[xb:xb + runlen]
                        for k in range(runlen):
                            va = ea[k]; vb = eb[k]; vc = ec[k]; vd = ed[k]
                            q0 = u0[k]; q1 = u1[k]; q2 = u2[k]; q3 = u3[k]
                            s00 += va * q0; s01 += va * q1; s02 += va * q2; s03 += va * q3
                            s10 += vb * q0; s11 += vb * q1; s12 += vb * q2; s13 += vb * q3
                            s20 += vc * q0; s21 += vc * q1; s22 += vc * q2; s23 += vc * q3
                            s30 += vd * q0; s31 += vd * q1; s32 += vd * q2; s33 += vd * q3
                    dweight[f0, c0, i, j] += s00; dweight[f0, c0 + 1, i, j] += s01
                    dweight[f0, c0 + 2, i, j] += s02; dweight[f0, c0 + 3, i, j] += s03
                    dweight[f0 + 1, c0, i, j] += s10; dweight[f0 + 1, c0 + 1, i, j] += s11
                    dweight[f0 + 1, c0 + 2, i, j] += s12; dweight[f0 + 1, c0 + 3, i, j] += s13
                    dweight[f0 + 2, c0, i, j] += s20; dweight[f0 + 2, c0 + 1, i, j] += s21
                    dweight[f0 + 2, c0 + 2, i, j] += s22; dweight[f0 + 2, c0 + 3, i, j] += s23
                    dweight[f0 + 3, c0, i, j] += s30; dweight[f0 + 3, c0 + 1, i, j] += s31
                    dweight[f0 + 3, c0 + 2, i, j] += s32; dweight[f0 + 3, c0 + 3, i, j] += s33
        else:  # a partial block (F % 4 filters or C % 4 channels): one dot product at a time
            for f in range(f0, f1):
                gf = dyn[f]
                for c in range(c0, c1):
                    for i in range(KH):
                        for j in range(KW):
                            xsrc = xs[gi, c, j]
                            s = dweight.dtype.type(0)
                            for run in range(nrun):
                                yb = run * runlen
                                xb = (run * stride_h + i * dil_h) * OW
                                e = gf[yb:yb + runlen]
                                u = xsrc[xb:xb + runlen]
                                for k in range(runlen):
                                    s += e[k] * u[k]
                            dweight[f, c, i, j] += s


@njit(cache=True, fastmath={"contract", "reassoc"})
def _bias_sums(dy, dbias, f0, f1):
    """dbias[f] = sum of dy[:, f] for f in [f0, f1), image by image (a fixed order)."""
    N = dy.shape[0]
    P = dy.shape[2] * dy.shape[3]
    for f in range(f0, f1):
        s = dbias.dtype.type(0)
        for n in range(N):
            gf = dy[n, f].reshape(P)
            for p in range(P):
                s += gf[p]
        dbias[f] = s


# ---- the kernels ----

@njit(parallel=True, cache=True)
def conv2d_forward(x, weight, bias, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, out):
    """out[n, f] = bias[f] + sum_{c,i,j} weight[f,c,i,j] * x[n, c] shifted by (i, j); out (N, F, OH, OW) overwritten.

    x (N, C, H, W), weight (F, C, KH, KW), bias (F,). Per group of images: the column-shifted
    copies (prange over (image, channel)), then the sums (prange over (image, block of 4
    filters), so even batch 1 has F/4 work items).
    """
    N, C, H, W = x.shape
    F, _, KH, KW = weight.shape
    OH, OW = out.shape[2], out.shape[3]
    Hp = (OH - 1) * stride_h + (KH - 1) * dil_h + 1  # rows of the padded input that are read
    G = _group_size(N, C * KW * Hp * OW)
    xs = np.empty((G, C, KW, Hp * OW), dtype=x.dtype)
    nfb = (F + 3) // 4
    nrun, runlen = (1, OH * OW) if stride_h == 1 else (OH, OW)  # contiguous runs per tap
    for g0 in range(0, N, G):
        gn = min(G, N - g0)
        for t in prange(gn * C):
            gi, c = t // C, t % C
            _shift_columns(x[g0 + gi, c], xs[gi, c].reshape((KW, Hp, OW)), pad_top, pad_left, stride_w, dil_w)
        for t in prange(gn * nfb):
            gi, fb = t // nfb, t % nfb
            _forward_filters(xs[gi], weight, bias, out[g0 + gi], 4 * fb, min(4 * fb + 4, F),
                             stride_h, dil_h, nrun, runlen)


@njit(parallel=True, cache=True)
def conv2d_backward_input(dy, weight, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, dx):
    """dx = gradient of sum(out * dy) with respect to x; dx (N, C, H, W) overwritten.

    dy (N, F, OH, OW), weight (F, C, KH, KW). The transpose of the forward: prange over (image,
    block of 4 input channels), each scattering dy into its own column-shifted scratch planes
    and folding them into dx[n, c0:c0+4] (every element written; zeros where no window reaches).
    """
    N, F, OH, OW = dy.shape
    _, C, KH, KW = weight.shape
    Hp = (OH - 1) * stride_h + (KH - 1) * dil_h + 1
    G = _group_size(N, C * KW * Hp * OW)
    dxs = np.empty((G, C, KW, Hp * OW), dtype=dx.dtype)
    ncb = (C + 3) // 4
    nrun, runlen = (1, OH * OW) if stride_h == 1 else (OH, OW)
    for g0 in range(0, N, G):
        gn = min(G, N - g0)
        for t in prange(gn * ncb):
            gi, cb = t // ncb, t % ncb
            n = g0 + gi
            _backward_input_channels(dy[n].reshape((F, OH * OW)), weight, dxs[gi], dx[n],
                                     4 * cb, min(4 * cb + 4, C), stride_h, stride_w, pad_top,
                                     pad_left, dil_h, dil_w, OW, nrun, runlen)


@njit(parallel=True, cache=True)
def conv2d_backward_weight(x, dy, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, dweight, dbias):
    """dweight[f,c,i,j] = sum_{n,oh,ow} dy[n,f,oh,ow] * x[n,c,ih,iw] and dbias[f] = sum dy[:, f].

    x (N, C, H, W), dy (N, F, OH, OW); dweight (F, C, KH, KW) and dbias (F,) overwritten.

    Deterministic without partial buffers: the prange runs over (block of 4 filters, block of 4
    channels), so each element of dweight and of dbias (summed by the blocks holding channel 0)
    is computed by exactly one iteration, in a fixed order: image by image (groups of images in
    order), each image's contribution a dot product over the output plane whose (vectorised,
    "reassoc") summation order depends only on the shapes. The result is bitwise identical on
    repeated calls and for any number of threads.
    """
    N, C, H, W = x.shape
    F, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    KH, KW = dweight.shape[2], dweight.shape[3]
    Hp = (OH - 1) * stride_h + (KH - 1) * dil_h + 1
    G = _group_size(N, C * KW * Hp * OW)
    xs = np.empty((G, C, KW, Hp * OW), dtype=x.dtype)
    nfb = (F + 3) // 4
    ncb = (C + 3) // 4
    nrun, runlen = (1, OH * OW) if stride_h == 1 else (OH, OW)
    for g0 in range(0, N, G):
        gn = min(G, N - g0)
        for t in prange(gn * C):
            gi, c = t // C, t % C
            _shift_columns(x[g0 + gi, c], xs[gi, c].reshape((KW, Hp, OW)), pad_top, pad_left, stride_w, dil_w)
        for t in prange(nfb * ncb):
            fb, cb = t // ncb, t % ncb
            f0, f1 = 4 * fb, min(4 * fb + 4, F)
            if g0 == 0 and cb == 0:
                _bias_sums(dy, dbias, f0, f1)
            _backward_weight_block(xs, dy[g0:g0 + gn], dweight, f0, f1, 4 * cb, min(4 * cb + 4, C),
                                   g0 == 0, stride_h, dil_h, OW, nrun, runlen)
