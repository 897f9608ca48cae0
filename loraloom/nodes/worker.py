"""Train in a separate Python process: the same :func:`~.train.train_chunk`, its progress streamed back.

A crash (out of memory, a native library's abort) ends the worker, not ComfyUI. The parent writes one JSON job
file in the run folder; the worker answers with JSON lines on stdout (``{"progress": payload}``, then
``{"result": ...}`` or ``{"cancelled": step}``) and logs to ``worker.log`` in the run folder. SIGTERM asks it to
stop at the next step boundary, with a checkpoint.

With several GPUs the worker is torchrun, which starts one worker per GPU and passes SIGTERM on to them; rank 0
answers for all, the others only log.

Run as ``python -m loraloom.nodes.worker JOB`` with the pack's root on ``PYTHONPATH``; it imports no ComfyUI
module.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..loaders.files import atomic_write_bytes
from ..training import distributed
from ..training.config import RunConfig, config_from_dict
from ..training.encoders import CachedOnly, Encoders
from ..training.session import encode_data
from .progress import ProgressReport

PACK_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the loraloom package
LOG_FILE = "worker.log"
JOB_FILE = "worker-job.json"
POLL_SECONDS = 0.25


def train_in_worker(cfg: RunConfig, schedule, report: ProgressReport, on_step: Callable[[int], None],
                    stop_requested: Callable[[], bool], processes: int = 1, encoders: Encoders | None = None
                    ) -> tuple[int, Path] | None:
    """:func:`~.train.train_chunk` in a child process (``processes`` of them, one per GPU); same result.

    Given encoders (ComfyUI's CLIP or VAE) stay here: everything the run reads is encoded into the cache first,
    and the workers read it by their ids. A run whose captions change every step cannot do that (the caller
    refuses it)."""
    run_dir = Path(cfg.output.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    given = {}
    if encoders and (encoders.text or encoders.image):
        encode_data(cfg, encoders)
        given = {kind: encoder.id for kind, encoder in (("text", encoders.text), ("image", encoders.image))
                 if encoder is not None}
    job = {"config": cfg.to_dict(), "steps": schedule.steps, "preview_every": schedule.preview_every,
           "node": report.node, "run": report.run, "output_dir": str(report.output_dir), "encoders": given}
    atomic_write_bytes(run_dir / JOB_FILE, json.dumps(job).encode())  # a file: every rank reads it
    module, args = "loraloom.nodes.worker", [str(run_dir / JOB_FILE)]
    command = ([sys.executable, "-m", module, *args] if processes == 1
               else distributed.launch_command(processes, module, args))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACK_ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
        worker = subprocess.Popen(command, cwd=PACK_ROOT, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=log, text=True)
        answer, stopped = _relay(worker, report, on_step, stop_requested)
    if "cancelled" in answer or (stopped and not answer):  # stopped before its first step: nothing to save
        return None
    if "result" not in answer:  # a result counts even if a late SIGTERM met the worker's interpreter shutdown
        tail = (run_dir / LOG_FILE).read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"the training worker exited with code {worker.returncode}; "
                           f"its log ({run_dir / LOG_FILE}) ends with:\n{tail}")
    return answer["result"]["step"], Path(answer["result"]["adapter_file"])


def _relay(worker: subprocess.Popen, report: ProgressReport, on_step: Callable[[int], None],
           stop_requested: Callable[[], bool]) -> tuple[dict[str, Any], bool]:
    """Forward the worker's progress until it exits, asking it to stop when ``stop_requested``.

    Returns its last answer and whether it was asked to stop."""
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(worker.stdout, lines), daemon=True).start()
    answer: dict[str, Any] = {}
    stopping = False
    while True:
        # Checked before every line too: a busy worker's stream must not hide a Cancel.
        if not stopping and not answer and stop_requested():
            worker.send_signal(signal.SIGTERM)
            stopping = True
        try:
            line = lines.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue
        if line is None:
            break
        message = json.loads(line)
        if "progress" in message:
            report.forward(message["progress"])
            if message["progress"]["state"] == "training":
                on_step(message["progress"]["step"])
        else:
            answer = message
    worker.wait()
    return answer, stopping


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def main() -> int:
    from .train import Schedule, train_chunk

    # Anything else printed, by Python or by native libraries (gloo, nccl), goes to the log, not into the protocol.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    job = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    cfg = config_from_dict(job["config"])
    encoders = Encoders(**{kind: CachedOnly(encoder_id) for kind, encoder_id in job["encoders"].items()})
    with distributed.process_group():
        main_rank = distributed.rank_and_world()[0] == 0

        def send(message: dict[str, Any]) -> None:
            if main_rank:  # the other ranks take the same decisions and have nothing else to say
                protocol.write(json.dumps(message) + "\n")
                protocol.flush()

        report = ProgressReport(job["node"], job["run"], cfg.train.steps, job["output_dir"],
                                lambda payload: send({"progress": payload}))
        # A stop seen by one rank stops every rank after the same step, or their collectives would part ways.
        done = train_chunk(cfg, Schedule(job["steps"], job["preview_every"]), report, lambda step: None,
                           lambda: distributed.any_rank(stop.is_set()), encoders)
    if done is None:
        send({"cancelled": report.step})
    else:
        send({"result": {"step": done[0], "adapter_file": str(done[1])}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
