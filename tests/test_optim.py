"""fastcnn.optim against hand-written PyTorch formulas, against torch.optim when installed, and
state_dict round trips."""

import copy
import json
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastcnn.optim import SGD, Adam, AdamW, CosineAnnealingLR, StepLR
from gradcheck import relative_error

SHAPES = [(3, 4), (5,), (2, 1, 3, 3)]


class Param:
    """Stand-in for fastcnn.layers.Parameter: ``.data`` and ``.grad``."""

    def __init__(self, data):
        self.data = np.array(data)
        self.grad = np.zeros_like(self.data)


def make_params(seed, dtype=np.float64, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [Param(rng.standard_normal(s).astype(dtype)) for s in shapes]


def gradient(data, step, k):
    """The gradient of parameter k at a step: random, deterministic, of data's shape and dtype.
    (It does not depend on the values of data: a float32 run then follows the float64 reference
    without chaotic amplification of rounding; weight decay brings in the parameter itself.)"""
    rng = np.random.default_rng(1000 * step + k)
    return rng.standard_normal(data.shape).astype(data.dtype)


def set_grads(params, step):
    for k, p in enumerate(params):
        p.grad[...] = gradient(p.data, step, k)


# ---- PyTorch's update rules written out plainly (float64, new arrays, one line per formula) ----


def ref_sgd(datas, steps, lr, momentum=0, dampening=0, nesterov=False, weight_decay=0):
    datas = [d.astype(np.float64) for d in datas]
    bufs = [None] * len(datas)
    for t in range(steps):
        for k, p in enumerate(datas):
            g = gradient(p, t, k)
            if weight_decay:
                g = g + weight_decay * p
            if momentum:
                bufs[k] = g.copy() if bufs[k] is None else momentum * bufs[k] + (1 - dampening) * g
                g = g + momentum * bufs[k] if nesterov else bufs[k]
            datas[k] = p - lr * g
    return datas


def ref_adam(datas, steps, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, decoupled=False):
    datas = [d.astype(np.float64) for d in datas]
    beta1, beta2 = betas
    m = [np.zeros_like(d) for d in datas]
    v = [np.zeros_like(d) for d in datas]
    for t in range(1, steps + 1):
        for k, p in enumerate(datas):
            g = gradient(p, t - 1, k)
            if decoupled:
                p = p * (1 - lr * weight_decay)
            elif weight_decay:
                g = g + weight_decay * p
            m[k] = beta1 * m[k] + (1 - beta1) * g
            v[k] = beta2 * v[k] + (1 - beta2) * g * g
            m_hat = m[k] / (1 - beta1**t)
            v_hat = v[k] / (1 - beta2**t)
            datas[k] = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return datas


def run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        set_grads(params, t)
        opt.step()


sgd_configs = st.fixed_dictionaries(
    {
        "lr": st.sampled_from([0.01, 0.1, 0.5]),
        "momentum": st.sampled_from([0.0, 0.5, 0.9]),
        "dampening": st.sampled_from([0.0, 0.3]),
        "nesterov": st.booleans(),
        "weight_decay": st.sampled_from([0.0, 0.05]),
    }
).filter(lambda c: not c["nesterov"] or (c["momentum"] > 0 and c["dampening"] == 0))

adam_configs = st.fixed_dictionaries(
    {
        "lr": st.sampled_from([1e-3, 0.05]),
        "betas": st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]),
        "eps": st.sampled_from([1e-8, 1e-3]),
        "weight_decay": st.sampled_from([0.0, 0.1]),
    }
)


@given(sgd_configs, st.integers(0, 2**16))
def test_sgd_matches_formulas(config, seed):
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        params = make_params(seed, dtype)
        datas = [p.data for p in params]
        expected = ref_sgd([d.copy() for d in datas], 8, **config)
        run(SGD(params, **config), params, 8)
        for p, d, e in zip(params, datas, expected, strict=True):
            assert p.data is d and p.data.dtype == dtype  # in place, dtype kept
            assert relative_error(p.data, e) <= tol


