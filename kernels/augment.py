"""Batch augmentation: one kernel that shifts (crops) and mirrors every image of a batch.

``fastcnn.transforms`` draws the random offsets and flips; this kernel only moves pixels. Each
image is one prange iteration; a row is written as up to three runs (fill, copied pixels, fill)
so that the copy loop has no branch and vectorises.
"""

from numba import njit, prange


@njit(parallel=True, cache=True)
def shift_flip(x, out, dy, dx, flip, fill):
    """out[n, c, i, j] = x[n, c, i + dy[n], jj + dx[n]] with jj = OW - 1 - j where flip[n],
    else j; ``fill`` where that pixel lies outside x.

    x (N, C, H, W) and out (N, C, OH, OW) C-contiguous, same dtype; dy, dx int64 (N,); flip
    bool (N,); fill a scalar of out's dtype. A crop of a padded image is a shift by
    (offset - padding); a horizontal flip of the crop reads its row backwards.
    """
    n_img, channels, height, width = x.shape
    out_h, out_w = out.shape[2], out.shape[3]
    for n in prange(n_img):
        sy = dy[n]
        sx = dx[n]
        mirrored = flip[n]
        # output columns j whose source column lies inside the image: [j0, j1)
        if mirrored:  # source column out_w - 1 - j + sx
            j0 = max(0, out_w + sx - width)
            j1 = min(out_w, out_w + sx)
        else:  # source column j + sx
            j0 = max(0, -sx)
            j1 = min(out_w, width - sx)
        if j1 < j0:
            j1 = j0
        for c in range(channels):
            for i in range(out_h):
                row = i + sy
                dst = out[n, c, i]
                if row < 0 or row >= height:
                    for j in range(out_w):
                        dst[j] = fill
                    continue
                src = x[n, c, row]
                for j in range(j0):
                    dst[j] = fill
                if mirrored:
                    base = out_w - 1 + sx
                    for j in range(j0, j1):
                        dst[j] = src[base - j]
                else:
                    for j in range(j0, j1):
                        dst[j] = src[j + sx]
                for j in range(j1, out_w):
                    dst[j] = fill
