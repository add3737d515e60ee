"""Property-based fuzz cases for every public entry point (run by tests/test_fuzz.py).

Not collected by a normal ``pytest tests`` run (the name does not start with ``test_``):
tests/test_fuzz.py runs this module in a child interpreter, so that a segfault, an abort or a
hang in a kernel becomes a test failure instead of a dead CI run. Run it directly with

    python -m pytest tests/fuzz_cases.py -q                      # the default example counts
    FASTCNN_FUZZ_EXAMPLES=500 python -m pytest tests/fuzz_cases.py -q   # longer
    python -m pytest -p fuzz_boundscheck tests/fuzz_cases.py -q  # kernels with bounds checks

Every case draws valid and invalid arguments (wrong rank, channel count, sizes, kernel larger
than the padded input, zero/negative/huge sizes, strides, paddings, empty batches, integer,
bool, float16 and complex dtypes, Fortran-ordered, strided, reversed, byte-swapped and read-only
arrays, Python lists, NaN and inf) and an *oracle* decides independently of the code under
test what must happen:

- valid: the result equals the naive reference (tests/naive/) or a float64 recomputation
  (float64 <= 1e-10, float32 <= 1e-4 relative to max(|expected|, 1); NaN and inf at the same
  places), and the inputs are left unchanged;
- invalid: ValueError or TypeError (the one the oracle predicts when there is a single
  problem) whose message names the class (``"Conv2D: ..."``); nothing else (IndexError,
  numpy's own broadcasting errors, a wrong answer) is accepted.

Each example is counted; with ``FASTCNN_FUZZ_REPORT=<file>`` the counts are written there as
JSON at the end of the module (tests/test_fuzz.py reads and reports them).

The cases live in tests/fuzzing/, one module per area (common.py holds the counter, the array
strategies and the oracles); this module gathers them into one run, so that one report covers
them all and ``-k`` selects them by name as before.
"""

from fuzzing.boundscheck import test_boundscheck_is_active
from fuzzing.checkpoint import test_checkpoint_corruption
from fuzzing.cli import test_cli
from fuzzing.common import _report_counts  # the autouse fixture that writes the report
from fuzzing.containers import test_load_state_dict, test_sequential
from fuzzing.conv import (
    test_conv2d,
    test_conv2d_first_layer_evaluation,
    test_conv2d_strided_gradients,
    test_conv2d_winograd,
    test_pool2d,
)
from fuzzing.datasets import test_idx_files, test_load_dataset_folder
from fuzzing.layers import (
    test_activations,
    test_batchnorm,
    test_dense,
    test_dropout,
    test_flatten,
)
from fuzzing.losses import test_cross_entropy, test_mse
from fuzzing.optim import test_optimizer, test_scheduler
from fuzzing.threads import test_forked_children, test_predict_from_two_threads
from fuzzing.training import test_fit

__all__ = [
    "_report_counts",
    "test_conv2d",
    "test_conv2d_winograd",
    "test_conv2d_strided_gradients",
    "test_conv2d_first_layer_evaluation",
    "test_pool2d",
    "test_batchnorm",
    "test_dense",
    "test_activations",
    "test_flatten",
    "test_dropout",
    "test_sequential",
    "test_load_state_dict",
    "test_cross_entropy",
    "test_mse",
    "test_optimizer",
    "test_scheduler",
    "test_idx_files",
    "test_load_dataset_folder",
    "test_cli",
    "test_checkpoint_corruption",
    "test_boundscheck_is_active",
    "test_fit",
    "test_predict_from_two_threads",
    "test_forked_children",
]
