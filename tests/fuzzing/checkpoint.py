"""Checkpoints bit-flipped, truncated or replaced: refused with CheckpointError, or loaded
intact."""

import json
import os
import tempfile

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fastcnn import checkpoint as ckpt_mod
from fastcnn import layers, optim
from fastcnn.model import Sequential
from fuzzing.common import fuzz, tally

# ---------------------------------------------------------------------------------------------
# checkpoints: bit flips, truncation, garbage: refused with CheckpointError naming the file, or
# (when the change is immaterial, e.g. JSON whitespace) the same content

_CK_DIR = tempfile.mkdtemp(prefix="fastcnn-fuzz-ckpt-")


def _small_run():
    rng = np.random.default_rng(0)
    model = Sequential(
        [
            layers.Conv2D(1, 2, 3, rng=1),
            layers.BatchNorm2D(2),
            layers.ReLU(),
            layers.Flatten(),
            layers.Dropout(0.5, seed=3),
            layers.Dense(8, 3, rng=2),
        ]
    )
    opt = optim.Adam(model.parameters(), lr=0.01)
    sched = optim.StepLR(opt, 2)
    model(rng.standard_normal((2, 1, 4, 4)).astype(np.float32))
    model.backward(np.ones((2, 3), np.float32))
    opt.step()
    sched.step()
    return model, opt, sched


_MODEL, _OPT, _SCHED = _small_run()
_CK_PATH = os.path.join(_CK_DIR, "good.safetensors")
ckpt_mod.save(_CK_PATH, _MODEL, _OPT, _SCHED, epoch=7, extra={"note": "fuzz", "x": [1.5, 2]})
with open(_CK_PATH, "rb") as _f:
    _CK_BYTES = _f.read()
_CK_REF = ckpt_mod.load(_CK_PATH)


def _same_checkpoint(a, b):
    assert json.dumps(a.config, sort_keys=True) == json.dumps(b.config, sort_keys=True)
    assert a.model_state.keys() == b.model_state.keys()
    for k in a.model_state:
        assert a.model_state[k].dtype == b.model_state[k].dtype
        assert np.array_equal(a.model_state[k], b.model_state[k], equal_nan=True)
    assert a.epoch == b.epoch and a.optimizer_class == b.optimizer_class
    assert a.scheduler_class == b.scheduler_class
    canon = lambda v: json.dumps(v, sort_keys=True, default=lambda o: o.tolist())  # noqa: E731
    assert canon(a.extra) == canon(b.extra)
    assert canon(a.scheduler_state) == canon(b.scheduler_state)
    assert canon(a.optimizer_state) == canon(b.optimizer_state)
    assert canon(a.metadata["model"].get("rng_state")) == canon(
        b.metadata["model"].get("rng_state")
    )


@fuzz(1.5)
@given(data=st.data())
def test_checkpoint_corruption(data):
    d = data.draw
    rng = np.random.default_rng(d(st.integers(0, 2**32 - 1)))
    b = bytearray(_CK_BYTES)
    header_end = 8 + int.from_bytes(_CK_BYTES[:8], "little")
    how = d(
        st.sampled_from(
            [
                "flip",
                "flip",
                "flip-header",
                "flip-header",
                "byte-header",
                "truncate",
                "extend",
                "insert",
            ]
        )
    )
    if how == "flip":
        for _ in range(d(st.integers(1, 3))):
            i = int(rng.integers(0, len(b)))
            b[i] ^= 1 << int(rng.integers(0, 8))
    elif how == "flip-header":
        i = int(rng.integers(0, header_end))
        b[i] ^= 1 << int(rng.integers(0, 8))
    elif how == "byte-header":  # a printable character anywhere in the JSON header
        i = int(rng.integers(8, header_end))
        b[i] = int(rng.choice(list(b'0123456789 ,:{}[]"eE.-+ntfalsru')))
    elif how == "truncate":
        b = b[: int(rng.integers(0, len(b)))]
    elif how == "extend":
        b += rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    else:
        i = int(rng.integers(0, len(b)))
        b[i:i] = rng.integers(0, 256, int(rng.integers(1, 4)), dtype=np.uint8).tobytes()
    path = os.path.join(_CK_DIR, "fuzzed.safetensors")
    with open(path, "wb") as f:
        f.write(bytes(b))
    if bytes(b) == _CK_BYTES:
        return
    try:
        loaded = ckpt_mod.load(path)
    except ckpt_mod.CheckpointError as exc:
        assert path in str(exc)
        return tally("checkpoint.load", "invalid")
    _same_checkpoint(loaded, _CK_REF)  # accepted: then nothing that matters changed
    tally("checkpoint.load (immaterial change)", "valid")