@given(sgd_configs, st.integers(0, 2**16))
def test_sgd_update_kernel_matches_the_formulas(config, seed):
    """kernels/optim.py's sgd_update called directly, 8 steps, against ref_sgd in float64."""
    from fastcnn.kernels.optim import sgd_update

    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        t = np.dtype(dtype).type
        params = make_params(seed, dtype)
        expected = ref_sgd([p.data.copy() for p in params], 8, **config)
        bufs = [np.empty_like(p.data) for p in params]
        for step in range(8):
            set_grads(params, step)
            for p, buf in zip(params, bufs, strict=True):
                sgd_update(
                    p.data.reshape(-1),
                    p.grad.reshape(-1),
                    buf.reshape(-1),
                    t(config["lr"]),
                    t(config["momentum"]),
                    t(1.0 - config["dampening"]),
                    config["dampening"] != 0,
                    t(config["weight_decay"]),
                    config["nesterov"],
                    step == 0,
                )
        for p, e in zip(params, expected, strict=True):
            assert relative_error(p.data, e) <= tol


@given(sgd_configs, st.integers(0, 2**16))
def test_sgd_kernel_equals_the_numpy_sequence_bitwise(config, seed):
    """SGD's one-pass kernel (contiguous parameters) and its numpy operation sequence (taken for
    non-contiguous ones) give bitwise the same parameters and momentum buffers."""
    for dtype in (np.float64, np.float32):
        fast = make_params(seed, dtype)
        slow = make_params(seed, dtype)
        for p in slow:  # the same values, in non-contiguous arrays (Fortran order)
            p.data = np.asfortranarray(p.data)
            p.grad = np.asfortranarray(p.grad)
        assert any(not p.data.flags.c_contiguous for p in slow)
        opt_fast, opt_slow = SGD(fast, **config), SGD(slow, **config)
        run(opt_fast, fast, 8)
        run(opt_slow, slow, 8)
        for a, b in zip(fast, slow, strict=True):
            np.testing.assert_array_equal(a.data, b.data)
        for i, state in opt_fast.state.items():
            if "momentum_buffer" in state:
                np.testing.assert_array_equal(
                    state["momentum_buffer"], opt_slow.state[i]["momentum_buffer"]
                )


@pytest.mark.parametrize("cls", [Adam, AdamW])
@given(config=adam_configs, seed=st.integers(0, 2**16))
def test_adam_matches_formulas(cls, config, seed):
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        params = make_params(seed, dtype)
        datas = [p.data for p in params]
        expected = ref_adam([d.copy() for d in datas], 8, decoupled=cls is AdamW, **config)
        opt = cls(params, **config)
        run(opt, params, 8)
        for k, (p, d, e) in enumerate(zip(params, datas, expected, strict=True)):
            assert p.data is d and p.data.dtype == dtype
            assert opt.state[k]["exp_avg"].dtype == dtype
            assert relative_error(p.data, e) <= tol


def test_first_sgd_momentum_step_takes_the_gradient_undamped():
    p = Param(np.array([1.0, 2.0]))
    opt = SGD([p], lr=0.5, momentum=0.9, dampening=0.5)
    p.grad[...] = [1.0, -1.0]
    opt.step()
    np.testing.assert_array_equal(opt.state[0]["momentum_buffer"], [1.0, -1.0])
    np.testing.assert_array_equal(p.data, [0.5, 2.5])
    np.testing.assert_array_equal(p.grad, [1.0, -1.0])  # the gradient is not modified
    opt.step()
    np.testing.assert_array_equal(opt.state[0]["momentum_buffer"], [1.4, -1.4])  # 0.9 b + 0.5 g


def test_adam_first_step_is_lr_times_sign():
    # bias correction: after one step m_hat = g and v_hat = g^2, so the step is lr * g / (|g| + eps)
    p = Param(np.array([1.0, -2.0, 3.0]))
    p.grad[...] = [0.3, -5.0, 1e-3]
    Adam([p], lr=0.1, eps=0.0).step()
    np.testing.assert_allclose(p.data, [0.9, -1.9, 2.9], rtol=1e-15)


# ---- against torch.optim --------------------------------------------------------------------


