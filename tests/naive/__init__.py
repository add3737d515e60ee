"""The textbook: slow, obvious loops that specify what every kernel in kernels/ must compute.

One module per operation; tests compare the kernels with these on random shapes.
"""
