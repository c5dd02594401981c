"""Processes for the integration tests: each test starts its own and stops them, on failure too.

vLLM loads plugins from entry points in every process it spawns. So that the tests do not depend
on how (or whether) the package is installed, `plugin_pythonpath` writes a throwaway
distribution whose only content is the `vllm.general_plugins` entry point of the package.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENTRY_POINT = "moba = moba_backend.integrations.vllm:register"


def plugin_pythonpath(root: Path) -> str:
    dist = root / "moba_backend_test_plugin-0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: moba-backend-test-plugin\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{ENTRY_POINT}\n")
    return os.pathsep.join([str(root), str(REPO)])


def child_env(pythonpath: str, **extra: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FD_ATTENTION_BACKEND", None)
    env.pop("MOBA_STATS_FILE", None)
    env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group this test started, then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)      # engine children of an exited leader
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(10)


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    f = open(log, "wb")
    return subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True)


def run_llm_job(job: dict, env: dict[str, str], workdir: Path, timeout: float) -> dict:
    """Run tests/integrations/llm_job.py in its own process group; return its JSON result."""
    out = workdir / f"{job['name']}.json"
    log = workdir / f"{job['name']}.log"
    job = dict(job, out=str(out))
    proc = start([sys.executable, "-m", "tests.integrations.llm_job", json.dumps(job)], env, log)
    t0 = time.time()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{job['name']} ran past {timeout:.0f}s; log tail:\n{tail(log)}")
    finally:
        stop(proc)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"{job['name']} failed (rc {proc.returncode}); log tail:\n{tail(log)}")
    res = json.loads(out.read_text())
    res["wall_s"] = time.time() - t0
    return res


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def read_stats(path: Path) -> dict[str, int]:
    """Summed selection counts of the plugin's stats file; `calls_<route>` counts layer calls per
    route (`moba`: MoBA's path, `vllm_cpu`: a dense step on vLLM's CPU attention)."""
    tot = {"calls": 0, "prefill_selected": 0, "prefill_visible": 0, "decode_selected": 0,
           "decode_visible": 0, "calls_moba": 0, "calls_vllm_cpu": 0}
    if not path.exists():
        return tot
    for line in path.read_text().splitlines():
        row = json.loads(line)
        tot["calls"] += 1
        tot[f"calls_{row['route']}"] += 1
        for k in ("prefill_selected", "prefill_visible", "decode_selected", "decode_visible"):
            tot[k] += row[k]
    return tot
