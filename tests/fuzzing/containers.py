"""Sequential stacks against a twin built layer by layer, and load_state_dict."""

import json

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fastcnn import layers
from fastcnn.model import Sequential, from_config
from fuzzing.common import (
    GOOD,
    HALF,
    arrays,
    expect_error,
    fuzz,
    grad_array,
    kind,
    odd_shapes,
    snapshot,
    tally,
    unchanged,
)

# ---------------------------------------------------------------------------------------------
# Sequential: forward, backward, summary, predict and load_state_dict against a twin model whose
# layers are run one by one


@st.composite
def stacks(draw):
    """(layers, input shape): a random stack that mostly fits its input, sometimes not."""
    dtype = draw(st.sampled_from(GOOD + ("float32",)))
    # 32 channels sometimes: a Conv2D -> ReLU -> MaxPool2D block's backward then takes the max
    # pool shortcut (kernels/fused.py), which needs a multiple of 32
    n, c = draw(st.integers(0, 2)), draw(st.sampled_from([1, 2, 1, 2, 32]))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    shape = [n, c, h, w]
    out = []
    for _ in range(draw(st.integers(1, 5))):
        off = draw(
            st.sampled_from([0] * 12 + [1, -1])
        )  # a channel / feature count that does not fit
        seed = draw(st.integers(0, 99))
        choice = draw(
            st.sampled_from(
                [
                    "conv",
                    "maxpool",
                    "avgpool",
                    "bn",
                    "act",
                    "dropout",
                    "flatten",
                    "dense",
                    "softmax",
                    "block",
                    "block",
                ]
            )
        )
        if len(shape) == 4 and choice == "block":
            # Conv2D -> ReLU -> MaxPool2D: the run Sequential executes as one fused kernel
            k, p, f = draw(st.integers(1, 3)), draw(st.integers(0, 1)), draw(st.integers(1, 40))
            pool = draw(st.integers(1, 3))
            out += [
                layers.Conv2D(max(1, shape[1] + off), f, k, padding=p, dtype=dtype, rng=seed),
                layers.ReLU(),
                layers.MaxPool2D(pool),
            ]
            shape = [n, f, (shape[2] + 2 * p - k + 1) // pool, (shape[3] + 2 * p - k + 1) // pool]
        elif len(shape) == 4 and choice in ("conv", "maxpool", "avgpool", "bn"):
            if choice == "conv":
                k, p, f = draw(st.integers(1, 3)), draw(st.integers(0, 1)), draw(st.integers(1, 3))
                out.append(
                    layers.Conv2D(max(1, shape[1] + off), f, k, padding=p, dtype=dtype, rng=seed)
                )
                shape = [n, f, shape[2] + 2 * p - k + 1, shape[3] + 2 * p - k + 1]
            elif choice in ("maxpool", "avgpool"):
                k = draw(st.integers(1, 2))
                cls = layers.MaxPool2D if choice == "maxpool" else layers.AvgPool2D
                out.append(cls(k))
                shape = [n, shape[1], shape[2] // k, shape[3] // k]
            else:
                out.append(layers.BatchNorm2D(max(1, shape[1] + off), dtype=dtype))
        elif choice in ("flatten", "dense", "bn") or (choice == "conv" and len(shape) == 2):
            if len(shape) == 4:
                out.append(layers.Flatten())
                shape = [n, shape[1] * shape[2] * shape[3]]
            elif choice == "bn":
                out.append(layers.BatchNorm1D(max(1, shape[1] + off), dtype=dtype))
            else:
                f = draw(st.integers(1, 4))
                out.append(layers.Dense(max(1, shape[1] + off), f, dtype=dtype, rng=seed))
                shape = [n, f]
        elif choice == "act":
            out.append(
                draw(
                    st.sampled_from([layers.ReLU, layers.Tanh, layers.Sigmoid, layers.LeakyReLU])
                )()
            )
        elif choice == "dropout":
            out.append(layers.Dropout(draw(st.sampled_from([0.0, 0.3, 0.5])), seed=seed))
        else:
            out.append(layers.Softmax(1))
    return out, (n, c, h, w)


def _run_chain(layer_list, x):
    """Forward one layer at a time: ("ok", y) or ("error", index, exception)."""
    for i, layer in enumerate(layer_list):
        try:
            x = layer.forward(x)
        except (ValueError, TypeError) as exc:
            return ("error", i, exc)
    return ("ok", x)


def _run_chain_backward(layer_list, dy):
    """Backward one layer at a time (after ``_run_chain``): ("ok", dx) or ("error", index, exc)."""
    for i, layer in reversed(list(enumerate(layer_list))):
        try:
            dy = layer.backward(dy)
        except (ValueError, TypeError) as exc:
            return ("error", i, exc)
    return ("ok", dy)


def _twin(model):
    twin = from_config(model.get_config())
    twin.load_state_dict(model.state_dict())
    twin.set_rng_state(json.loads(json.dumps(model.get_rng_state())))
    return twin.train(model.training)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k], equal_nan=True) for k in sa
    )


