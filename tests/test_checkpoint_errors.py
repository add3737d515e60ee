"""Every bad checkpoint is a CheckpointError naming the file, never a raw exception
(issue 14, item 4).

The files here have valid checksums (anyone can recompute them): deep JSON nesting, metadata of
the wrong types, edited resume fields. Also: what ``save`` accepts, ``load`` reads back.
"""

import json

import numpy as np
import pytest
import safetensors.numpy as st

from fastcnn import checkpoint, models, optim, training
from fastcnn.checkpoint import CheckpointError


def nested_list(depth):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.fixture
def saved(tmp_path):
    model = models.lenet5(seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = optim.CosineAnnealingLR(opt, T_max=3)
    for p in model.parameters():
        p.grad[...] = 0.01
    opt.step()
    sched.step()
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, model, opt, sched, epoch=1, extra={"note": "x"})
    return path


def rewrite(path, mutate, tensors_mutate=None):
    """Change the metadata (and tensors) of `path`, recomputing both checksums as an attacker
    can."""
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header["__metadata__"]["fastcnn"])
    tensors = st.load(data)
    mutate(meta)
    if tensors_mutate:
        tensors_mutate(tensors)
        meta["sha256"] = checkpoint._digest(tensors)
    meta["meta_sha256"] = checkpoint._meta_digest(meta)
    path.write_bytes(st.save(tensors, metadata={"fastcnn": json.dumps(meta)}))


def load_and_restore(path):
    """load + every restore_*: the first error must be a CheckpointError naming the file."""
    ckpt = checkpoint.load(path)
    model = models.lenet5(seed=1)
    ckpt.restore_model(model)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt.restore_optimizer(opt)
    ckpt.restore_scheduler(optim.CosineAnnealingLR(opt, T_max=3))
    return ckpt


def setter(*keys_and_value):
    *keys, value = keys_and_value

    def mutate(meta):
        target = meta
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return mutate