def torch_run(torch, opt_cls, params, steps, lr_changes=None, **kwargs):
    tparams = [torch.nn.Parameter(torch.tensor(p.data.copy())) for p in params]
    opt = opt_cls(tparams, **kwargs)
    for t in range(steps):
        if lr_changes and t in lr_changes:
            opt.param_groups[0]["lr"] = lr_changes[t]
        for k, tp in enumerate(tparams):
            tp.grad = torch.tensor(gradient(tp.detach().numpy(), t, k))
        opt.step()
    return [tp.detach().numpy() for tp in tparams]


TORCH_CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.02, betas=(0.85, 0.99), weight_decay=0.3)),
]


@pytest.mark.parametrize("name, kwargs", TORCH_CASES)
def test_matches_torch(name, kwargs):
    torch = pytest.importorskip("torch")
    ours = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[name]
    params = make_params(3)
    lr_changes = {6: kwargs["lr"] / 3}  # a scheduler-style lr change between steps
    expected = torch_run(torch, getattr(torch.optim, name), params, 10, lr_changes, **kwargs)
    opt = ours(params, **kwargs)
    for t in range(10):
        if t in lr_changes:
            opt.lr = lr_changes[t]
        set_grads(params, t)
        opt.step()
    for p, e in zip(params, expected, strict=True):
        assert relative_error(p.data, e) <= 1e-10


@pytest.mark.parametrize(
    "ours, theirs, kwargs",
    [
        (StepLR, "StepLR", dict(step_size=3, gamma=0.5)),
        (StepLR, "StepLR", dict(step_size=1)),
        (CosineAnnealingLR, "CosineAnnealingLR", dict(T_max=7, eta_min=1e-3)),
        (CosineAnnealingLR, "CosineAnnealingLR", dict(T_max=10)),
    ],
)
def test_schedulers_match_torch(ours, theirs, kwargs):
    torch = pytest.importorskip("torch")
    tparam = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    topt = torch.optim.SGD([tparam], lr=0.1, momentum=0.9)
    tsched = getattr(torch.optim.lr_scheduler, theirs)(topt, **kwargs)
    params = make_params(0, shapes=[(2,)])
    opt = SGD(params, lr=0.1, momentum=0.9)
    sched = ours(opt, **kwargs)
    assert sched.get_last_lr() == tsched.get_last_lr()
    for epoch in range(25):  # past T_max: the closed form is periodic, as PyTorch's
        tparam.grad = torch.ones(2, dtype=torch.float64)
        topt.step()
        tsched.step()
        set_grads(params, epoch)
        opt.step()
        sched.step()
        (expected,) = tsched.get_last_lr()
        (got,) = sched.get_last_lr()
        assert abs(got - expected) <= 1e-12 * 0.1
        assert opt.lr == got


