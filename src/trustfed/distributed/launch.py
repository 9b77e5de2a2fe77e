"""Launch workers with torchrun (``torch.distributed.run``, elastic, c10d rendezvous)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from trustfed.distributed.parallel import DistributedError
from trustfed.distributed.settings import TrainRunConfig
from trustfed.primitives.atomic import atomic_write_text

log = logging.getLogger("trustfed.distributed.launch")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def torchrun_argv(
    module: str,
    args: Sequence[str],
    *,
    nproc_per_node: int,
    nnodes: str = "1",
    max_restarts: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
) -> list[str]:
    """The command line: ``python -m torch.distributed.run`` with c10d rendezvous, then ``-m module``."""
    endpoint = rdzv_endpoint or f"127.0.0.1:{free_port()}"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        nnodes,
        "--nproc-per-node",
        str(nproc_per_node),
        "--max-restarts",
        str(max_restarts),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        rdzv_id or uuid.uuid4().hex[:12],
        "--monitor-interval",
        "0.2",
        "-m",
        module,
        *args,
    ]


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    # Workers otherwise reuse the rendezvous TCPStore across elastic restarts without a per-attempt
    # key prefix, so a restarted group can read the dead group's gloo addresses and fail to connect.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def run_torchrun(
    argv: list[str], log_path: Path | None, env: Mapping[str, str] | None = None, timeout: float | None = None
) -> None:
    """Run torchrun to completion; on failure raise with the tail of its output."""
    log.info("launching: %s", " ".join(argv))
    out = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("w", encoding="utf-8")
    try:
        proc = subprocess.run(
            argv, env=dict(env or worker_env()), stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise DistributedError(f"torchrun did not finish within {timeout} s; see {log_path}") from None
    finally:
        if out is not None:
            out.close()
    if proc.returncode != 0:
        tail = ""
        if log_path is not None and log_path.exists():
            tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise DistributedError(f"torchrun exited with {proc.returncode}; last lines of {log_path}:\n{tail}")


def launch_training(
    cfg: object,
    *,
    selfcheck: bool = False,
    env: Mapping[str, str] | None = None,
    log_to_file: bool = True,
    timeout: float | None = None,
) -> dict[str, object]:
    """Run ``trustfed train`` for a validated :class:`TrainRunConfig`; returns its metrics.json."""
    if not isinstance(cfg, TrainRunConfig):
        raise TypeError("launch_training needs a TrainRunConfig")
    run_dir = cfg.run.out
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", cfg.model_dump_json(indent=2))
    (run_dir / "metrics.json").unlink(missing_ok=True)
    la = cfg.launch
    args = ["--run-dir", str(run_dir)] + (["--selfcheck"] if selfcheck else [])
    argv = torchrun_argv(
        "trustfed.distributed.worker",
        args,
        nproc_per_node=la.nproc_per_node,
        nnodes=la.nnodes,
        max_restarts=la.max_restarts,
        rdzv_endpoint=la.rdzv_endpoint,
        rdzv_id=la.rdzv_id,
    )
    run_torchrun(argv, run_dir / "torchrun.log" if log_to_file else None, worker_env(env), timeout)
    metrics: dict[str, object] = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return metrics
