"""The loops: ``@njit(parallel=True, cache=True)`` kernels over arrays, and nothing else.

Installed as ``fastcnn.kernels``. Every kernel writes into arrays its caller allocates and
trusts its inputs: shapes and dtypes are checked in ``fastcnn.functional``, never here.
"""
