"""Data parallel measurement under torch.distributed (gloo, CPU, 2 processes).

* 2 ranks, each measuring its chunks of a JSONL file with `measure_pairs` on a tiny float64 GPT-2,
  merged by rank 0: every column equals the one-process run exactly (same chunks, same batches);
* a rank whose peer never arrives fails within its short timeout with one line and exit status 2.
"""
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("torch")

WORKER = textwrap.dedent("""
    import sys, numpy as np
    from entangle_sim.torch import parallel
    from entangle_sim.torch.data import tokenize_rows
    from entangle_sim.torch.measure import measure_pairs
    from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer

    src, out, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    try:
        rank, world = parallel.init(timeout_s=timeout)
    except parallel.DistributedError as e:
        print(f"entangle-sim: error: {e}", file=sys.stderr)
        sys.exit(2)
    tok = tiny_tokenizer()
    model = tiny_model("gpt2", tok, width=16).double()

    def compute(rows, start):
        return measure_pairs(model, tokenize_rows(tok, rows), tok.pad_token_id, batch_size=3)

    cols = parallel.run_parallel(src, out, compute, chunk_rows=5, progress=False)
    if rank == 0:
        np.savez(out + "/merged.npz", **cols)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, src, out, world, timeout=60.0, ranks=None):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    procs = []
    for r in (range(world) if ranks is None else ranks):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(src), str(out), str(timeout)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    res = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    return res


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    import json

    from entangle_sim.torch.tiny import toy_rows

    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in toy_rows(13, seed=2)))
    two = _launch(tmp_path, src, tmp_path / "two", 2)
    assert [r[0] for r in two] == [0, 0], [r[2][-2000:] for r in two]
    # the one-process run, in this process, with the worker's own code (no process group: world size 1)
    ns = {"__name__": "worker"}
    argv = sys.argv
    try:
        sys.argv = ["worker", str(src), str(tmp_path / "one"), "60"]
        for var in ("RANK", "WORLD_SIZE"):
            assert os.environ.get(var, "0" if var == "RANK" else "1") in ("0", "1")
        exec(compile(WORKER, "worker.py", "exec"), ns)
    finally:
        sys.argv = argv
    a = np.load(tmp_path / "one" / "merged.npz")
    b = np.load(tmp_path / "two" / "merged.npz")
    assert sorted(a.files) == sorted(b.files) and "G_wl" in a.files and len(a["G_wl"]) == 13
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_unreachable_peer_is_one_line_exit_2(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("{}")
    [(rc, out, err)] = _launch(tmp_path, src, tmp_path / "o", 2, timeout=3.0, ranks=[0])
    assert rc == 2, err[-2000:]
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("entangle-sim: error:")]
    assert len(lines) == 1 and "rank 0 of 2 could not reach its peers at 127.0.0.1:" in lines[0], err[-2000:]


def _torchrun():
    """The torchrun launcher next to this Python (or on PATH), or None."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    if not dist.is_available():
        return None
    exe = Path(sys.executable).with_name("torchrun")
    return str(exe) if exe.is_file() else shutil.which("torchrun")


@pytest.mark.slow
def test_cli_under_torchrun_equals_one_process(tmp_path):
    """`torchrun --standalone --nproc-per-node 2 -m entangle_sim.cli diagnose-model ...` (gloo, CPU) writes
    pairs.csv, report.md and summary.json byte for byte equal to the one-process command's."""
    import json

    from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer, toy_rows

    launcher = _torchrun()
    if launcher is None:
        pytest.skip("torchrun (torch.distributed) not available")
    tok = tiny_tokenizer()
    tiny_model("gpt2", tok, width=16).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(7, seed=6)))
    args = ["diagnose-model", "--model", str(tmp_path / "model"), "--data", str(src), "--chunk-rows", "2",
            "--batch-size", "2", "--top", "3", "--token-maps", "1", "--check-step", "--loss", "sigmoid",
            "--loss", "ipo"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    runs = {"one": [sys.executable, "-m", "entangle_sim.cli"],
            "two": [launcher, "--standalone", "--nproc-per-node", "2", "-m", "entangle_sim.cli"]}
    procs = {k: subprocess.Popen(cmd + args + ["--out", str(tmp_path / k)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, cmd in runs.items()}
    res = {k: (p.wait(timeout=300), *p.communicate()) for k, p in procs.items()}
    for k, (rc, out, err) in res.items():
        assert rc == 0, (k, err[-3000:])
    assert res["one"][1].splitlines()[0] == res["two"][1].splitlines()[0]  # the verdict, printed once
    for name in ("pairs.csv", "report.md", "summary.json"):  # no timing fields in any of them
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["n_pairs"] == 7 and "check_step" in s
    # the two ranks shared the work: 4 chunks of 2 rows, all present and merged
    assert len(list((tmp_path / "two" / "measure" / "chunks").glob("*.npz"))) == 4
