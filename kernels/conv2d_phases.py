"""The input gradient of a strided convolution, phase by phase (polyphase decomposition).

With stride s, input pixel ih is read by kernel row i from output row oh = (ih + pad - i) / s
only where that division is exact. So the pixels ih = py + s*a of one residue py (a "phase")
all see the same kernel rows I(py) = {i : (py + pad - i) % s == 0}, each from output row
a + q(i) with q(i) = (py + pad - i) / s, and likewise for columns. Per phase (py, px):

    dx[n, py + s*a, px + s*b, c] = sum_{i in I(py), j in J(px), f} dy[n, a + q(i), b + q(j), f]
                                                                   * weight[f, c, i, j]

(dy outside its extent read as zero): a stride-1 correlation of dy with a sub-kernel, every
term one that the convolution has. col2im (conv2d.conv2d_backward_input) computes the same sums
as dcol = dy @ W^T, whose products are only F terms long, then scatters each output pixel's
KH x KW taps into the image, one addition per tap; here each tile of dx pixels sums its taps x
filters terms in registers and is stored once.
For a 3x3 stride-2 kernel the phases have 4, 2, 2 and 1 taps (of F terms each). The channels
go in column blocks: of 32 on gemm_tile's wide tile (R pixels x 32) while more than 16 remain,
on hosts without the tall tile (AVX2: per term, in float32, R broadcasts and 4 vector loads
feed 4R multiply-adds, where the narrow tile's RN and 2 feed 2RN), else of 16 on the narrow one (RN
pixels x 16; with AVX-512 it ran as fast as the tall 6 x 32 tile, which compiled a second
tile). Each dx value is one tile row's sum over the same terms in the same order whichever
tile computes it: the blocks change no bit of the result.

Each worker takes a contiguous range of images; per image it copies dy into a zero-bordered
buffer of its own (in cache for all the phases), then runs every phase's tiles. Every dx
value is one tile row's sum in a fixed order: the result depends on the shapes alone, not on
``threads``.
"""

import numpy as np
from numba import njit, prange

from .gemm_tile import FT, FTN, LINE, RN, TALL, R, copy16, gemm_tile


@njit(cache=True)
def _phase_taps(p, pad, k, s):
    """(first q, count) of phase residue ``p``'s kernel taps along one axis: the taps i < k with
    (p + pad - i) % s == 0, in increasing i, read dy at offsets q(i) = (p + pad - i) // s,
    which fall by one per tap."""
    count = 0
    first = 0
    for i in range(k):
        if (p + pad - i) % s == 0:
            if count == 0:
                first = (p + pad - i) // s
            count += 1
    return first, count


@njit(cache=True)
def _padding(size, out_size, pad, k, s):
    """(before, padded size) of dy along one axis: zeros enough that every phase's pixels read
    inside the buffer (q(i) from first down to first - count + 1, pixels a < the phase's)."""
    lo, hi = 0, out_size - 1
    for p in range(min(s, size)):
        first, count = _phase_taps(p, pad, k, s)
        if count > 0:
            n = (size - p + s - 1) // s  # the phase's pixels along the axis
            lo = min(lo, first - count + 1)
            hi = max(hi, n - 1 + first)
    before = -lo
    return before, before + hi + 1


