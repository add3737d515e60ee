"""fastcnn.checkpoint: atomic writes, the safetensors container, validation, and real round
trips."""

import json
import os
import stat

import numpy as np
import pytest
import safetensors.numpy as st

from fastcnn import checkpoint, layers, models, optim
from fastcnn import model as model_mod
from fastcnn.checkpoint import CheckpointError

# ---------------------------------------------------------------------------------------------
# A stand-in model with the contract's interface, to test the container without the framework.


class _P:
    def __init__(self, data):
        self.data = data


class StubModel:
    """Linear stub: config {"class": "Stub", "sizes": [in, out]} -> weight (out, in) f32, bias
    f64."""

    def __init__(self, sizes, seed=0):
        rng = np.random.default_rng(seed)
        n_in, n_out = sizes
        self.sizes = list(sizes)
        self.state = {
            "0.weight": rng.standard_normal((n_out, n_in)).astype(np.float32),
            "0.bias": rng.standard_normal(n_out),
            "1.running_mean": rng.standard_normal(n_out).astype(np.float32),
        }

    def get_config(self):
        return {"class": "Stub", "sizes": self.sizes}

    def state_dict(self):
        return {k: v.copy() for k, v in self.state.items()}

    def load_state_dict(self, state):
        for k, v in state.items():  # (the real Sequential validates first; the stub trusts load())
            np.copyto(self.state[k], v)

    def parameters(self):
        return [_P(self.state["0.weight"]), _P(self.state["0.bias"])]


class StubOptimizer:
    def __init__(self, state=None):
        self.loaded = None
        self.sd = state

    def state_dict(self):
        return self.sd

    def load_state_dict(self, sd):
        self.loaded = sd


class StubScheduler:
    def __init__(self):
        self.loaded = None

    def state_dict(self):
        return {"last_epoch": 4, "base_lr": 0.1}

    def load_state_dict(self, state):
        self.loaded = state


@pytest.fixture
def stub(monkeypatch):
    def from_config(config):
        if config.get("class") != "Stub":
            raise ValueError(f"unknown class {config.get('class')!r}")
        return StubModel(config["sizes"], seed=99)

    monkeypatch.setattr(checkpoint, "_from_config", from_config)
    monkeypatch.setattr(checkpoint, "_state_spec", lambda config: None)  # a stub: build it to know
    return StubModel([5, 3])


def _stub_optimizer(rng):
    return StubOptimizer(
        {
            "hyper": {"class": "StubOptimizer", "lr": 0.01, "betas": (0.9, 0.999)},
            "state": {
                "0": {"exp_avg": rng.standard_normal((3, 5)).astype(np.float32), "step": 7},
                "1": {"exp_avg": rng.standard_normal(3), "step": np.int64(7)},
            },
        }
    )


def _files(folder):
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------------
# Container: round trip, format, atomic write