WRONG_TYPES = {
    "model is a list": setter("model", []),
    "config is a string": setter("model", "config", "Sequential"),
    "config is a list": setter("model", "config", [1]),
    "keys is a string": setter("model", "keys", "0.weight"),
    "keys are ints": setter("model", "keys", [0, 1]),
    "rng_state is a list": setter("model", "rng_state", [1]),
    "rng_state names no module": setter("model", "rng_state", {"3": 5}),
    "input_shape is a string": setter("model", "input_shape", "1,28,28"),
    "tensors is a list": setter("tensors", []),
    "a tensor spec is a string": setter("tensors", "model.0.weight", "F32"),
    "sha256 is a number": setter("sha256", 5),
    "optimizer is a list": setter("optimizer", []),
    "optimizer class is a number": setter("optimizer", "class", 5),
    "optimizer hyper is a list": setter("optimizer", "hyper", [0.1]),
    "optimizer state is a list": setter("optimizer", "state", [{}]),
    "optimizer state entry is a number": setter("optimizer", "state", "0", 5),
    "optimizer lr is a string": setter("optimizer", "hyper", "lr", "fast"),
    "optimizer momentum is a list": setter("optimizer", "hyper", "momentum", [0.9]),
    "optimizer step is a string": setter("optimizer", "state", "0", "step", "one"),
    "scheduler is a string": setter("scheduler", "cosine"),
    "scheduler class is a number": setter("scheduler", "class", 5),
    "scheduler state is a number": setter("scheduler", "state", 5),
    "scheduler last_epoch is a string": setter("scheduler", "state", "last_epoch", "one"),
    "scheduler T_max is a dict": setter("scheduler", "state", "T_max", {}),
    "epoch is a string": setter("epoch", "1"),
    "epoch is negative": setter("epoch", -1),
    "epoch is a float": setter("epoch", 1.5),
    "format_version is a string": setter("format_version", "2"),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_metadata_of_wrong_types_with_valid_checksums_is_a_checkpoint_error(saved, case):
    rewrite(saved, WRONG_TYPES[case])
    with pytest.raises(CheckpointError) as info:
        load_and_restore(saved)
    assert str(saved) in str(info.value)


def test_the_unchanged_file_loads_and_restores(saved):
    """The fixture itself is good: every refusal above comes from its mutation."""
    rewrite(saved, lambda meta: None)
    assert load_and_restore(saved).epoch == 1


@pytest.mark.parametrize("where", ["safetensors header", "fastcnn metadata"])
def test_json_nested_100000_deep_is_a_checkpoint_error(tmp_path, where):
    deep = "[" * 100_000 + "]" * 100_000
    if where == "safetensors header":
        raw = deep.encode()
    else:
        raw = json.dumps({"__metadata__": {"fastcnn": deep}}).encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(CheckpointError, match="nested more than 200 levels") as info:
        checkpoint.load(path)
    assert str(path) in str(info.value) and where in str(info.value)


def test_metadata_nested_990_deep_with_valid_checksums_is_a_checkpoint_error(saved):
    """(The JSON is spliced as text: Python's json cannot write it from inside pytest's stack.)"""
    data = saved.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header["__metadata__"]["fastcnn"])
    meta["extra"] = "@DEEP@"
    meta.pop("meta_sha256")
    deep = "[" * 990 + "]" * 990
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":")).replace('"@DEEP@"', deep)
    import hashlib

    meta["meta_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    text = json.dumps(meta).replace('"@DEEP@"', deep)
    saved.write_bytes(st.save(st.load(data), metadata={"fastcnn": text}))
    with pytest.raises(CheckpointError, match="nested more than 200 levels"):
        checkpoint.load(saved)


def test_save_refuses_extra_it_could_not_load(tmp_path):
    path = tmp_path / "c.safetensors"
    with pytest.raises(
        ValueError, match=r"cannot write .*c\.safetensors: extra is nested more than 199"
    ):
        checkpoint.save(path, models.lenet5(seed=0), extra=nested_list(990))
    assert not path.exists()
    with pytest.raises(ValueError, match="extra is nested"):  # a dict inside itself: no hang
        loop = {}
        loop["self"] = loop
        checkpoint.save(path, models.lenet5(seed=0), extra=loop)
    assert list(tmp_path.iterdir()) == []


def test_what_save_accepts_load_reads_back(tmp_path):
    path = tmp_path / "c.safetensors"
    for extra in (nested_list(199), [1, 2], "text", 3.5, None):
        checkpoint.save(path, models.lenet5(seed=0), extra=extra)
        assert checkpoint.load(path).extra == extra


# ---------------------------------------------------------------------------------------------
# Resume fields written by fit, edited


@pytest.fixture
def fit_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 40)
    model = models.lenet5(seed=0)
    opt = optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "fit.safetensors"
    from fastcnn.losses import CrossEntropyLoss

    training.fit(
        model,
        CrossEntropyLoss(),
        opt,
        x,
        y,
        epochs=1,
        batch_size=20,
        progress=False,
        checkpoint=str(path),
    )
    return path


RESUME_EDITS = {
    "extra is a list": setter("extra", [1, 2]),
    "fit is a string": setter("extra", "fit", "x"),
    "no shuffle_state": lambda m: m["extra"]["fit"].pop("shuffle_state"),
    "shuffle_state is a string": setter("extra", "fit", "shuffle_state", "pcg"),
    "shuffle_state of another generator": setter(
        "extra", "fit", "shuffle_state", "bit_generator", "MT"
    ),
    "shuffle_state counter is text": setter(
        "extra", "fit", "shuffle_state", "state", "state", {"int": "x"}
    ),
    "history is a list": setter("extra", "fit", "history", [1]),
    "history lists of unequal lengths": setter("extra", "fit", "history", "epoch", [1, 2]),
    "history longer than the epoch": lambda m: m["extra"]["fit"]["history"].update(
        {k: v * 2 for k, v in m["extra"]["fit"]["history"].items()}
    ),
    "seed is a string": setter("extra", "fit", "seed", "zero"),
    "no epoch": setter("epoch", None),
}


@pytest.mark.parametrize("case", sorted(RESUME_EDITS))
def test_edited_resume_fields_are_a_checkpoint_error(fit_checkpoint, case):
    rewrite(fit_checkpoint, RESUME_EDITS[case])
    ckpt = checkpoint.load(fit_checkpoint)
    with pytest.raises(CheckpointError) as info:
        training.resume_kwargs(ckpt)
    assert str(fit_checkpoint) in str(info.value)


def test_unedited_resume_fields_are_accepted(fit_checkpoint):
    rewrite(fit_checkpoint, lambda meta: None)
    kwargs = training.resume_kwargs(checkpoint.load(fit_checkpoint))
    assert kwargs["start_epoch"] == 1 and len(kwargs["history"]) == 1
