"""Two processes on localhost (CPU, jax.distributed) train together like one process."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np

from tests.e2e_helpers import ROOT, child_env, losses_by_step, run_binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path, tiny_args):
    common = tiny_args + ["--batch_size=8", "--train_steps=8"]
    run_binary("pretrain.py", common + [f"--workdir={tmp_path / 'single'}"])

    port = _free_port()
    env = child_env()
    # One CPU device per process, whatever the session's flags say.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "device_count" not in f)
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "experiments" / "pretrain.py"), *common,
             f"--workdir={tmp_path / 'multi'}", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "2 devices" in outs[0]

    single, multi = losses_by_step(tmp_path / "single"), losses_by_step(tmp_path / "multi")
    assert sorted(single) == sorted(multi) == list(range(1, 9))
    np.testing.assert_allclose(
        [single[s] for s in range(1, 9)], [multi[s] for s in range(1, 9)], rtol=2e-4, atol=1e-6
    )
