"""fastcnn: train convolutional networks fast on the CPU, with Numba kernels under a PyTorch-like API."""
import os as _os

from . import _kernels_path

_kernels_path.register(_os.path.dirname(_os.path.abspath(__file__)))

__version__ = "0.1.0"
