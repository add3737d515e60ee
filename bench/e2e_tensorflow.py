"""TensorFlow, the end-to-end benchmark's second optional peer (``bench/bench_end_to_end.py``):
the worker-side runner and what the parent needs to know about it. TensorFlow is never a
dependency: nothing imports it unless it is installed and asked for.

The network is the Keras twin of fastcnn's (``tests/keras_twin.py``: the same layers, weights and
parameter count, channels-last), trained by a ``tf.function`` step (``jit_compile=False``: TF's
graph executor with its oneDNN kernels, as a Keras user's custom loop runs) with GradientTape,
SparseCategoricalCrossentropy(from_logits=True) and SGD(lr 0.01, momentum 0.9); inference is
``model(x, training=False)`` inside a ``tf.function``. The batch is the one the other workers use,
transposed to NHWC once, outside the clock.

Threads: TensorFlow fixes its thread pools when it first runs an op, so each worker is started
for one thread count (``BENCH_TF_THREADS``: intra-op threads = that count, inter-op 1); the
benchmark starts fresh workers for every (threads, batch) anyway.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from e2e_runners import REPO, _network, input_shape, random_batch

THREADS_ENV = "BENCH_TF_THREADS"


def tensorflow_available():
    """True when TensorFlow is importable (checked without importing it)."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def tensorflow_version():
    """The installed TensorFlow distribution and version ("tensorflow-cpu 2.21.0"), or None."""
    from importlib import metadata

    for dist in ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tf-nightly"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


class TensorflowRunner:
    name = "tensorflow"

    def __init__(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.threads = int(os.environ.get(THREADS_ENV, "1"))
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(self.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import keras

        sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
        import fastcnn
        from keras_twin import twin

        self.tf, self.keras = tf, keras
        self.input_shape = input_shape()
        self.model = twin(_network(fastcnn), keras, self.input_shape)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.opt = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
        model, loss_fn, opt = self.model, self.loss_fn, self.opt

        @tf.function(jit_compile=False)
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            variables = model.trainable_variables
            opt.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
            return loss

        @tf.function(jit_compile=False)
        def infer_step(x):
            return model(x, training=False)

        self.train_step, self.infer_step = train_step, infer_step
        self.data = {}

    def batch(self, b):
        if b not in self.data:
            import numpy as np

            x, y = random_batch(b, self.input_shape)
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # NHWC, Keras's CPU layout
            self.data[b] = (self.tf.constant(x), self.tf.constant(y))
        return self.data[b]

    def block(self, mode, batch, threads, steps):
        import time as _t

        if threads != self.threads:
            raise ValueError(
                f"the TensorFlow worker runs {self.threads} thread(s) ({THREADS_ENV}); "
                f"asked for {threads}: start a worker per thread count"
            )
        x, y = self.batch(batch)
        loss = float("nan")
        if mode == "train":
            t0 = _t.perf_counter()
            for _ in range(steps):
                out = self.train_step(x, y)
            loss = float(out.numpy())  # the last step done, inside the clock
            seconds = _t.perf_counter() - t0
        else:
            t0 = _t.perf_counter()
            for _ in range(steps):
                out = self.infer_step(x)
            out.numpy()
            seconds = _t.perf_counter() - t0
        return seconds, loss

    def info(self):
        tf = self.tf
        onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset: on, x86 builds")
        return {
            "tensorflow_version": tf.__version__,
            "keras_version": self.keras.__version__,
            "tensorflow_threads": (
                f"intra-op {tf.config.threading.get_intra_op_parallelism_threads()}, "
                f"inter-op {tf.config.threading.get_inter_op_parallelism_threads()}"
            ),
            "tensorflow_build": f"oneDNN (TF_ENABLE_ONEDNN_OPTS {onednn})",
        }
