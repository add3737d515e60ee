"""Type aliases of the public API's annotations."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

#: A NumPy array of any dtype (the API takes float32 or float64 activations, integer labels).
Array = npt.NDArray[Any]
#: A shape, batch dimension included: (N, C, H, W) for images.
Shape = tuple[int, ...]
#: A module's ``get_config()``: JSON-able constructor arguments plus its registered "class".
Config = dict[str, Any]
#: What seeds a layer's initialisation: a Generator, a seed, or None for fresh entropy.
Rng = np.random.Generator | int | None
#: A size per spatial axis: one int for both, or (height, width).
Size2 = int | tuple[int, int] | list[int]
#: A convolution's or pooling's padding: a size, or "same" / "valid" (Conv2D).
Padding = int | tuple[int, int] | list[int] | str