def test_round_trip_stub(stub, tmp_path, rng):
    path = tmp_path / "ckpt.safetensors"
    bitgen_state = np.random.default_rng(5).bit_generator.state  # holds 128-bit Python ints
    extra = {
        "rng": bitgen_state,
        "best": np.float32(0.25),
        "history": [1.5, float("nan")],
        "n": None,
    }
    opt = _stub_optimizer(rng)
    assert checkpoint.save(path, stub, opt, StubScheduler(), epoch=np.int64(3), extra=extra) == str(
        path
    )
    assert _files(tmp_path) == ["ckpt.safetensors"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask

    ckpt = checkpoint.load(path)
    assert ckpt.path == str(path) and ckpt.epoch == 3 and isinstance(ckpt.epoch, int)
    for key, value in stub.state_dict().items():
        got = ckpt.model.state[key]
        assert got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_array_equal(got, value)  # bitwise: seed 99 gave different initial weights
    assert ckpt.config == stub.get_config()
    assert ckpt.extra["rng"] == bitgen_state
    assert ckpt.extra["best"] == 0.25 and ckpt.extra["n"] is None
    assert ckpt.extra["history"][0] == 1.5 and np.isnan(ckpt.extra["history"][1])
    assert ckpt.metadata["format_version"] == checkpoint.FORMAT_VERSION
    assert ckpt.metadata["fastcnn_version"] == __import__("fastcnn").__version__
    assert ckpt.scheduler_state == {"last_epoch": 4, "base_lr": 0.1}

    restored = StubOptimizer()
    ckpt.restore_optimizer(restored)
    sd = opt.state_dict()
    assert restored.loaded["hyper"] == {"class": "StubOptimizer", "lr": 0.01, "betas": [0.9, 0.999]}
    assert set(restored.loaded["state"]) == {"0", "1"}
    for i in ("0", "1"):
        assert restored.loaded["state"][i]["step"] == 7
        np.testing.assert_array_equal(
            restored.loaded["state"][i]["exp_avg"], sd["state"][i]["exp_avg"]
        )
        assert restored.loaded["state"][i]["exp_avg"].dtype == sd["state"][i]["exp_avg"].dtype
    sched = StubScheduler()
    ckpt.restore_scheduler(sched)
    assert sched.loaded == {"last_epoch": 4, "base_lr": 0.1}


def test_file_is_plain_safetensors(stub, tmp_path, rng):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, stub, _stub_optimizer(rng), epoch=1)
    data = path.read_bytes()
    tensors = st.load(data)
    assert sorted(tensors) == [
        "model.0.bias",
        "model.0.weight",
        "model.1.running_mean",
        "optimizer.0.exp_avg",
        "optimizer.1.exp_avg",
    ]
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header["__metadata__"]["fastcnn"])
    assert meta["format"] == "fastcnn-checkpoint" and meta["epoch"] == 1
    assert meta["model"]["config"] == {"class": "Stub", "sizes": [5, 3]}
    assert meta["optimizer"]["state"] == {"0": {"step": 7}, "1": {"step": 7}}
    assert meta["scheduler"] is None and meta["extra"] is None


def test_save_without_optimizer(stub, tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, stub)
    ckpt = checkpoint.load(path)
    assert ckpt.optimizer_state is None and ckpt.scheduler_state is None and ckpt.epoch is None
    with pytest.raises(CheckpointError, match="no optimizer state"):
        ckpt.restore_optimizer(StubOptimizer())
    with pytest.raises(CheckpointError, match="no scheduler state"):
        ckpt.restore_scheduler(StubScheduler())


def test_restore_into_other_optimizer_class_refused(stub, tmp_path, rng):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, stub, _stub_optimizer(rng))

    class OtherOptimizer(StubOptimizer):
        pass

    other = OtherOptimizer()
    with pytest.raises(
        CheckpointError, match="holds StubOptimizer state, cannot restore a OtherOptimizer"
    ):
        checkpoint.load(path).restore_optimizer(other)
    assert other.loaded is None


def test_overwrite_replaces_file(stub, tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, stub, epoch=1)
    checkpoint.save(path, stub, epoch=2)
    assert checkpoint.load(path).epoch == 2
    assert _files(tmp_path) == ["c.safetensors"]


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_failed_save_leaves_existing_checkpoint_untouched(stub, tmp_path, monkeypatch, where):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, stub, epoch=1)
    before = path.read_bytes()

    def half_write(f, data):
        f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    def fail(*args):
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        if where == "write":
            m.setattr(checkpoint, "_write", half_write)
        elif where == "fsync":
            m.setattr(checkpoint.os, "fsync", fail)
        else:
            m.setattr(checkpoint.os, "replace", fail)
        with pytest.raises(OSError):
            checkpoint.save(path, stub, epoch=2)
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["c.safetensors"]  # temporary file removed
    assert checkpoint.load(path).epoch == 1


