"""The test harness's launcher (dist_utils.run_train) behaves as torchrun does where the
tests rely on it: the exit code and rank 0's output come back, the first failure ends the
job, and it refuses an environment its preloaded ranks cannot honour."""

import os
import re
import time

import pytest

from conftest import TINY
import dist_utils
from dist_utils import run_train

ARGS = TINY + ["train.max_steps=4", "train.eval_every=0", "checkpoint.every=0", "checkpoint.save_final=false",
               "data.rank_split=batch", "parallel.ep=2"]  # fmt: skip


def test_a_hung_rank_is_stopped_when_another_fails(tmp_path):
    """Rank 1 hangs forever after step 2; rank 0's collective times out (5 s) and it exits 3.
    run_train must then stop rank 1, as torchrun's agent does, and report rank 0's code."""
    env = dict(os.environ, MOE_DIST_FAULT="hang_rank:1:2")
    t0 = time.monotonic()
    p = run_train(2, [*ARGS, f"run.dir={tmp_path}", "parallel.timeout_s=5"], env=env, timeout=120)
    # The failed rank's own code (torchrun itself would exit 1): the peer-failure exit of train.py.
    assert p.returncode == 3, (p.stdout[-2000:], p.stderr[-3000:])
    assert "error: rank 0: a collective failed at step 3; another rank died or hangs" in p.stderr
    assert time.monotonic() - t0 < 60


def test_a_finished_run_returns_0_and_rank0s_report(tmp_path):
    p = run_train(2, [*ARGS, f"run.dir={tmp_path}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.rstrip().splitlines()[-4] == "done: step 4"  # rank 0 prints it, rank 1 adds nothing


def test_an_environment_read_at_import_is_refused():
    run_train(1, ["--help"])  # the server is up, and its environment recorded
    server = dist_utils._SERVER_ENV.get("TRITON_INTERPRET")
    other = "0" if server == "1" else "1"
    with pytest.raises(AssertionError, match=re.escape(
            f"TRITON_INTERPRET={other!r}, but the forked ranks imported torch, triton and DeepSpeed under "
            f"TRITON_INTERPRET={server!r} (tests/dist_utils.py): run this test in a subprocess")):  # fmt: skip
        run_train(1, ["train.max_steps=1"], env=dict(os.environ, TRITON_INTERPRET=other))


def test_host_reads_records_every_kind_of_read():
    """conftest.HostReads, which the one-read-per-step tests rely on, sees the ops a GPU
    syncs for even where a CPU kernel reads the values unseen; not the ones it does not."""
    import torch

    from conftest import HostReads

    c, x = torch.tensor([1, 2, 0]), torch.randn(5)
    with HostReads() as h:
        torch.repeat_interleave(torch.arange(3), c)
        torch.bincount(c)
        x[x > 0]
        torch.masked_select(x, x > 0)
        torch.unique(c)
        c.tolist()
        c.sum().item()
        x.nonzero()
    assert h.reads == ["repeat_interleave", "bincount.default", "index[mask]", "masked_select.default",
                       "_unique2.default", "tolist", "_local_scalar_dense.default", "nonzero.default"]
    with HostReads() as h:  # sized without looking at values
        torch.repeat_interleave(torch.arange(3), c, output_size=3)
        x[torch.tensor([0, 2])]
        torch.zeros(3).scatter_add_(0, c, torch.ones(3))
    assert h.reads == []