def _grads(model):
    return [p.grad.copy() for p in model.parameters()]


@fuzz(1.5)
@given(data=st.data(), spec=stacks(), training=st.booleans())
def test_sequential(data, spec, training):
    d = data.draw
    layer_list, shape = spec
    model = Sequential(layer_list).train(training)
    twin = _twin(model)
    if d(st.integers(0, 7)) == 0:
        shape = d(odd_shapes())
    x = d(arrays(shape, dtypes=GOOD * 6 + HALF + ("int64", "complex64")))
    snap = snapshot(x)
    expected = _run_chain(twin.layers, x)
    if expected[0] == "error":
        _, i, exc = expected
        name = type(layer_list[i]).__name__
        got = expect_error(lambda: model(x), type(exc), name)
        assert str(got) == str(exc)
        tally("Sequential.forward", "invalid")
        xa = np.asarray(x)
        if (
            kind(xa) == "f"
            and xa.dtype.itemsize in (4, 8)
            and isinstance(exc, ValueError)
            and "more than 1 value per channel" not in str(exc)
        ):
            # summary() checks the same shapes without computing anything
            expect_error(lambda: model.summary(xa.shape, print_fn=None), ValueError, name)
            tally("Sequential.summary", "invalid")
        return
    y = model(x)
    assert unchanged(x, snap)
    assert np.array_equal(y, expected[1], equal_nan=True) and y.dtype == expected[1].dtype
    assert _same_state(model, twin)  # BatchNorm running statistics updated the same way
    tally("Sequential.forward", "valid")
    xa = np.asarray(x)
    if kind(xa) == "f" and xa.dtype.itemsize in (4, 8):
        text = model.summary(xa.shape, print_fn=None)
        assert text.rstrip().endswith(f"Output shape: {tuple(y.shape)}"), text
        tally("Sequential.summary", "valid")

    dy = grad_array(d, y.shape, dtypes=(y.dtype.name,) * 6 + ("float16", "int64"))
    expected = _run_chain_backward(twin.layers, dy)
    if expected[0] == "error":
        _, i, exc = expected
        got = expect_error(lambda: model.backward(dy), type(exc), type(layer_list[i]).__name__)
        assert str(got) == str(exc)
        tally("Sequential.backward", "invalid")
    else:
        # input_grad=False (what fit does): a first Conv2D or Dense computes no input gradient
        # (below a max pool: the weight gradient from the pooled gradient, dy rebuilt in cache)
        input_grad = d(st.booleans())
        dx = model.backward(dy, input_grad=input_grad)
        if input_grad:
            assert np.array_equal(dx, expected[1], equal_nan=True)
            assert dx.dtype == expected[1].dtype
        else:
            assert dx is None
        for g, h in zip(_grads(model), _grads(twin), strict=True):
            assert np.array_equal(g, h, equal_nan=True)
        tally("Sequential.backward", "valid")

    # predict: eval mode, in batches, the mode restored
    bs = d(st.sampled_from([1, 2, 3, 256, 0, -1, 1.5, None]))
    if isinstance(bs, (float, type(None))):
        expect_error(lambda: model.predict(x, bs), TypeError, "Sequential.predict")
        return tally("Sequential.predict", "invalid")
    if bs < 1:
        expect_error(lambda: model.predict(x, bs), ValueError, "Sequential.predict")
        return tally("Sequential.predict", "invalid")
    twin.eval()
    xs = np.asarray(x)
    if xs.ndim < 1:
        expect_error(lambda: model.predict(x, bs), ValueError, "Sequential.predict")
        return tally("Sequential.predict", "invalid")
    chunks = [xs] if xs.shape[0] <= bs else [xs[i : i + bs] for i in range(0, xs.shape[0], bs)]
    outs = [_run_chain(twin.layers, chunk) for chunk in chunks]
    if any(o[0] == "error" for o in outs):
        o = next(o for o in outs if o[0] == "error")
        expect_error(lambda: model.predict(x, bs), type(o[2]), type(layer_list[o[1]]).__name__)
        tally("Sequential.predict", "invalid")
    else:
        p = model.predict(x, bs)
        e = outs[0][1] if len(outs) == 1 else np.concatenate([o[1] for o in outs])
        assert np.array_equal(p, e, equal_nan=True)
        tally("Sequential.predict", "valid")
    assert model.training == training and all(la.training == training for la in model.layers)


