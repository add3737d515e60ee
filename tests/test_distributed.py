"""fastcnn.distributed in one process (K=1): sharding, argument checks, and that every call is
the identity of one process. The multi-rank behaviour is in test_distributed_mpi.py."""

from __future__ import annotations

import numpy as np
import pytest

import fastcnn
from fastcnn import distributed as dist


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    for name in dist._SIZE_VARS + dist._RANK_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8])
def test_shard_bounds_partition_every_batch(world):
    for total in range(0, 50):
        bounds = [dist.shard_bounds(total, world, r) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        for (_, stop), (start, _) in zip(bounds[:-1], bounds[1:], strict=True):
            assert stop == start  # contiguous, in rank order
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1  # balanced; empty only if total < world
        assert (min(sizes) == 0) == (total < world)


def test_one_process_world():
    w = dist.init()
    assert (w.rank, w.size, w.comm) == (0, 1, None)
    assert dist.rank() == 0 and dist.size() == 1 and dist.is_initialized()
    idx = np.arange(10, 20)
    np.testing.assert_array_equal(dist.shard(idx), idx)
    dist.barrier()
    a = np.arange(6, dtype=np.float32)
    assert dist.allreduce(a.copy(), average=True).tolist() == a.tolist()
    assert dist.broadcast(a.copy()).tolist() == a.tolist()
    assert dist.broadcast_object({"x": 1}) == {"x": 1}


def _trained(optimizer_wrapper, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    model = fastcnn.models.reference(seed=seed)
    opt = optimizer_wrapper(fastcnn.SGD(model.parameters(), lr=0.05, momentum=0.9))
    loss_fn = fastcnn.CrossEntropyLoss()
    for b in range(0, 40, 16):
        opt.zero_grad()
        loss_fn(model(x[b : b + 16]), y[b : b + 16])
        model.backward(loss_fn.backward())
        if isinstance(opt, dist.DistributedOptimizer):
            opt.step(count=len(x[b : b + 16]))
        else:
            opt.step()
    return model.state_dict()


def test_distributed_optimizer_on_one_process_is_the_optimizer():
    plain = _trained(lambda o: o)
    wrapped = _trained(dist.DistributedOptimizer)
    for k in plain:
        np.testing.assert_array_equal(plain[k], wrapped[k])
    opt = dist.DistributedOptimizer(fastcnn.SGD(fastcnn.models.reference().parameters(), lr=0.1))
    opt.lr = 0.02  # attributes are the wrapped optimizer's (schedulers set lr)
    assert opt.optimizer.lr == 0.02 and "SGD" in repr(opt)


def test_allreduce_gradients_one_process_keeps_the_gradients():
    model = fastcnn.models.reference(seed=0)
    for p in model.parameters():
        p.grad[...] = 1.5
    assert dist.allreduce_gradients(model, count=7) == 7
    assert all(np.all(p.grad == 1.5) for p in model.parameters())
    dist.broadcast_parameters(model)
    dist.average_buffers(fastcnn.models.resnet(8))


def test_fit_distributed_true_on_one_process_equals_fit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((70, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 70)
    states = []
    for distributed in (None, True, False):
        model = fastcnn.models.reference(seed=1)
        opt = fastcnn.SGD(model.parameters(), lr=0.05)
        fastcnn.fit(
            model, fastcnn.CrossEntropyLoss(), opt, x, y, epochs=1, batch_size=32,
            progress=False, distributed=distributed,
        )  # fmt: skip
        states.append(model.state_dict())
    for k in states[0]:
        np.testing.assert_array_equal(states[0][k], states[1][k])
        np.testing.assert_array_equal(states[0][k], states[2][k])


def test_launcher_environment(monkeypatch):
    assert dist.launched_size() == 1 and dist.launched_rank() == 0
    assert dist.describe_world() == "" and dist.default_threads(None) is None
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    assert dist.launched_size() == 4 and dist.launched_rank() == 3
    assert dist.describe_world() == " per rank, 4 ranks (MPI)"
    assert dist.default_threads(None) == max(1, fastcnn.threads.max_threads() // 2)
    assert dist.default_threads(3) == 3
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "5")  # the first variable set wins
    assert dist.launched_size() == 4


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: dist.shard(np.zeros((2, 2), dtype=int)), ValueError, "shard: expected a 1-D"),
        (lambda: dist.shard([0.5, 1.5]), ValueError, "sample indices"),
        (lambda: dist.allreduce([1.0]), TypeError, "allreduce: expected a numpy array"),
        (lambda: dist.allreduce(np.zeros(3)[::2]), ValueError, "C-contiguous"),
        (lambda: dist.broadcast(np.zeros(2), root=1), ValueError, "root must be a rank 0 .. 0"),
        (lambda: dist.broadcast_parameters("model"), TypeError, "expected a fastcnn Module"),
        (lambda: dist.allreduce_gradients(3), TypeError, "expected a Module, an optimizer"),
        (
            lambda: dist.allreduce_gradients(fastcnn.models.reference(), count=-1),
            ValueError,
            "count must be an int >= 0",
        ),
        (
            lambda: dist.allreduce_gradients(fastcnn.models.reference(), count=0),
            ValueError,
            "count is 0 on the only rank",
        ),
        (lambda: dist.DistributedOptimizer(object()), TypeError, "expected a fastcnn optimizer"),
        (lambda: dist.init(reduction="tree"), ValueError, "reduction must be one of"),
        (lambda: dist.init(timeout=-1), ValueError, "timeout must be a number of seconds"),
    ],
)
def test_argument_errors_name_the_function(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_fit_distributed_must_be_a_bool():
    x = np.zeros((4, 1, 28, 28), np.float32)
    model = fastcnn.models.reference()
    opt = fastcnn.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="fit: distributed must be None, True or False"):
        fastcnn.fit(
            model, fastcnn.CrossEntropyLoss(), opt, x, np.zeros(4, int), 1, distributed="yes"
        )


def test_timeout_from_the_environment(monkeypatch):
    monkeypatch.setenv("FASTCNN_DIST_TIMEOUT", "12.5")
    assert dist._timeout_from_env() == 12.5
    monkeypatch.setenv("FASTCNN_DIST_TIMEOUT", "0")
    assert dist._timeout_from_env() is None
    monkeypatch.setenv("FASTCNN_DIST_TIMEOUT", "soon")
    with pytest.raises(dist.DistributedError, match="FASTCNN_DIST_TIMEOUT must be a number"):
        dist._timeout_from_env()
    monkeypatch.delenv("FASTCNN_DIST_TIMEOUT")
    assert dist._timeout_from_env() == dist.DEFAULT_TIMEOUT
