"""Ready-made networks."""
import numpy as np

from .layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from .containers import Sequential

__all__ = ["reference"]


def reference(seed=0, dtype=np.float32):
    """The reference MNIST network (225,034 parameters), for (N, 1, 28, 28) inputs:
    Conv2D(1,32,3) ReLU MaxPool2D(2) Conv2D(32,64,3) ReLU MaxPool2D(2) Flatten Dense(1600,128)
    ReLU Dense(128,10). One generator seeded with ``seed`` initialises the layers in order."""
    rng = np.random.default_rng(seed)
    return Sequential([
        Conv2D(1, 32, 3, dtype=dtype, rng=rng), ReLU(), MaxPool2D(2),
        Conv2D(32, 64, 3, dtype=dtype, rng=rng), ReLU(), MaxPool2D(2),
        Flatten(),
        Dense(1600, 128, dtype=dtype, rng=rng), ReLU(),
        Dense(128, 10, dtype=dtype, rng=rng),
    ])
