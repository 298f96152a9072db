"""Instructions per request of the pass-through and the sidecar, counted by valgrind (callgrind's Ir).

On a shared 2-vCPU machine, req/s and CPU time per request move by ±30% from round to round; the
number of instructions a process executes for a request does not (±0.5% between runs). It leaves
out the kernel's share of the work (the same syscalls for both proxies) and cache misses, so it
ranks changes to the sidecar's own Python work, not the absolute cost: use it to compare a change
with the code before it, and ``run.py`` for the end-to-end figures.

Each proxy runs under ``valgrind --tool=callgrind`` (~50 times slower: counts, not times, are read), a
warm-up is sent, the counters are zeroed, N requests are sent, the counters are dumped (the dump's path is printed:
``callgrind_annotate`` it to see where the instructions go)::

    python bench/instructions.py                 # baseline and sidecar, 600 JSON requests at c=16
    python bench/instructions.py --stream        # 20-event streams (per stream)
    python bench/instructions.py --stream -c 4 --chunk-delay-ms 20   # ~one event per read: per-chunk work
    python bench/instructions.py --which sidecar --warmup 8000   # after many requests (state growth?)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import free_port
from run import BENCH, KEYROUTE, PY, child_setup, fake_key, sidecar_config


def wait_port(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=600, help="measured requests")
    p.add_argument("-c", type=int, default=16, help="concurrency")
    p.add_argument("--warmup", type=int, default=400, help="requests sent before counting")
    p.add_argument("--stream", action="store_true", help="20-event SSE streams, 1 ms apart")
    p.add_argument(
        "--chunk-delay-ms", type=int, default=1,
        help="ms between a stream's events; under valgrind at 1 ms several events arrive in one read, "
        "with e.g. '-c 4 --chunk-delay-ms 20' about one event a read, as at full speed",
    )  # fmt: skip
    p.add_argument("--which", default="baseline,sidecar")
    p.add_argument("--sidecar-args", default="", help="extra sidecar arguments, e.g. '--token-metrics off'")
    args = p.parse_args()
    cores = os.sched_getaffinity(0)
    proxy_core, load_core = ({0}, {1}) if {0, 1} <= cores else (None, None)
    if load_core:
        os.sched_setaffinity(0, load_core)
    tmp = Path(tempfile.mkdtemp(prefix="keyroute-instr-"))
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(cmd: list[str], core: set[int] | None) -> subprocess.Popen[bytes]:
        log = open(tmp / "processes.log", "ab")  # noqa: SIM115 (lives as long as the process)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=child_setup(core))
        procs.append(proc)
        return proc

    try:
        upstream = []
        for _ in range(2):
            port = free_port()
            spawn([PY, str(BENCH / "fastprovider.py"), "--port", str(port), "--max-seconds", "1800"], load_core)
            upstream.append(port)
        for port in upstream:
            wait_port(port)
        extra = ["--header", "X-Bench-Chunks: 20", "--header", f"X-Bench-Chunk-Delay-Ms: {args.chunk_delay_ms}"] if args.stream else []
        for which in args.which.split(","):
            port = free_port()
            if which == "baseline":
                cmd = [PY, str(BENCH / "baseline_proxy.py"), "--port", str(port),
                       "--upstream", f"http://127.0.0.1:{upstream[0]}"]  # fmt: skip
            else:
                cfg = tmp / "sidecar.json"
                cfg.write_text(
                    sidecar_config(
                        f"http://127.0.0.1:{upstream[0]}/v1", f"http://127.0.0.1:{upstream[1]}/v1",
                        [fake_key("acme-1"), fake_key("acme-2")], [fake_key("backup-1"), fake_key("backup-2")],
                    )
                )  # fmt: skip
                cfg.chmod(0o600)
                cmd = [KEYROUTE, "sidecar", "--config", str(cfg), "--listen", f"127.0.0.1:{port}",
                       "--admin-listen", f"127.0.0.1:{free_port()}", "--log-level", "warning",
                       *args.sidecar_args.split()]  # fmt: skip
            out = tmp / f"callgrind.{which}"
            vg = spawn(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", *cmd], proxy_core)
            wait_port(port)
            load = [PY, str(BENCH / "loadgen.py"), "--url", f"http://127.0.0.1:{port}/v1/chat/completions",
                    "-c", str(args.c), "--max-seconds", "1200", *(["--stream"] if args.stream else []), *extra]  # fmt: skip
            subprocess.run([*load, "-n", str(args.warmup)], check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-z", str(vg.pid)], check=True, capture_output=True)
            res = json.loads(subprocess.run([*load, "-n", str(args.n)], check=True, capture_output=True).stdout)
            subprocess.run(["callgrind_control", "-d", str(vg.pid)], check=True, capture_output=True)
            dump = Path(f"{out}.{vg.pid}.1")
            deadline = time.monotonic() + 30
            while not dump.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            m = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.M)
            assert m is not None, f"no totals in {dump}"
            per = int(m.group(1)) / res["sent_total"]
            what = "stream" if args.stream else "request"
            print(f"{which:<9} {per / 1e3:8.1f}k instructions per {what} ({res['sent_total']} {what}s, "
                  f"{res['errors']} errors; dump {dump})", flush=True)  # fmt: skip
            vg.terminate()
            vg.wait()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