def test_interrupted_save_removes_temp_file(stub, tmp_path, monkeypatch):
    def interrupted(f, data):
        f.write(data[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "c.safetensors", stub)
    assert _files(tmp_path) == []


def test_unserialisable_values_refused_before_writing(stub, tmp_path):
    path = tmp_path / "c.safetensors"
    with pytest.raises(TypeError, match="not JSON-able"):
        checkpoint.save(path, stub, extra={"f": object()})
    with pytest.raises(TypeError, match="epoch must be an int"):
        checkpoint.save(path, stub, epoch=1.5)
    assert _files(tmp_path) == []


def test_missing_folder(stub, tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoint.save(tmp_path / "nope" / "c.safetensors", stub)
    assert _files(tmp_path) == []
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        checkpoint.load(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------------------------
# Refusing truncated, corrupted and incompatible files


def _rewrite(path, mutate_meta=None, mutate_tensors=None):
    """Re-serialise `path` after changing its metadata and/or tensors (checksum NOT recomputed)."""
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header["__metadata__"]["fastcnn"])
    tensors = st.load(data)
    if mutate_meta:
        mutate_meta(meta)
    if mutate_tensors:
        mutate_tensors(tensors)
    path.write_bytes(st.save(tensors, metadata={"fastcnn": json.dumps(meta)}))


@pytest.fixture
def saved(stub, tmp_path, rng):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, stub, _stub_optimizer(rng), epoch=1)
    return path


@pytest.mark.parametrize("cut", [0, 5, 8, 60, "header", "half", -1])
def test_truncated_file_refused(saved, cut):
    data = saved.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    n = {"header": header_end, "half": len(data) // 2}.get(cut, cut)
    n = len(data) + n if n < 0 else n
    saved.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(saved)
    assert isinstance(info.value, ValueError) and str(saved) in str(info.value)
    assert "truncated" in str(info.value) or "too short" in str(info.value)


def test_flipped_data_byte_refused(saved):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0x10
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch: the file is corrupted"):
        checkpoint.load(saved)


def test_corrupted_header_refused(saved):
    data = bytearray(saved.read_bytes())
    data[8] = ord("[")  # the JSON header no longer parses as an object
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted safetensors header") as info:
        checkpoint.load(saved)
    assert str(saved) in str(info.value)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    path.write_bytes(st.save({"w": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match="not a fastcnn checkpoint"):
        checkpoint.load(path)
    path.write_bytes(b"PK\x03\x04 a zip file, or anything else, of some length")
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        checkpoint.load(path)


def test_newer_format_refused(saved):
    _rewrite(saved, mutate_meta=lambda m: m.update(format_version=checkpoint.FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match="upgrade fastcnn"):
        checkpoint.load(saved)


def test_tensor_swapped_refused(saved):
    def swap(t):
        t["model.0.weight"] = t["model.0.weight"] + np.float32(1)

    _rewrite(saved, mutate_tensors=swap)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load(saved)


def test_tensor_missing_refused(saved):
    _rewrite(saved, mutate_tensors=lambda t: t.pop("model.0.bias"))
    with pytest.raises(
        CheckpointError, match=r"do not match the manifest \(missing \['model.0.bias'\]"
    ):
        checkpoint.load(saved)


def test_tensor_dtype_changed_refused(saved):
    _rewrite(
        saved,
        mutate_tensors=lambda t: t.update({"model.0.bias": t["model.0.bias"].astype(np.float32)}),
    )
    with pytest.raises(CheckpointError, match="'model.0.bias' is <f4 \\[3\\], the manifest says"):
        checkpoint.load(saved)


def test_shapes_not_fitting_the_architecture_refused(stub, tmp_path, monkeypatch):
    """A self-consistent file whose weights do not fit the architecture in its config."""
    path = tmp_path / "c.safetensors"
    stub.state["0.weight"] = np.zeros((3, 4), np.float32)  # config says (3, 5)
    checkpoint.save(path, stub)
    built = []
    real_from_config = checkpoint._from_config
    monkeypatch.setattr(
        checkpoint, "_from_config", lambda c: built.append(real_from_config(c)) or built[-1]
    )
    with pytest.raises(
        CheckpointError,
        match=r"'model.0.weight' is float32 \(3, 4\), the architecture "
        r"expects float32 \(3, 5\)",
    ):
        checkpoint.load(path)
    assert (
        built[0].state["0.bias"].sum() == StubModel([5, 3], seed=99).state["0.bias"].sum()
    )  # untouched


def test_unknown_architecture_refused(stub, tmp_path):
    path = tmp_path / "c.safetensors"
    stub.get_config = lambda: {"class": "Transformer"}
    checkpoint.save(path, stub)
    with pytest.raises(CheckpointError, match="incompatible architecture config.*Transformer"):
        checkpoint.load(path)


def test_optimizer_state_shape_checked(stub, tmp_path, rng):
    path = tmp_path / "c.safetensors"
    opt = _stub_optimizer(rng)
    opt.sd["state"]["1"]["exp_avg"] = np.zeros(4)  # parameter 1 (bias) has shape (3,)
    checkpoint.save(path, stub, opt)
    with pytest.raises(CheckpointError, match=r"'optimizer.1.exp_avg' has shape \(4,\)"):
        checkpoint.load(path)


# ---------------------------------------------------------------------------------------------
# The real model, optimizer and scheduler


def _fake_gradients(model, seed):
    g = np.random.default_rng(seed)
    for p in model.parameters():
        p.grad[...] = g.standard_normal(p.shape).astype(p.dtype)


def _train_steps(model, opt, seeds):
    for s in seeds:
        opt.zero_grad()
        _fake_gradients(model, s)
        opt.step()


@pytest.mark.parametrize("which", ["sgd", "adam"])
def test_reference_model_round_trip_and_resume(tmp_path, which):
    model = models.reference(seed=0)
    if which == "sgd":

        def make(params):
            return optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)

        make_sched = lambda o: optim.StepLR(o, step_size=2, gamma=0.5)  # noqa: E731
    else:
        make = lambda params: optim.Adam(params, lr=1e-3, betas=(0.8, 0.99))  # noqa: E731
        make_sched = lambda o: optim.CosineAnnealingLR(o, T_max=10, eta_min=1e-5)  # noqa: E731
    opt = make(model.parameters())
    sched = make_sched(opt)
    _train_steps(model, opt, [1, 2, 3])
    sched.step()
    sched.step()
    shuffle = np.random.default_rng(42)
    shuffle.permutation(100)
    path = tmp_path / "run" / "epoch2.safetensors"
    path.parent.mkdir()
    checkpoint.save(
        path, model, opt, sched, epoch=2, extra={"shuffle": shuffle.bit_generator.state}
    )
    copies = (
        2 if which == "sgd" else 3
    )  # weights + one momentum buffer, or + exp_avg and exp_avg_sq
    assert copies * 225034 * 4 < os.path.getsize(path) < copies * 225034 * 4 + 20000

    ckpt = checkpoint.load(path)
    assert isinstance(ckpt.model, model_mod.Sequential)
    assert ckpt.model.get_config() == model.get_config()
    saved_state = model.state_dict()
    loaded_state = ckpt.model.state_dict()
    assert list(loaded_state) == list(saved_state)
    for k in saved_state:
        assert loaded_state[k].dtype == saved_state[k].dtype == np.float32
        np.testing.assert_array_equal(loaded_state[k], saved_state[k])
    assert ckpt.epoch == 2

    opt2 = make(ckpt.model.parameters())
    sched2 = make_sched(opt2)
    ckpt.restore_optimizer(opt2)
    ckpt.restore_scheduler(sched2)
    assert sched2.get_last_lr() == sched.get_last_lr() and opt2.lr == opt.lr
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["hyper"] == sd2["hyper"]
    assert sd["state"].keys() == sd2["state"].keys() and len(sd["state"]) == 8
    for i, entry in sd["state"].items():
        assert entry["step"] == sd2["state"][i]["step"] == 3
        for name, value in entry.items():
            if name != "step":
                np.testing.assert_array_equal(sd2["state"][i][name], value)
    shuffle2 = np.random.default_rng(0)
    shuffle2.bit_generator.state = ckpt.extra["shuffle"]
    np.testing.assert_array_equal(shuffle2.permutation(100), shuffle.permutation(100))

    # resuming gives bitwise the same run as never having stopped
    for o, s, m in ((opt, sched, model), (opt2, sched2, ckpt.model)):
        _train_steps(m, o, [4, 5])
        s.step()
    assert opt.lr == opt2.lr
    for (name, p), (name2, p2) in zip(
        model.named_parameters(), ckpt.model.named_parameters(), strict=True
    ):
        assert name == name2
        np.testing.assert_array_equal(p.data, p2.data)


def test_restore_model_with_other_architecture_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, models.reference(seed=0))
    ckpt = checkpoint.load(path)
    other = model_mod.Sequential(
        [
            layers.Conv2D(1, 16, 3, rng=np.random.default_rng(1)),
            layers.ReLU(),
            layers.MaxPool2D(2),
            layers.Flatten(),
            layers.Dense(16 * 13 * 13, 10, rng=np.random.default_rng(2)),
        ]
    )
    before = {k: v.copy() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"architecture differs.*config\['layers'\]"):
        ckpt.restore_model(other)
    # the model's own validation refuses a mismatching state dict without half-loading either
    with pytest.raises(ValueError):
        other.load_state_dict(ckpt.model_state)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, before[k])

    same = models.reference(seed=7)
    ckpt.restore_model(same)
    for k, v in same.state_dict().items():
        np.testing.assert_array_equal(v, ckpt.model_state[k])


def test_batchnorm_buffers_and_dropout_rng_round_trip(tmp_path):
    model = model_mod.Sequential(
        [
            layers.Conv2D(1, 4, 3, rng=np.random.default_rng(0)),
            layers.BatchNorm2D(4),
            layers.ReLU(),
            layers.Flatten(),
            layers.Dropout(0.3),
            layers.Dense(4 * 6 * 6, 3, rng=np.random.default_rng(1)),
        ]
    )
    bn = model.layers[1]
    bn.running_mean[...] = np.arange(4, dtype=np.float32)
    bn.running_var[...] = np.arange(1, 5, dtype=np.float32)
    model.layers[4]._rng.random(17)  # advance the dropout generator
    path = tmp_path / "bn.safetensors"
    checkpoint.save(path, model, epoch=0)
    ckpt = checkpoint.load(path)
    state = ckpt.model.state_dict()
    np.testing.assert_array_equal(state["1.running_mean"], np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(state["1.running_var"], np.arange(1, 5, dtype=np.float32))
    assert ckpt.model.get_rng_state() == model.get_rng_state()
    np.testing.assert_array_equal(
        ckpt.model.layers[4]._rng.random(5), model.layers[4]._rng.random(5)
    )


BOMB_CHILD = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1536 * 2**20,) * 2)  # a regression fails, not the machine
from fastcnn import checkpoint
try:
    checkpoint.load(sys.argv[1])
    print("LOADED")
except checkpoint.CheckpointError as exc:
    print("REFUSED", exc)
# VmHWM: this process's own peak (ru_maxrss would carry over the forking parent's, a big pytest)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print("PEAK_MIB", int(hwm.split()[1]) // 1024)
"""


@pytest.mark.parametrize(
    "declared, keys",
    [
        # three Dense(10000, 10000) (1.2 GB of float32) declared, two tiny tensors in the file
        (
            [{"class": "Dense", "in_features": 10000, "out_features": 10000}] * 3,
            ["0.weight", "0.bias"],
        ),
        # the right names, one huge shape; and the huge layer nested in a residual block
        ([{"class": "Dense", "in_features": 10000, "out_features": 30000}], ["0.weight", "0.bias"]),
        (
            [
                {
                    "class": "Residual",
                    "body": {
                        "class": "Conv2D",
                        "in_channels": 4096,
                        "out_channels": 4096,
                        "kernel_size": 9,
                    },
                    "shortcut": None,
                }
            ],
            ["0.body.weight", "0.body.bias"],
        ),
    ],
)
def test_a_small_file_declaring_huge_layers_is_refused_before_allocating(tmp_path, declared, keys):
    """The architecture's shapes are worked out from the config and compared with the tensors
    before any layer is built: refused with a CheckpointError, peak RSS far below what the
    config declares (checked in a child process under an address-space limit)."""
    import json
    import subprocess
    import sys

    import safetensors.numpy as st

    tensors = {
        "model." + k: np.zeros((2, 2) if k.endswith("weight") else (2,), np.float32) for k in keys
    }
    meta = {
        "format": checkpoint.FORMAT_NAME,
        "format_version": 2,
        "fastcnn_version": "0.1.0",
        "model": {
            "config": {"class": "Sequential", "layers": declared},
            "keys": keys,
            "rng_state": {},
        },
        "tensors": {k: {"dtype": v.dtype.str, "shape": list(v.shape)} for k, v in tensors.items()},
        "sha256": checkpoint._digest(tensors),
        "optimizer": None,
        "scheduler": None,
        "epoch": None,
        "extra": None,
    }
    meta["meta_sha256"] = checkpoint._meta_digest(meta)  # anyone can recompute the checksums
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(st.save(tensors, metadata={checkpoint._META_KEY: json.dumps(meta)}))
    assert path.stat().st_size < 2000
    out = subprocess.run(
        [sys.executable, "-c", BOMB_CHILD, str(path)], capture_output=True, text=True, timeout=300
    )
    assert "REFUSED" in out.stdout and "architecture" in out.stdout, out.stdout + out.stderr[-2000:]
    peak = int(out.stdout.split("PEAK_MIB")[1])
    assert peak < 500, peak
