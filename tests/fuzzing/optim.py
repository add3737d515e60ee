"""The optimizers against a float64 reference of PyTorch's rules, and the schedulers."""

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fastcnn import layers, optim
from fuzzing.common import GOOD, assert_close, expect_error, f64, fuzz, tally

# ---------------------------------------------------------------------------------------------
# optimizers and schedulers, against a float64 reference of PyTorch's update rules


class _P:
    def __init__(self, data, grad):
        self.data, self.grad = data, grad


def _reference_steps(kind_, hyper, p0, grads):
    """Parameters after len(grads) steps, in float64 (torch.optim's formulas)."""
    p = [f64(a) for a in p0]
    state = [dict() for _ in p]
    for _step, gs in enumerate(grads, start=1):
        for i, g in enumerate(gs):
            if g is None:
                continue
            g = f64(g)
            s = state[i]
            lr, wd = hyper["lr"], hyper["weight_decay"]
            if kind_ == "SGD":
                g = g + wd * p[i]
                if hyper["momentum"]:
                    s["buf"] = (
                        g.copy()
                        if "buf" not in s
                        else (hyper["momentum"] * s["buf"] + (1 - hyper["dampening"]) * g)
                    )
                    g = g + hyper["momentum"] * s["buf"] if hyper["nesterov"] else s["buf"]
                p[i] = p[i] - lr * g
            else:
                b1, b2 = hyper["betas"]
                if kind_ == "AdamW":
                    p[i] = p[i] * (1 - lr * wd)
                else:
                    g = g + wd * p[i]
                s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
                s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
                s["t"] = s.get("t", 0) + 1
                denom = np.sqrt(s["v"]) / math.sqrt(1 - b2 ** s["t"]) + hyper["eps"]
                p[i] = p[i] - lr / (1 - b1 ** s["t"]) * s["m"] / denom
    return p


HYPER_BAD = (-0.1, float("nan"), float("inf"), "0.1", None, True)


