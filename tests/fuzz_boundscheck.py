"""pytest plugin (``-p fuzz_boundscheck``): compile every kernel with ``parallel=False,
boundscheck=True`` and no cache, so an out-of-bounds index in a kernel raises IndexError instead
of silently reading or writing outside an array.

``NUMBA_BOUNDSCHECK=1`` alone is not enough: inside a ``prange`` body of a parallel kernel the
check is not done (numba skips it there), so the parallel build hides the very bugs it is
meant to find. This plugin patches ``numba.njit`` before fastcnn (and so fastcnn.kernels) is
imported; it is loaded by tests/test_fuzz.py for one run of tests/fuzz_cases.py in a child
interpreter. It is slow to compile (about 20 s for every kernel in both dtypes) and must never
be loaded into a normal test run.
"""

import sys

import numba

if any(name == "fastcnn" or name.startswith("fastcnn.") for name in sys.modules):
    raise RuntimeError("fuzz_boundscheck must be loaded before fastcnn is imported")

_njit = numba.njit


def _debug_njit(*args, **kwargs):
    if args and callable(args[0]):  # bare @njit
        return _njit(boundscheck=True, cache=False)(args[0])
    kwargs.update(parallel=False, boundscheck=True, cache=False)
    return _njit(*args, **kwargs)


numba.njit = _debug_njit
BOUNDSCHECK = True

# Shrink the kernels' work sizes (module globals, frozen into a kernel when it is compiled, i.e.
# at its first call), so that the small shapes the fuzz cases use also run the paths large
# inputs take: many forward work items, several pixel blocks and chunks in the convolution's
# weight gradient, several chunks in the fused pass, several chunks of elements in the
# activations, several channel blocks and pixel chunks in batchnorm.
from fastcnn.kernels import activations, batchnorm, conv2d, fused  # noqa: E402

for _module, _name, _value in (
    (conv2d, "_TILES_PER_ITEM", 1),
    (conv2d, "_PIXEL_BLOCK", 2),
    (conv2d, "_WEIGHT_UNITS", 2),
    (conv2d, "_WEIGHT_CHUNKS", 3),
    (fused, "_CHUNKS", 3),
    (fused, "_WEIGHT_UNITS", 3),
    (fused, "_INPUT_CHUNKS", 2),
    (activations, "_CHUNK", 4),
    (activations, "_MAX_CHUNKS", 3),
    (batchnorm, "_BLOCK", 2),
    (batchnorm, "_PIXELS", 3),
):
    if hasattr(_module, _name):
        setattr(_module, _name, _value)
