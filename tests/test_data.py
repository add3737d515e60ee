"""fastcnn.data: the DataLoader's batches, order, uint8 scaling and position; fit, evaluate and
predict fed by loaders (bitwise the array path); augmented training reproducible and resumable
bitwise; the errors that suggest a fix."""

import numpy as np
import pytest

import fastcnn
from fastcnn import checkpoint, data
from fastcnn import transforms as T
from fastcnn.training import evaluate, fit, resume_kwargs


def images(n=50, shape=(1, 8, 8), seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    return x if dtype == np.uint8 else (x / np.float32(255)).astype(dtype)


def labels(n=50, classes=3, seed=0):
    return np.random.default_rng(seed + 1).integers(0, classes, n).astype(np.int64)


class ItemDataset:
    """A data set read item by item: what a user's own class looks like."""

    def __init__(self, x, y=None):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] if self.y is None else (self.x[i], int(self.y[i]))


def collect(loader, reuse=False):
    return [(xb.copy(), None if yb is None else yb.copy()) for xb, yb in loader.batches(reuse)]


# ---------------------------------------------------------------------------------------------
# the loader


def test_an_epoch_is_one_permutation_from_the_seed_in_batches():
    x, y = images(), labels()
    loader = data.DataLoader((x, y), batch_size=16, shuffle=True, seed=4)
    assert len(loader) == 4 and loader.num_samples == 50
    rng = np.random.default_rng(4)
    for _ in range(2):
        order = rng.permutation(50)
        got = collect(loader)
        assert [len(b[0]) for b in got] == [16, 16, 16, 2]
        np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), y[order])
        np.testing.assert_array_equal(
            np.concatenate([b[0] for b in got]), x[order] / np.float32(255)
        )


def test_uint8_pixels_are_scaled_as_the_data_sets_scale_them():
    x = images(dtype=np.uint8)
    xb, yb = next(iter(data.DataLoader(x, batch_size=50)))
    assert yb is None and xb.dtype == np.float32
    want = np.empty(x.shape, np.float32)
    np.divide(x, np.float32(255), out=want, dtype=np.float32)  # fastcnn.datasets.mnist's scaling
    np.testing.assert_array_equal(xb, want)
    assert xb.min() >= 0 and xb.max() <= 1


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_item_by_item_data_sets_give_the_array_path_batches(dtype):
    x, y = images(dtype=dtype), labels()
    aug = T.Compose([T.RandomShift(1), T.RandomHorizontalFlip()])
    fast = data.DataLoader(data.ArrayDataset(x, y), 8, shuffle=True, transform=aug, seed=2)
    slow = data.DataLoader(ItemDataset(x, y), 8, shuffle=True, transform=aug, seed=2)
    for _ in range(2):  # two epochs: other orders, other augmentations
        a, b = collect(fast, reuse=True), collect(slow)
        assert len(a) == len(b) == 7
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


def test_drop_last_and_fixed_order():
    x, y = images(), labels()
    loader = data.DataLoader((x, y), batch_size=16, drop_last=True)
    got = collect(loader)
    assert len(loader) == len(got) == 3 and loader.num_samples == 48
    np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), y[:48])
    assert [b[1].tolist() for b in collect(loader)] == [b[1].tolist() for b in got]