@njit(parallel=True, cache=True)
def conv2d_backward_input_phases(dy, weight, stride_h, stride_w, pad_top, pad_left, dx, threads):
    """conv2d.conv2d_backward_input (dilation 1) computed phase by phase: dx = the gradient of
    sum(out * dy) with respect to x, up to the order of its sums.

    dy (N, OH, OW, F), weight (F, C, KH, KW) finite (zeros around dy meet every weight: 0 * inf
    would be NaN), dx (N, H, W, C) overwritten. ``threads``: the workers, each a contiguous
    range of images with a padded dy buffer of its own (numba.get_num_threads() in the caller).
    """
    N, OH, OW, F = dy.shape
    _, C, KH, KW = weight.shape
    H, W = dx.shape[1], dx.shape[2]
    sh, sw = stride_h, stride_w
    wide = _wide_blocks(C)
    Cp = _padded_channels(C, wide)
    pad_rows = max(R, RN) - 1  # a phase's last tile, of either shape, reads this many more pixels
    top, PH = _padding(H, OH, pad_top, KH, sh)
    left, PW = _padding(W, OW, pad_left, KW, sw)
    phases = sh * sw

    # per phase: its taps' offsets in the padded image (aoff), its packed weights (taps x Cp),
    # its pixels' window offsets (pix: the phase's pixels, then pad_rows copies of the last one)
    # and their dx offsets
    # (np.empty and loops: np.zeros here would be a parallel loop of its own, compiled too)
    tap0 = np.empty(phases + 1, dtype=np.int64)
    pix0 = np.empty(phases + 1, dtype=np.int64)
    npix = np.empty(phases, dtype=np.int64)
    tap0[0] = 0
    pix0[0] = 0
    for ph in range(phases):
        py, px = ph // sw, ph % sw
        _, ci = _phase_taps(py, pad_top, KH, sh)
        _, cj = _phase_taps(px, pad_left, KW, sw)
        na = (H - py + sh - 1) // sh if py < H else 0
        nb = (W - px + sw - 1) // sw if px < W else 0
        npix[ph] = na * nb
        tap0[ph + 1] = tap0[ph] + ci * cj * F
        pix0[ph + 1] = pix0[ph] + na * nb + pad_rows
    aoff = np.empty(max(tap0[phases], 1), dtype=np.uint64)
    wp = np.empty(max(tap0[phases], 1) * Cp, dtype=dy.dtype)
    pix = np.empty(max(pix0[phases], 1), dtype=np.uint64)
    dxo = np.empty(max(pix0[phases], 1), dtype=np.uint64)
    u = np.uint64
    for ph in range(phases):
        py, px = ph // sw, ph % sw
        qi, ci = _phase_taps(py, pad_top, KH, sh)
        qj, cj = _phase_taps(px, pad_left, KW, sw)
        nb = (W - px + sw - 1) // sw if px < W else 0
        k = tap0[ph]
        for ti in range(ci):
            i = py + pad_top - sh * (qi - ti)  # the tap whose offset is qi - ti
            for tj in range(cj):
                j = px + pad_left - sw * (qj - tj)
                for f in range(F):
                    # offsets may be negative: uint64 wraps, and the sum with the pixel's is exact
                    aoff[k] = u(((qi - ti) * PW + (qj - tj)) * F + f)
                    for c in range(Cp):
                        wp[k * Cp + c] = weight[f, c, i, j] if c < C else 0
                    k += 1
        for q in range(pix0[ph + 1] - pix0[ph]):
            p = min(q, max(npix[ph] - 1, 0))
            a, b = (p // nb, p % nb) if nb > 0 else (0, 0)
            pix[pix0[ph] + q] = u(((a + top) * PW + b + left) * F)
            dxo[pix0[ph] + q] = u(((py + sh * a) * W + px + sw * b) * C)

    workers = max(1, min(threads, N))
    image = PH * PW * F
    buffers = np.empty((workers, image + LINE), dtype=dy.dtype)  # see gemm_tile.LINE
    tiles = np.empty((workers, R * FT + LINE), dtype=dy.dtype)
    dyf = dy.reshape(dy.size)
    dxf = dx.reshape(dx.size)
    for part in prange(workers):
        w = np.int64(part)  # (int64: see conv2d.conv2d_backward_input)
        for n in range(w * N // workers, (w + 1) * N // workers):
            _pad_image(dyf, n, OH, OW, F, top, left, PH, PW, buffers[w])
            _image_phases(
                buffers[w],
                n * H * W * C,
                phases,
                tap0,
                pix0,
                npix,
                aoff,
                wp,
                Cp,
                pix,
                dxo,
                C,
                tiles[w],
                dxf,
                wide,
            )


@njit(cache=True)
def _wide_blocks(C):
    """Whether C channels go in blocks of 32 on the wide tile (see the module's docstring):
    on hosts without the tall tile, for more than 16 channels."""
    return not TALL and C > FTN


@njit(cache=True)
def _padded_channels(C, wide):
    """The packed weights' columns: C up to whole blocks (of 32 with ``wide``, a last one of 16
    where at most 16 channels remain)."""
    if not wide:
        return (C + FTN - 1) // FTN * FTN
    last = C % FT
    return C // FT * FT + (0 if last == 0 else FTN if last <= FTN else FT)


@njit(cache=True)
def _image_phases(buf, out0, phases, tap0, pix0, npix, aoff, wp, Cp, pix, dxo, C, tile, dxf, wide):
    """One image's gradient, every phase: the tiles of its pixels (rows) and the tap x filter
    terms (k) from the padded dy image ``buf``, through the scratch ``tile`` into dx (flat,
    the image from out0 on); column blocks of 32 channels on the wide tile with ``wide`` while
    more than 16 remain, the rest of 16 on the narrow tile. Serial: the body of
    conv2d_backward_input_phases' prange."""
    u = np.uint64
    for ph in range(phases):
        k0, k1 = tap0[ph], tap0[ph + 1]
        if k1 == k0:  # no tap reads these pixels: their gradient is zero
            for p in range(pix0[ph], pix0[ph] + npix[ph]):
                d = u(out0) + dxo[p]
                for c in range(u(C)):
                    dxf[d + c] = 0
            continue
        c0 = np.int64(0)  # not a literal 0: the block functions would compile for both types
        while c0 < C:
            if not TALL and wide and C - c0 > FTN:  # TALL: numba drops the wide tile there
                _phase_block_wide(
                    buf, out0, ph, pix0, npix, aoff, k0, k1, wp, Cp, pix, dxo, c0, C, tile, dxf
                )
                c0 += FT
            else:
                _phase_block_narrow(
                    buf, out0, ph, pix0, npix, aoff, k0, k1, wp, Cp, pix, dxo, c0, C, tile, dxf
                )
                c0 += FTN


@njit(cache=True, inline="always")
def _store_rows(tile, rows, cols, t, end, out0, dxo, c0, nc, dxf):
    """dx (flat, the image from out0 on) = the tile's first min(rows, end - t) rows of ``cols``
    (pixels t... of the phase, dx offsets dxo), their first nc channels from c0 on."""
    u = np.uint64
    for r in range(min(rows, end - t)):
        d = u(out0) + dxo[t + r] + u(c0)
        s0 = u(r * cols)
        if nc == cols:  # whole vectors of 16
            for v in range(0, cols, FTN):
                copy16(dxf, d + u(v), tile, s0 + u(v))
        else:
            for f in range(nc):
                dxf[d + u(f)] = tile[s0 + u(f)]


@njit(cache=True, fastmath={"contract"})
def _phase_block_wide(buf, out0, ph, pix0, npix, aoff, k0, k1, wp, Cp, pix, dxo, c0, C, tile, dxf):
    """Phase ph's pixels, channels [c0, c0 + 32) (or to C), on the wide tile: R pixels a tile.
    A function of each tile's own: both tiles behind a flag in one function slowed the narrow
    one (docs/kernels.md)."""
    u = np.uint64
    end = pix0[ph] + npix[ph]
    for t in range(pix0[ph], end, R):
        gemm_tile(buf, pix, t, aoff, k0, k1, wp, u(k0 * Cp + c0), u(Cp), tile, 0, False, False)
        _store_rows(tile, R, FT, t, end, out0, dxo, c0, min(FT, C - c0), dxf)


@njit(cache=True, fastmath={"contract"})
def _phase_block_narrow(
    buf, out0, ph, pix0, npix, aoff, k0, k1, wp, Cp, pix, dxo, c0, C, tile, dxf
):
    """_phase_block_wide for channels [c0, c0 + 16) on the narrow tile: RN pixels a tile."""
    u = np.uint64
    end = pix0[ph] + npix[ph]
    for t in range(pix0[ph], end, RN):
        gemm_tile(buf, pix, t, aoff, k0, k1, wp, u(k0 * Cp + c0), u(Cp), tile, 0, False, True)
        _store_rows(tile, RN, FTN, t, end, out0, dxo, c0, min(FTN, C - c0), dxf)


@njit(cache=True)
def _pad_image(dyf, n, OH, OW, F, top, left, PH, PW, buf):
    """buf[:PH*PW*F] = image n of dy (flat NHWC) at rows [top, top + OH), columns [left, left +
    OW) of a PH x PW image of F channels, zeros around it. (Unsigned offsets: a signed index
    is tested for wrapping on every access, and the loops stayed scalar.)"""
    u = np.uint64
    z = buf.dtype.type(0)
    row = u(PW * F)
    for e in range(u(0), u(top) * row):
        buf[e] = z
    for e in range(u(top + OH) * row, u(PH) * row):
        buf[e] = z
    lead, run = u(left * F), u(OW * F)
    src0 = u(n * OH * OW * F)
    for oh in range(OH):
        d = u(top + oh) * row
        for e in range(lead):
            buf[d + e] = z
        s = src0 + u(oh) * run
        d += lead
        for e in range(run):
            buf[d + e] = dyf[s + e]
        for e in range(lead + run, row):
            buf[u(top + oh) * row + e] = z
