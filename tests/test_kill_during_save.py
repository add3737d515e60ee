"""Kill real saving processes with SIGKILL at random moments: the checkpoint survives.

A server process (a fresh interpreter) builds two complete training states of the reference
network (weights + SGD momentum buffers), A and B, writes them once to reference files, then on
each request forks a child that saves A, B, A, B, ... onto ONE path in a loop as fast as it can,
and SIGKILLs it after a random delay (0 to ~3 save durations, so kills land before the first
save completes, while serialising, while writing or fsyncing the temporary file, around the
rename). After every kill this test checks that:

- the file at the path loads (no CheckpointError) and holds exactly A or exactly B: every
  weight, every momentum buffer, the epoch and the extra data of one and the same state;
- temporary files do not pile up: after a child that completed a save, at most one is left
  (the one the kill interrupted), older ones having been removed by its first completed save;
  each kill of a child that completed none may leave one more, until a save completes; and at
  the end, after one clean save, none.
"""

import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from fastcnn import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = int(os.environ.get("FASTCNN_KILLS", "200"))

SERVER = r"""
import os, signal, sys, time
import numpy as np
from fastcnn import checkpoint, models, optim

folder = sys.argv[1]
path = os.path.join(folder, "run.safetensors")


def state(seed):
    model = models.reference(seed)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.grad[...] = rng.standard_normal(p.shape).astype(p.dtype)
    opt.step()
    return model, opt


states = {"A": state(1), "B": state(2)}
for name, (model, opt) in states.items():
    checkpoint.save(os.path.join(folder, f"ref-{name}.safetensors"), model, opt, epoch=ord(name),
                    extra={"which": name})
checkpoint.save(path, *states["A"], epoch=ord("A"), extra={"which": "A"})
t = time.perf_counter()
for i in range(5):
    checkpoint.save(path, *states["A"], epoch=ord("A"), extra={"which": "A"})
print(f"ready {(time.perf_counter() - t) / 5:.6f}", flush=True)

for line in sys.stdin:
    if line.strip() == "final":  # one clean save by a live process: removes every stale temp file
        checkpoint.save(path, *states["B"], epoch=ord("B"), extra={"which": "B"})
        print("saved", flush=True)
        continue
    delay = float(line)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the saving child: save A and B alternately until killed
        os.close(r)
        os.write(w, b"s")
        i = 0
        while True:
            name = "BA"[i % 2]
            checkpoint.save(path, *states[name], epoch=ord(name), extra={"which": name})
            os.write(w, b".")
            i += 1
    os.close(w)
    os.read(r, 1)  # the child runs
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    done = 0
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        done += chunk.count(b".")
    os.close(r)
    print(f"killed {done} {os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1}", flush=True)
"""


def _temps(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def _assert_same_state(loaded, ref):
    assert loaded.model_state.keys() == ref.model_state.keys()
    for k in ref.model_state:
        assert np.array_equal(loaded.model_state[k], ref.model_state[k]), k
    assert loaded.epoch == ref.epoch and loaded.extra == ref.extra
    a, b = loaded.optimizer_state["state"], ref.optimizer_state["state"]
    assert a.keys() == b.keys()
    for i in b:
        assert a[i]["step"] == b[i]["step"]
        assert np.array_equal(a[i]["momentum_buffer"], b[i]["momentum_buffer"]), i


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL (POSIX)")
def test_sigkill_at_random_moments_never_breaks_the_checkpoint(tmp_path):
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(tmp_path)],
        cwd=ROOT,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
        ),
    )
    try:
        ready = server.stdout.readline().split()
        assert ready and ready[0] == "ready", server.stderr.read()
        save_seconds = float(ready[1])
        refs = {name: checkpoint.load(tmp_path / f"ref-{name}.safetensors") for name in "AB"}
        path = tmp_path / "run.safetensors"
        rng = random.Random(20261125)
        stats = {"kills": 0, "saves": 0, "no_save_completed": 0, "temp_left": 0, "A": 0, "B": 0}
        t0 = time.perf_counter()
        since_save = 0  # kills since the last one that came after a completed save
        for _k in range(KILLS):
            delay = rng.uniform(0, 3 * save_seconds)
            server.stdin.write(f"{delay}\n")
            server.stdin.flush()
            reply = server.stdout.readline().split()
            assert reply and reply[0] == "killed", server.stderr.read()
            done, signum = int(reply[1]), int(reply[2])
            assert signum == 9  # SIGKILL, not a crash of the child
            stats["kills"] += 1
            stats["saves"] += done
            stats["no_save_completed"] += done == 0
            temps = _temps(tmp_path)
            stats["temp_left"] += bool(temps)
            # the file loads and is one complete state
            loaded = checkpoint.load(path)
            which = loaded.extra["which"]
            stats[which] += 1
            _assert_same_state(loaded, refs[which])
            # stale temp files do not pile up: after a completed save only the interrupted one;
            # each kill with no completed save since may leave one more (the next completed
            # save removes them all), never more
            since_save = 0 if done else since_save + 1
            assert len(temps) <= 1 + since_save, (temps, since_save)
            assert all(re.fullmatch(r"\.run\.safetensors\.\d+-[0-9a-f]{12}\.tmp", t) for t in temps)
        elapsed = time.perf_counter() - t0
        server.stdin.write("final\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == "saved"
        assert _temps(tmp_path) == []
        assert checkpoint.load(path).extra == {"which": "B"}
    finally:
        server.stdin.close()
        server.kill()
        server.wait()
    print(
        f"\nkill test: {stats['kills']} SIGKILLs in {elapsed:.1f} s (one save: "
        f"{1000 * save_seconds:.1f} ms; delays 0-{3000 * save_seconds:.0f} ms), "
        f"{stats['saves']} saves completed, {stats['no_save_completed']} kills before the "
        f"child's first save completed, {stats['temp_left']} kills left a temporary file "
        f"(killed mid-write); the file held A {stats['A']} times, B {stats['B']} times, "
        f"always complete and loadable"
    )
    assert stats["temp_left"] > 0, "no kill landed while a temporary file was being written"
    assert stats["A"] > 0 and stats["B"] > 0
