"""Several workers on one machine (a GPU fits many MiniLM runs at once): a claim file per run instead of
hash shards, so workers that finish early take the next run in priority order, and a parent process that
starts the workers, reports progress and stops them at a deadline. A library module of benchmarks/glue.py.

A claim is ``<runs-dir>/<group>/<run_id>.claim`` created exclusively; it holds the host and pid of its
worker, so a claim left by a killed worker of this host is taken over, and one of a live worker is not.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from glue_protocol import Run


def add_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--workers", type=int, default=0,
                     help="Start N worker processes that share the runs by claim files (implies --claim --wait); "
                          "their logs go to <runs-dir>/workers/. For a GPU: several runs at once on one card. "
                          "--max-runs then applies to each worker.")
    run.add_argument("--claim", action="store_true",
                     help="Take runs by claim files in --runs-dir (workers of one machine sharing a sweep).")
    run.add_argument("--wait", action="store_true",
                     help="With --claim: when only waiting runs are left (stage 2 before its lr is chosen) and another "
                          "worker is training, poll instead of ending.")
    run.add_argument("--poll", type=float, default=5.0, help="Seconds between polls with --wait (default 5).")
    run.add_argument("--stop-after", type=float,
                     help="Start no new run after this many seconds (runs in progress finish).")
    run.add_argument("--kill-after", type=float,
                     help="With --workers: stop the workers after this many seconds (runs in progress are lost; "
                          "their result files are never half-written).")
    run.add_argument("--no-checkpoints", action="store_true",
                     help="Write no resumable checkpoints (short GPU runs; the protocol's save_steps otherwise).")
    run.add_argument("--tf32", action="store_true", help="Pass --tf32 to every run (CUDA only; recorded).")


def _claim_path(run: Run, runs_dir: Path) -> Path:
    return Path(runs_dir) / run.group / f"{run.run_id}.claim"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# When this sitting started: a worker's parent passes its own start, so a run that failed in a sibling worker
# before this worker started is still not retried in the same sitting.
_STARTED = float(os.environ.get("LORA2_POOL_STARTED", time.time()))
STALE_S = 6 * 3600  # a claim of another host (or an unreadable one) older than this is abandoned


def _holder(path: Path) -> tuple[str, int] | None:
    try:
        host, pid = path.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _live(path: Path) -> bool:
    """Whether the claim's worker may still be training: alive on this host, or recent elsewhere."""
    holder = _holder(path)
    if holder is not None and holder[0] == socket.gethostname():
        return _alive(holder[1])
    try:
        return time.time() - path.stat().st_mtime < STALE_S
    except OSError:
        return False


def claim(run: Run, runs_dir: Path) -> bool:
    """Take the run for this process; False when a live worker holds it, or it failed while this process ran
    (a later sitting retries it)."""
    path = _claim_path(run, runs_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    failed = path.with_suffix(".failed")
    if failed.exists() and failed.stat().st_mtime >= _STARTED:
        return False
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(f"{socket.gethostname()} {os.getpid()}")  # complete before it becomes the claim
    try:
        for _ in range(2):
            try:
                os.link(tmp, path)  # atomic and exclusive: fails when the claim exists
            except FileExistsError:
                if _holder(path) != (socket.gethostname(), os.getpid()) and _live(path):
                    return False
                path.unlink(missing_ok=True)  # a dead or abandoned worker's (or this process's earlier) claim
                continue
            return True
        return False
    finally:
        tmp.unlink(missing_ok=True)


def take(run: Run, runs_dir: Path, results_dir: Path) -> bool:
    """Claim the run unless it has finished meanwhile (its worker writes the result, then drops the claim)."""
    if not claim(run, runs_dir):
        return False
    if run.result_path(results_dir).exists():
        release(run, runs_dir)
        return False
    return True


def release(run: Run, runs_dir: Path, error: str | None = None) -> None:
    """Give the claim up: done, or failed (then a ``.failed`` note keeps the other workers off it)."""
    path = _claim_path(run, runs_dir)
    if error is not None:
        path.with_suffix(".failed").write_text(error + "\n", encoding="utf-8")
    path.unlink(missing_ok=True)


def in_progress(runs_dir: Path) -> bool:
    """Whether a live worker holds a claim: only then can a waiting run still be unlocked."""
    return any(_live(path) for path in Path(runs_dir).glob("*/*.claim"))


def _worker_argv(argv: list[str]) -> list[str]:
    """The parent's command line for one worker: without --workers/--kill-after, with --claim --wait."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--kill-after"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--kill-after=")):
            continue
        out.append(arg)
    return [*out, "--claim", "--wait", "--no-tables", "--workers", "0"]  # a worker never starts workers


def _count(results_dir: Path) -> int:
    return sum(1 for _ in Path(results_dir).glob("*/*.json"))


def run_workers(ns: argparse.Namespace, argv: list[str], script: Path) -> int:
    """Start ``ns.workers`` workers, print progress every 30 s, stop them at --kill-after; 0 if all ended well."""
    if ns.workers < 1:
        raise SystemExit("--workers must be >= 1")
    if ns.shard is not None:
        raise SystemExit("--workers and --shard exclude each other: workers share the runs by claim files.")
    log_dir = Path(ns.runs_dir) / "workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "LORA2_POOL_STARTED": repr(time.time())}

    def stop(*_: object) -> None:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # the finally below stops the workers
    start, before, last = time.monotonic(), _count(ns.results_dir), 0.0
    try:
        for i in range(ns.workers):
            log = open(log_dir / f"worker-{i}.log", "a", encoding="utf-8")
            procs.append(subprocess.Popen([sys.executable, str(script), *_worker_argv(argv)], stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True, env=env))
            time.sleep(0.5)  # staggered: the first claims go in priority order
        print(f"{ns.workers} workers started; logs in {log_dir}; {before} result files.", flush=True)
        while any(p.poll() is None for p in procs):
            elapsed = time.monotonic() - start
            if ns.kill_after is not None and elapsed > ns.kill_after:
                print(f"--kill-after {ns.kill_after:g} s: stopping the workers.", flush=True)
                break
            if elapsed - last >= 30:
                last = elapsed
                print(f"[{elapsed:5.0f} s] {_count(ns.results_dir) - before} new result files, "
                      f"{sum(p.poll() is None for p in procs)} workers running", flush=True)
            time.sleep(1)
    finally:  # Ctrl-C, SIGTERM or the deadline: never leave workers on the GPU (they have their own sessions)
        stop()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
    print(f"workers ended after {time.monotonic() - start:.0f} s: {_count(ns.results_dir) - before} new result "
          f"files.", flush=True)
    return 0 if all(p.returncode == 0 for p in procs) else 1


if __name__ == "__main__":  # a library module: its command line is the runner's
    import glue

    sys.exit(glue.main())