@fuzz(1.5)
@given(data=st.data(), kind_=st.sampled_from(["SGD", "Adam", "AdamW"]))
def test_optimizer(data, kind_):
    d = data.draw
    cls = getattr(optim, kind_)

    def val(good):
        return d(
            st.sampled_from(good + list(HYPER_BAD))
            if d(st.integers(0, 19)) == 0
            else st.sampled_from(good)
        )

    if kind_ == "SGD":
        hyper = dict(
            lr=val([0.1, 0.01, 1.0, 0.0]),
            momentum=val([0.0, 0.9, 0.5]),
            dampening=val([0.0, 0.0, 0.1]),
            nesterov=d(st.sampled_from([False, True, 1, None])),
            weight_decay=val([0.0, 0.01]),
        )
    else:
        b = d(
            st.sampled_from(
                [(0.9, 0.999), (0.0, 0.5), (0.5, 0.0), (0.8, 0.99)] * 6
                + [(1.0, 0.9), (0.9, -0.1), (0.9,), "ab", None, (float("nan"), 0.9)]
            )
        )
        hyper = dict(
            lr=val([1e-3, 0.1, 0.0]),
            betas=b,
            eps=val([1e-8, 1e-3, 0.0]),
            weight_decay=val([0.0, 0.01, 0.1]),
        )

    def bad_number(v):
        return isinstance(v, (str, type(None), bool)) or not (math.isfinite(v) and v >= 0)

    problems = [k for k, v in hyper.items() if k not in ("betas", "nesterov") and bad_number(v)]
    if kind_ == "SGD":
        nest = hyper["nesterov"]
        if not isinstance(nest, bool):
            problems.append("nesterov")
        elif nest and not problems and not (hyper["momentum"] > 0 and hyper["dampening"] == 0):
            problems.append("nesterov")
    else:
        b = hyper["betas"]
        if not (
            isinstance(b, tuple)
            and len(b) == 2
            and all(isinstance(v, float) and 0 <= v < 1 for v in b)
        ):
            problems.append("betas")
    dtype = d(st.sampled_from(GOOD))
    shapes = d(st.lists(st.lists(st.integers(0, 3), max_size=2), min_size=1, max_size=3))
    rng = np.random.default_rng(d(st.integers(0, 99)))
    params = [layers.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]
    what = d(
        st.sampled_from(
            ["ok"] * 24 + ["empty", "duplicate", "ndarray", "int", "readonly", "object"]
        )
    )
    plist = list(params)
    if what == "empty":
        plist, problems = [], problems + ["params"]
    elif what == "duplicate":
        plist, problems = plist + plist[:1], problems + ["params"]
    elif what == "ndarray":
        plist, problems = params[0].data, problems + ["params"]
    elif what == "int":
        plist, problems = plist + [_P(np.arange(3), np.zeros(3, np.int64))], problems + ["params"]
    elif what == "readonly":
        ro = np.ones(3, dtype)
        ro.flags.writeable = False
        plist, problems = plist + [_P(ro, np.zeros(3, dtype))], problems + ["params"]
    elif what == "object":
        plist, problems = plist + ["weight"], problems + ["params"]
    if problems:
        expect_error(lambda: cls(plist, **hyper), (ValueError, TypeError), kind_)
        return tally(f"{kind_}.__init__", "invalid")
    opt = cls(plist, **hyper)
    tally(f"{kind_}.__init__", "valid")
    p0 = [p.data.copy() for p in params]
    steps = d(st.integers(1, 3))
    grads = []
    for _ in range(steps):
        gs = []
        for p in params:
            if d(st.integers(0, 9)) == 0:
                g = None
            else:
                g = rng.standard_normal(p.shape).astype(dtype)
                if g.size and d(st.integers(0, 9)) == 0:
                    g.reshape(-1)[0] = np.nan
            gs.append(g)
        grads.append(gs)
    bad_grad = d(st.sampled_from([None] * 10 + ["shape", "dtype", "list"]))
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = None if g is None else g.copy()
        if bad_grad is not None:
            p = params[0]
            p.grad = {
                "shape": np.zeros(p.shape + (2,), dtype),
                "list": [0.0] * max(1, p.size),
                "dtype": np.zeros(p.shape, np.float16),
            }[bad_grad]
            before = [q.data.copy() for q in params]
            expect_error(opt.step, (ValueError, TypeError), kind_)
            # (parameters before the bad one may have been updated: the check is per parameter)
            assert all(
                np.array_equal(q.data, b, equal_nan=True)
                for q, b in zip(params[:1], before[:1], strict=True)
            )
            return tally(f"{kind_}.step", "invalid")
        opt.step()
    ref = _reference_steps(
        kind_,
        {k: (float(v) if not isinstance(v, (tuple, bool)) else v) for k, v in hyper.items()},
        p0,
        grads,
    )
    with np.errstate(all="ignore"):
        for p, r in zip(params, ref, strict=True):
            assert_close(p.data, r, dtype, f"{kind_} parameter")
    tally(f"{kind_}.step", "valid")
    # state_dict round trip into a fresh optimizer continues identically
    clone_params = [layers.Parameter(p.data) for p in params]
    clone = cls(clone_params, **hyper)
    clone.load_state_dict(opt.state_dict())
    for p, q in zip(params, clone_params, strict=True):
        g = rng.standard_normal(p.shape).astype(dtype)
        p.grad, q.grad = g.copy(), g.copy()
    opt.step()
    clone.step()
    assert all(
        np.array_equal(p.data, q.data, equal_nan=True)
        for p, q in zip(params, clone_params, strict=True)
    )
    tally(f"{kind_}.load_state_dict", "valid")


@fuzz(0.5)
@given(
    kind_=st.sampled_from(["StepLR", "CosineAnnealingLR"]),
    a=st.sampled_from([1, 3, 10, 0, -1, 2.5, None, True]),
    b=st.sampled_from([0.1, 0.5, 0.0, 1.0, -0.1, float("nan"), "x"]),
    steps=st.integers(0, 12),
)
def test_scheduler(kind_, a, b, steps):
    opt = optim.SGD([layers.Parameter(np.zeros(2))], lr=0.1)
    cls = getattr(optim, kind_)
    bad = (
        isinstance(a, (bool, float, type(None)))
        or a < 1
        or isinstance(b, str)
        or not (math.isfinite(b) and b >= 0)
    )
    if bad:
        expect_error(lambda: cls(opt, a, b), (ValueError, TypeError), kind_)
        return tally(f"{kind_}.__init__", "invalid")
    sched = cls(opt, a, b)
    for _ in range(steps):
        sched.step()
    expected = (
        0.1 * b ** (steps // a)
        if kind_ == "StepLR"
        else b + (0.1 - b) * (1 + math.cos(math.pi * steps / a)) / 2
    )
    assert math.isclose(
        opt.lr, max(expected, 0.0) if kind_ == "StepLR" else expected, rel_tol=1e-12, abs_tol=1e-15
    ) or (expected < 0 and opt.lr >= 0)
    tally(f"{kind_}.step", "valid")