@fuzz(1.0)
@given(data=st.data(), spec=stacks(), strict=st.booleans())
def test_load_state_dict(data, spec, strict):
    d = data.draw
    model = Sequential(spec[0])
    before = model.state_dict()
    state = {k: v + 1 for k, v in before.items()}  # new values of the right shapes and dtypes
    how = d(
        st.sampled_from(
            ["ok", "ok", "drop", "add", "shape", "dtype", "list", "scalar", "not a dict", "nan"]
        )
    )
    keys = sorted(state)
    key = d(st.sampled_from(keys)) if keys else None
    problem = None
    if how == "drop" and key:
        del state[key]
        problem = ValueError if strict else None
    elif how == "add":
        state["99.weight"] = np.zeros(3, np.float32)
        problem = ValueError if strict else None
    elif how == "shape" and key:
        state[key] = np.zeros(state[key].shape + (1,), state[key].dtype)
        problem = ValueError
    elif how == "dtype" and key:
        state[key] = state[key].astype(np.float16)
        problem = ValueError
    elif how == "list" and key:
        state[key] = state[key].tolist()  # becomes float64 (or a float64 scalar)
        problem = (
            None
            if state
            and np.asarray(state[key]).dtype == before[key].dtype
            and np.asarray(state[key]).shape == before[key].shape
            else ValueError
        )
    elif how == "scalar" and key:
        state[key] = 1.0
        problem = (
            None if before[key].shape == () and before[key].dtype == np.float64 else ValueError
        )
    elif how == "not a dict":
        state = list(state.items())
        problem = TypeError
    elif how == "nan" and key:
        state[key] = np.full_like(state[key], np.nan)
    if problem:
        expect_error(lambda: model.load_state_dict(state, strict=strict), problem, "Sequential")
        after = model.state_dict()
        assert all(np.array_equal(after[k], before[k]) for k in before), "half-loaded"
        return tally("Sequential.load_state_dict", "invalid")
    model.load_state_dict(state, strict=strict)
    after = model.state_dict()
    for k in before:
        want = np.asarray(state[k]) if k in state else before[k]
        assert after[k].dtype == before[k].dtype
        assert np.array_equal(after[k], want.astype(before[k].dtype), equal_nan=True), k
    tally("Sequential.load_state_dict", "valid")