def test_scheduler_closed_forms():
    opt = SGD(make_params(0, shapes=[(1,)]), lr=1.0)
    sched = CosineAnnealingLR(opt, T_max=4, eta_min=0.2)
    lrs = [opt.lr]
    for _ in range(8):
        sched.step()
        lrs.append(opt.lr)
    cos = [0.2 + 0.8 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(9)]
    np.testing.assert_allclose(lrs, cos, rtol=1e-15)
    assert lrs[4] == pytest.approx(0.2) and lrs[8] == pytest.approx(1.0)
    opt = SGD(make_params(0, shapes=[(1,)]), lr=1.0)
    sched = StepLR(opt, step_size=2, gamma=0.1)
    lrs = [opt.lr]
    for _ in range(5):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    np.testing.assert_allclose(lrs, [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-15)


# ---- state_dict --------------------------------------------------------------------------------

ROUND_TRIP = [
    (SGD, dict(lr=0.1)),
    (SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (SGD, dict(lr=0.1, momentum=0.8, dampening=0.1)),
    (Adam, dict(lr=0.01, weight_decay=1e-2)),
    (AdamW, dict(lr=0.01)),
]


def serialised(sd):
    """What a checkpoint does to a state dict: the JSON part through json, the arrays copied."""
    hyper = json.loads(json.dumps(sd["hyper"]))
    state = {}
    for key, entry in sd["state"].items():
        state[key] = {
            name: (np.array(v) if isinstance(v, np.ndarray) else v) for name, v in entry.items()
        }
        json.dumps(state[key]["step"])
    return {"hyper": hyper, "state": state}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls, kwargs", ROUND_TRIP)
@pytest.mark.parametrize(
    "sched_cls, sched_kwargs",
    [(StepLR, dict(step_size=2, gamma=0.5)), (CosineAnnealingLR, dict(T_max=5))],
)
def test_state_dict_round_trip_is_bitwise(cls, kwargs, dtype, sched_cls, sched_kwargs):
    # uninterrupted: 10 steps, the scheduler stepping after each
    params = make_params(5, dtype)
    opt = cls(params, **kwargs)
    sched = sched_cls(opt, **sched_kwargs)
    for t in range(10):
        run(opt, params, 1, start=t)
        sched.step()
    # interrupted after 4 steps, resumed in fresh objects with other hyperparameters
    params_a = make_params(5, dtype)
    opt_a = cls(params_a, **kwargs)
    sched_a = sched_cls(opt_a, **sched_kwargs)
    for t in range(4):
        run(opt_a, params_a, 1, start=t)
        sched_a.step()
    opt_sd = serialised(opt_a.state_dict())
    sched_sd = json.loads(json.dumps(sched_a.state_dict()))
    params_b = [Param(p.data.copy()) for p in params_a]
    opt_b = cls(params_b, lr=0.7)
    sched_b = sched_cls(opt_b, **sched_kwargs)
    opt_b.load_state_dict(opt_sd)
    sched_b.load_state_dict(sched_sd)
    for t in range(4, 10):
        run(opt_b, params_b, 1, start=t)
        sched_b.step()
    for p, q in zip(params, params_b, strict=True):
        assert q.data.dtype == dtype
        np.testing.assert_array_equal(p.data, q.data)
    assert opt_b.lr == opt.lr and sched_b.get_last_lr() == sched.get_last_lr()
    assert opt_b.state_dict()["hyper"] == opt.state_dict()["hyper"]


def test_state_dict_contents_and_copies():
    params = make_params(1)
    opt = Adam(params, lr=0.01, betas=(0.8, 0.9))
    run(opt, params, 3)
    sd = opt.state_dict()
    assert sd["hyper"] == {
        "class": "Adam",
        "num_params": 3,
        "lr": 0.01,
        "betas": [0.8, 0.9],
        "eps": 1e-8,
        "weight_decay": 0.0,
    }
    assert sorted(sd["state"]) == ["0", "1", "2"]
    assert set(sd["state"]["1"]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"]["1"]["step"] == 3 and type(sd["state"]["1"]["step"]) is int
    saved = sd["state"]["0"]["exp_avg"].copy()
    run(opt, params, 1, start=3)  # a later step must not change a saved state dict
    np.testing.assert_array_equal(sd["state"]["0"]["exp_avg"], saved)
    sgd = SGD(make_params(1), lr=0.1)
    run(sgd, sgd.params, 2)
    assert sgd.state_dict()["state"]["2"] == {"step": 2}
    assert json.dumps(sgd.state_dict()["hyper"])


def _adam_state(shapes=SHAPES):
    params = make_params(1, shapes=shapes)
    opt = Adam(params)
    run(opt, params, 2)
    return opt.state_dict()


def _bad_state_dicts():
    sd = _adam_state()
    cases = []
    wrong_class = copy.deepcopy(sd)
    wrong_class["hyper"]["class"] = "SGD"
    cases.append((wrong_class, ValueError, "saved from Adam, got one from SGD"))
    cases.append((_adam_state(SHAPES[:2]), ValueError, "for 3 parameters, got one for 2"))
    wrong_shape = copy.deepcopy(sd)
    wrong_shape["state"]["1"]["exp_avg"] = np.zeros((6,))
    cases.append((wrong_shape, ValueError, "shape (5,), got (6,)"))
    missing = copy.deepcopy(sd)
    del missing["state"]["0"]["exp_avg_sq"]
    cases.append((missing, ValueError, "['exp_avg', 'exp_avg_sq'], got ['exp_avg']"))
    extra = copy.deepcopy(sd)
    extra["state"]["0"]["momentum_buffer"] = np.zeros((3, 4))
    cases.append((extra, ValueError, "got ['exp_avg', 'exp_avg_sq', 'momentum_buffer']"))
    bad_index = copy.deepcopy(sd)
    bad_index["state"]["3"] = bad_index["state"]["0"]
    cases.append((bad_index, ValueError, "'0' to '2', got '3'"))
    bad_step = copy.deepcopy(sd)
    bad_step["state"]["0"]["step"] = 1.5
    cases.append((bad_step, ValueError, "'step' to be an int"))
    int_buffer = copy.deepcopy(sd)
    int_buffer["state"]["2"]["exp_avg"] = np.zeros((2, 1, 3, 3), np.int64)
    cases.append((int_buffer, TypeError, "floating array, got int64"))
    bad_hyper = copy.deepcopy(sd)
    bad_hyper["hyper"]["betas"] = [0.9, 1.0]
    cases.append((bad_hyper, ValueError, "betas[1] in [0, 1), got 1.0"))
    unknown = copy.deepcopy(sd)
    unknown["hyper"]["momentum"] = 0.9
    cases.append((unknown, ValueError, "unexpected hyperparameters"))
    cases.append(({"state": {}}, ValueError, "keys 'hyper' and 'state'"))
    return cases


@pytest.mark.parametrize("case", range(len(_bad_state_dicts())))
def test_load_state_dict_validates_before_assigning(case):
    bad, error, words = _bad_state_dicts()[case]
    params = make_params(2)
    opt = Adam(params, lr=0.05)
    run(opt, params, 1)
    before = opt.state_dict()
    with pytest.raises(error) as info:
        opt.load_state_dict(bad)
    assert str(info.value).startswith("Adam: expected")
    assert words in str(info.value)
    after = opt.state_dict()  # nothing changed
    assert after["hyper"] == before["hyper"]
    for key, entry in before["state"].items():
        for name, value in entry.items():
            np.testing.assert_array_equal(after["state"][key][name], value)


def test_scheduler_load_validates():
    opt = SGD(make_params(0), lr=0.1)
    sched = StepLR(opt, step_size=3)
    with pytest.raises(ValueError, match="StepLR: expected a state dict saved from StepLR"):
        sched.load_state_dict(CosineAnnealingLR(opt, T_max=3).state_dict())
    bad = sched.state_dict()
    bad["step_size"] = 0
    with pytest.raises(ValueError, match="StepLR: expected step_size to be an int >= 1, got 0"):
        sched.load_state_dict(bad)
    assert sched.step_size == 3
    bad = sched.state_dict()
    del bad["gamma"]
    with pytest.raises(ValueError, match="StepLR: expected state dict keys"):
        sched.load_state_dict(bad)


# ---- construction, zero_grad, in-place updates ------------------------------------------------


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda ps: SGD([], lr=0.1), "SGD: expected a non-empty list of parameters"),
        (lambda ps: SGD(ps, lr=-0.1), "SGD: expected lr >= 0, got -0.1"),
        (lambda ps: SGD(ps, lr=0.1, momentum=-0.5), "SGD: expected momentum >= 0, got -0.5"),
        (lambda ps: SGD(ps, lr=0.1, weight_decay=-1), "SGD: expected weight_decay >= 0, got -1"),
        (lambda ps: SGD(ps, lr=0.1, nesterov=True), "SGD: Nesterov momentum requires momentum > 0"),
        (
            lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
            "SGD: Nesterov momentum requires momentum > 0 and dampening = 0",
        ),
        (lambda ps: SGD(ps, lr=float("nan")), "SGD: expected lr >= 0, got nan"),
        (lambda ps: SGD(ps + [ps[0]], lr=0.1), "SGD: parameter 3 appears more than once"),
        (lambda ps: Adam([], lr=0.1), "Adam: expected a non-empty list"),
        (lambda ps: Adam(ps, lr=-1e-3), "Adam: expected lr >= 0"),
        (lambda ps: Adam(ps, betas=(1.0, 0.999)), "Adam: expected betas[0] in [0, 1), got 1.0"),
        (lambda ps: Adam(ps, betas=(0.9, -0.1)), "Adam: expected betas[1] in [0, 1), got -0.1"),
        (lambda ps: Adam(ps, betas=0.9), "Adam: expected betas as a pair"),
        (lambda ps: Adam(ps, eps=-1e-8), "Adam: expected eps >= 0"),
        (lambda ps: AdamW(ps, betas=(0.9, 1.5)), "AdamW: expected betas[1] in [0, 1), got 1.5"),
        (lambda ps: AdamW(ps, weight_decay=-0.01), "AdamW: expected weight_decay >= 0"),
        (
            lambda ps: StepLR(SGD(ps, lr=0.1), step_size=0),
            "StepLR: expected step_size to be an int >= 1",
        ),
        (lambda ps: StepLR(SGD(ps, lr=0.1), step_size=2, gamma=-1), "StepLR: expected gamma >= 0"),
        (
            lambda ps: CosineAnnealingLR(SGD(ps, lr=0.1), T_max=0),
            "CosineAnnealingLR: expected T_max",
        ),
        (
            lambda ps: CosineAnnealingLR(SGD(ps, lr=0.1), T_max=5, eta_min=-1),
            "CosineAnnealingLR: expected eta_min >= 0",
        ),
    ],
)
def test_construction_validation(make, words):
    with pytest.raises(ValueError) as info:
        make(make_params(0))
    assert words in str(info.value)


