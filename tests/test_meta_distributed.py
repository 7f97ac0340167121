"""torch.distributed meta-training: 2 CPU processes with gloo against one process, same task batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from learned_opt.meta.train import meta_train

ROOT = Path(__file__).resolve().parents[1]
QUAD = ROOT / "tasks" / "l2l_quadratic.toml"
SETTINGS = {"meta_steps": 3, "tasks_per_step": 4, "unroll": 5, "horizon": 10, "eval_every": 3, "eval_tasks": 2,
            "checkpoint_every": 2, "rule_config": {"hidden_size": 4, "num_layers": 1}, "seed": 5}

RANK_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from learned_opt.meta.train import meta_train
settings = json.loads(sys.argv[3])
r = meta_train(config=sys.argv[1], out=sys.argv[2], progress=False, **settings)
with open(sys.argv[2] + f".rank{r.rank}.json", "w") as f:
    json.dump({"rank": r.rank, "slots": r.local_slots, "inner_steps": r.local_inner_steps,
               "total_inner_steps": r.inner_steps}, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_split_the_tasks_and_match_one_process(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(QUAD), str(out), json.dumps(SETTINGS)],
                                      env=env, cwd=ROOT, stderr=subprocess.PIPE))
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode() if p.stderr else ""
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    assert [r["slots"] for r in ranks] == [[0, 1], [2, 3]]  # each rank computed half the task batch
    assert all(r["inner_steps"] * 2 == r["total_inner_steps"] for r in ranks)

    torch.set_num_threads(1)
    single = meta_train(config=QUAD, out=tmp_path / "one", progress=False, **SETTINGS)
    assert single.local_slots == [0, 1, 2, 3]
    assert single.inner_steps == ranks[0]["total_inner_steps"]
    a, b = load_file(out / "final.safetensors"), load_file(tmp_path / "one" / "final.safetensors")
    # Stated tolerance: the two runs sum the same per-task float64 gradients in a different order.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    rows_dist = (out / "metrics.csv").read_text().splitlines()
    assert len(rows_dist) == 4  # rank 0 alone wrote: header + 3 steps, no duplicates
