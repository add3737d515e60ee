"""Fuzzing the file formats (issue 14, items 3 and 4): whatever a checkpoint's metadata or
safetensors header, or an IDX file's header and size, declares, reading it either works or raises
the module's own error (CheckpointError, DatasetFileError) naming the file: never another
exception. Checksums are recomputed, as anyone can.

Example counts follow the hypothesis profile of conftest.py (HYPOTHESIS_PROFILE=thorough: 300).
"""

import gzip
import json
import math

import numpy as np
import pytest
import safetensors.numpy as st
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from fastcnn import checkpoint, datasets, models, optim
from fastcnn.checkpoint import CheckpointError

FUZZ = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None
)

# JSON values of every kind, including the awkward ones: huge and negative integers, NaN and
# infinities, empty and nested containers.
SCALARS = (
    hs.none()
    | hs.booleans()
    | hs.integers(min_value=-(2**70), max_value=2**70)
    | hs.sampled_from([0, 1, -1, 2**31, 2**63, 10**30])
    | hs.floats(allow_nan=True, allow_infinity=True)
    | hs.text(max_size=12)
)
JSON = hs.recursive(
    SCALARS,
    lambda inner: (
        hs.lists(inner, max_size=4) | hs.dictionaries(hs.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value, prefix=()):
    """Every path of keys/indices into a JSON tree, the root excluded."""
    out = []
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in items:
        out.append(prefix + (key,))
        out.extend(_paths(child, prefix + (key,)))
    return out


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A real checkpoint (LeNet-5, SGD with momentum, cosine schedule): (bytes, header, meta)."""
    model = models.lenet5(seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = optim.CosineAnnealingLR(opt, T_max=3)
    for p in model.parameters():
        p.grad[...] = 0.01
    opt.step()
    sched.step()
    path = tmp_path_factory.mktemp("fuzz") / "base.safetensors"
    checkpoint.save(
        path, model, opt, sched, epoch=1, extra={"note": [1, 2]}, input_shape=(1, 28, 28)
    )
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return data, header, json.loads(header["__metadata__"]["fastcnn"])


def load_everything(path):
    ckpt = checkpoint.load(path)
    model = models.lenet5(seed=1)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for restore, target in (
        (ckpt.restore_model, model),
        (ckpt.restore_optimizer, opt),
        (ckpt.restore_scheduler, optim.CosineAnnealingLR(opt, T_max=3)),
    ):
        try:
            restore(target)
        except CheckpointError as exc:
            assert str(path) in str(exc)


def assert_loads_or_refuses(path):
    try:
        load_everything(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)


@FUZZ
@given(data=hs.data())
def test_metadata_values_replaced_at_random(base, tmp_path_factory, data):
    raw, _, meta = base
    paths = _paths(meta)
    where = data.draw(hs.sampled_from(paths), label="path")
    value = data.draw(JSON, label="value")
    meta = json.loads(json.dumps(meta))
    _set(meta, where, value)
    meta["meta_sha256"] = checkpoint._meta_digest(meta)
    path = tmp_path_factory.mktemp("meta") / "c.safetensors"
    path.write_bytes(st.save(st.load(raw), metadata={"fastcnn": json.dumps(meta)}))
    assert_loads_or_refuses(path)


@FUZZ
@given(data=hs.data())
def test_safetensors_header_entries_replaced_at_random(base, tmp_path_factory, data):
    """dtype, shape and data_offsets of a tensor (the declared sizes) set to anything."""
    raw, header, _ = base
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(json.dumps(header))
    name = data.draw(
        hs.sampled_from(sorted(k for k in header if k != "__metadata__")), label="tensor"
    )
    field = data.draw(hs.sampled_from(["dtype", "shape", "data_offsets"]), label="field")
    value = data.draw(
        hs.one_of(
            JSON,
            hs.lists(hs.integers(min_value=0, max_value=2**40), min_size=0, max_size=4),
            hs.sampled_from(["F32", "F64", "BF16", "I8", "U8", "BOOL", "F8_E4M3"]),
        ),
        label="value",
    )
    header[name][field] = value
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path_factory.mktemp("header") / "c.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    assert_loads_or_refuses(path)


@FUZZ
@given(cut=hs.integers(min_value=0, max_value=10**6), junk=hs.binary(max_size=64))
def test_truncated_or_extended_checkpoints(base, tmp_path_factory, cut, junk):
    raw, _, _ = base
    path = tmp_path_factory.mktemp("cut") / "c.safetensors"
    path.write_bytes(raw[: cut % (len(raw) + 1)] + junk)
    assert_loads_or_refuses(path)


@FUZZ
@given(depth=hs.integers(min_value=1, max_value=1200), kind=hs.sampled_from(["list", "dict"]))
def test_nesting_depth_refused_at_save_iff_load_could_not_read_it(tmp_path_factory, depth, kind):
    value = 0
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    path = tmp_path_factory.mktemp("depth") / "c.safetensors"
    model = models.lenet5(seed=0)
    if depth > 199:  # extra sits inside the metadata, which may be 200 deep
        with pytest.raises(ValueError, match="extra is nested more than 199 levels"):
            checkpoint.save(path, model, extra=value)
        assert not path.exists()
    else:
        checkpoint.save(path, model, extra=value)
        assert checkpoint.load(path).extra == value


# ---------------------------------------------------------------------------------------------
# IDX files: declared sizes against what the file holds


@FUZZ
@given(
    kind=hs.sampled_from(["images", "labels"]),
    magic=hs.sampled_from([2051, 2049, 0, 2**32 - 1]),
    count=hs.one_of(
        hs.integers(min_value=0, max_value=20), hs.integers(min_value=0, max_value=2**32 - 1)
    ),
    dims=hs.tuples(hs.sampled_from([28, 0, 1, 2**32 - 1]), hs.sampled_from([28, 0, 2**16])),
    payload=hs.integers(min_value=0, max_value=20 * 784 + 3),
    compressed=hs.booleans(),
    expected_count=hs.one_of(hs.none(), hs.integers(min_value=0, max_value=20)),
    header_cut=hs.integers(min_value=0, max_value=16),
)
def test_idx_declared_sizes(
    tmp_path_factory, kind, magic, count, dims, payload, compressed, expected_count, header_cut
):
    values = [magic, count, *dims] if kind == "images" else [magic, count]
    header = np.array(values, dtype=">u4").tobytes()
    header_cut = header_cut if header_cut < len(header) else 0  # (0: the whole header)
    header = header[: len(header) - header_cut]
    body = np.random.default_rng(payload).integers(0, 10, payload, dtype=np.uint8).tobytes()
    data = header + body
    path = tmp_path_factory.mktemp("idx") / ("file.gz" if compressed else "file")
    path.write_bytes(gzip.compress(data, compresslevel=1) if compressed else data)
    reader = datasets.read_idx_images if kind == "images" else datasets.read_idx_labels
    try:
        out = reader(str(path), expected_count=expected_count)
    except datasets.DatasetFileError as exc:
        assert str(path) in str(exc)
        return
    # accepted: exactly what the header declares
    magic_ok = magic == (2051 if kind == "images" else 2049)
    assert magic_ok and len(out) == count and header_cut == 0
    assert expected_count is None or expected_count == count
    size = count * (math.prod(dims) if kind == "images" else 1)
    assert payload == size and out.tobytes() == body