def test_seek_and_state_dict_position_the_loader_as_the_passes_would():
    x, y = images(), labels()
    make = lambda: data.DataLoader((x, y), 16, shuffle=True, transform=T.RandomShift(2), seed=9)  # noqa: E731
    ref = make()
    for _ in range(3):
        collect(ref)
    state = ref.state_dict()
    want = collect(ref)  # epoch 3
    sought = make()
    sought.seek(3)
    restored = make()
    restored.load_state_dict(state)
    for other in (sought, restored):
        for (xa, ya), (xb, yb) in zip(want, collect(other), strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    again = make()
    assert not np.array_equal(collect(again)[0][0], want[0][0])  # epoch 0 differs from epoch 3


def test_random_split_is_disjoint_and_seeded():
    ds = data.ArrayDataset(images(), labels())
    a, b = data.random_split(ds, [0.8, 0.2], seed=1)
    assert (len(a), len(b)) == (40, 10)
    rows = {r.tobytes() for r in np.concatenate([a.x, b.x])}
    assert len(rows) == len({r.tobytes() for r in ds.x})
    a2, _ = data.random_split(ds, [0.8, 0.2], seed=1)
    np.testing.assert_array_equal(a.x, a2.x)
    with pytest.raises(ValueError, match="random_split: the fractions must sum to 1"):
        data.random_split(ds, [0.5, 0.2])


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: data.DataLoader(42), TypeError, "DataLoader: expected a data set"),
        (lambda: data.DataLoader([]), ValueError, "DataLoader: the data set is empty"),
        (lambda: data.DataLoader(images(), batch_size=0), ValueError, "batch_size must be"),
        (lambda: data.DataLoader(images(), shuffle=1), TypeError, "shuffle must be True"),
        (lambda: data.DataLoader(images(), seed=-1), ValueError, "seed must be an integer"),
        (lambda: data.DataLoader(images(), transform=3), TypeError, "transform must be callable"),
        (
            lambda: data.DataLoader(images(10), batch_size=16, drop_last=True),
            ValueError,
            "leaves no batch",
        ),
        (
            lambda: data.ArrayDataset(images().astype(np.int64)),
            TypeError,
            r"floating-point or uint8 images, got dtype int64.*astype\(np.float32\) / 255",
        ),
        (lambda: data.ArrayDataset(images(), labels(49)), ValueError, r"labels of shape \(50,\)"),
    ],
)
def test_bad_loaders_are_refused_by_name(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ---------------------------------------------------------------------------------------------
# fit, evaluate and predict


def small_net(seed=0):
    rng = np.random.default_rng(seed)
    return fastcnn.Sequential(
        fastcnn.Conv2D(1, 4, 3, rng=rng),
        fastcnn.ReLU(),
        fastcnn.MaxPool2D(2),
        fastcnn.Flatten(),
        fastcnn.Dense(36, 3, rng=rng),
    )


def train(x, y=None, epochs=2, model=None, opt_state=None, **kwargs):
    model = small_net() if model is None else model
    opt = fastcnn.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if opt_state is not None:
        opt_state(opt)
    history = fit(
        model, fastcnn.CrossEntropyLoss(), opt, x, y, epochs=epochs, progress=False, **kwargs
    )
    return model, history


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_fit_on_a_loader_of_arrays_is_bitwise_fit_on_the_arrays():
    x, y = images(dtype=np.float32), labels()
    m1, h1 = train(x, y, batch_size=16, seed=5)
    loader = data.DataLoader(data.ArrayDataset(x, y), batch_size=16, shuffle=True, seed=5)
    m2, h2 = train(loader)
    assert_same_weights(m1, m2)
    assert h1.train_loss == h2.train_loss


def test_fit_on_uint8_arrays_is_bitwise_fit_on_the_scaled_arrays():
    x, y = images(dtype=np.uint8), labels()
    m1, h1 = train(x, y, batch_size=16, val_data=(x, y))
    m2, h2 = train(x / np.float32(255), y, batch_size=16, val_data=(x / np.float32(255), y))
    assert_same_weights(m1, m2)
    assert h1.val_loss == h2.val_loss
    np.testing.assert_array_equal(m1.predict(x), m2.predict(x / np.float32(255)))
    assert evaluate(m1, x, y) == evaluate(m2, x / np.float32(255), y)


def test_evaluate_and_predict_take_loaders():
    x, y = images(dtype=np.uint8), labels()
    model = small_net()
    loader = data.DataLoader((x, y), batch_size=7)
    np.testing.assert_array_equal(model.predict(loader), model.predict(x, batch_size=7))
    loss, acc = evaluate(model, loader)
    loss2, acc2 = evaluate(model, x, y)
    assert acc == acc2 and np.isclose(loss, loss2, rtol=1e-6)
    m, h = train(images(dtype=np.float32), labels(), val_data=loader)
    assert h.val_accuracy[-1] is not None


def augmented_loader(x, y, seed=3):
    aug = T.Compose([T.RandomCrop(8, padding=1), T.RandomHorizontalFlip()])
    return data.DataLoader(data.ArrayDataset(x, y), 16, shuffle=True, transform=aug, seed=seed)


def test_augmented_training_is_bitwise_reproducible_and_seeded():
    x, y = images(), labels()
    m1, h1 = train(augmented_loader(x, y), epochs=3)
    m2, h2 = train(augmented_loader(x, y), epochs=3)
    assert_same_weights(m1, m2)
    assert h1.train_loss == h2.train_loss
    m3, _ = train(augmented_loader(x, y, seed=4), epochs=3)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(m1.state_dict().values(), m3.state_dict().values(), strict=True)
    )
    plain, _ = train(data.DataLoader((x, y), 16, shuffle=True, seed=3), epochs=3)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(m1.state_dict().values(), plain.state_dict().values(), strict=True)
    )  # the augmentation changed the run