def test_construction_type_errors():
    with pytest.raises(TypeError, match="SGD: expected an iterable of parameters"):
        SGD(np.zeros(3), lr=0.1)
    with pytest.raises(TypeError, match="SGD: expected parameter 0 to have .data"):
        SGD([np.zeros(3)], lr=0.1)
    with pytest.raises(TypeError, match="Adam: expected floating parameter 0, got int64"):
        Adam([Param(np.zeros(3, np.int64))])
    with pytest.raises(TypeError, match="StepLR: expected a fastcnn.optim.Optimizer"):
        StepLR(object(), step_size=1)


def test_lr_is_settable_and_checked():
    opt = SGD(make_params(0), lr=0.1)
    opt.lr = 0.05
    assert opt.lr == 0.05 and opt.state_dict()["hyper"]["lr"] == 0.05
    with pytest.raises(ValueError, match="SGD: expected lr >= 0"):
        opt.lr = -1.0
    assert opt.lr == 0.05


def test_zero_grad_and_skipped_parameters():
    params = make_params(0)
    opt = SGD(params, lr=0.1, momentum=0.9)
    set_grads(params, 0)
    grads = [p.grad for p in params]
    opt.zero_grad()
    for p, g in zip(params, grads, strict=True):
        assert p.grad is g and not np.any(p.grad)
    params[1].grad = None  # a parameter without gradient is left alone, as in PyTorch
    before = params[1].data.copy()
    set_grads([params[0], params[2]], 0)
    opt.step()
    np.testing.assert_array_equal(params[1].data, before)
    assert 1 not in opt.state and 0 in opt.state
    opt.zero_grad()  # None stays None
    assert params[1].grad is None


def test_gradient_of_wrong_shape_or_dtype():
    params = make_params(0)
    opt = SGD(params, lr=0.1)
    params[0].grad = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"SGD: expected parameter 0's gradient of shape \(3, 4\)"):
        opt.step()
    params[0].grad = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="dtype float64, got"):
        opt.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: SGD(ps, lr=0.1),
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-4),
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
        lambda ps: Adam(ps, weight_decay=1e-4),
        lambda ps: AdamW(ps),
    ],
)
def test_steps_allocate_no_parameter_sized_temporaries(make):
    # a float32 parameter of 4 MB: a single temporary (or a float64 promotion) would show up
    param = Param(np.ones(1_000_000, np.float32))
    param.grad[...] = 0.5
    opt = make([param])
    opt.step()  # first step allocates the state and the scratch arrays
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            opt.step()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert param.data.dtype == np.float32
    assert peak < param.data.nbytes // 10
