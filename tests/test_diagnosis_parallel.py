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