def test_an_augmented_run_resumed_from_its_checkpoint_is_bitwise_the_uninterrupted_one(tmp_path):
    x, y = images(), labels()
    whole, h_whole = train(augmented_loader(x, y), epochs=4)
    path = tmp_path / "run.safetensors"
    train(augmented_loader(x, y), epochs=2, checkpoint=path)
    ck = checkpoint.load(path)
    kwargs = resume_kwargs(ck)
    model = ck.model
    resumed, h_resumed = train(
        augmented_loader(x, y),  # a fresh loader: its position comes from the checkpoint
        epochs=4,
        model=model,
        opt_state=ck.restore_optimizer,
        checkpoint=path,
        **kwargs,
    )
    assert_same_weights(whole, resumed)
    assert h_whole.train_loss == h_resumed.train_loss
    # the same without the stored state: the loader replays the shufflings from its seed
    train(augmented_loader(x, y), epochs=2, checkpoint=path)
    ck = checkpoint.load(path)
    replayed, _ = train(
        augmented_loader(x, y),
        epochs=4,
        model=ck.model,
        opt_state=ck.restore_optimizer,
        start_epoch=2,
        history=resume_kwargs(ck)["history"],
    )
    assert_same_weights(whole, replayed)


def test_fit_refuses_loader_mismatches_before_training():
    x, y = images(), labels()
    loader = data.DataLoader((x, y), 16, seed=1)
    with pytest.raises(TypeError, match="pass epochs by keyword"):
        fit(small_net(), fastcnn.CrossEntropyLoss(), None, loader, 3)
    with pytest.raises(TypeError, match="got a DataLoader and y_train"):
        train(loader, y)
    with pytest.raises(ValueError, match="batch_size=32 but the DataLoader's is 16"):
        train(loader, batch_size=32)
    with pytest.raises(ValueError, match="seed=2 but the DataLoader's seed is 1"):
        train(loader, seed=2)
    with pytest.raises(ValueError, match="data set has no labels"):
        train(data.DataLoader(x, 16))
    with pytest.raises(TypeError, match="epochs is required"):
        fit(small_net(), fastcnn.CrossEntropyLoss(), None, x, y)


def test_errors_suggest_the_fix():
    x, y = images(dtype=np.float32), labels()
    with pytest.raises(TypeError, match=r"fit: expected floating-point or uint8 images.*int32"):
        train(x.astype(np.int32), y)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"channels last\? .*x\.transpose\(0, 3, 1, 2\)"):
        train(nhwc, y)
    with pytest.raises(TypeError, match=r"uint8.*divide by 255.*DataLoader"):
        small_net()(images(4))
