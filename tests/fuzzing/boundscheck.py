"""The bounds-checked build really checks (only in the ``-p fuzz_boundscheck`` run)."""

import numpy as np
import pytest

from fuzzing.common import BOUNDSCHECK, tally

# ---------------------------------------------------------------------------------------------
# the bounds-checked build really checks (only in the `-p fuzz_boundscheck` run)


@pytest.mark.skipif(not BOUNDSCHECK, reason="only with -p fuzz_boundscheck")
def test_boundscheck_is_active():
    """A kernel called directly with an index past the end raises IndexError in this build
    (in the normal build it would write outside the array)."""
    from fastcnn.kernels import pool2d

    dy = np.ones((1, 2, 2, 1), np.float32)  # NHWC
    argmax = np.array([[[[0], [1]], [[2], [99]]]], np.int64)  # 99 is outside a 2x2 plane
    with pytest.raises(IndexError):  # geometry 0: the general path, which indexes by argmax
        pool2d.maxpool2d_backward(
            dy, argmax, dy, False, 0, 0, 0, 0, 0, 0, np.empty((1, 2, 2, 1), np.float32)
        )
    # and the work sizes were shrunk before compilation (multi-item / multi-chunk paths)
    from fastcnn.kernels import activations, conv2d

    assert conv2d._TILES_PER_ITEM == 1 and conv2d._PIXEL_BLOCK == 2
    assert activations._chunks(10) == (3, 4)  # three chunks of at most 4 elements
    tally("boundscheck self-test", "valid")
