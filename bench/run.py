"""keyroute sidecar benchmarks: one command, one run, every number against its reference.

    python bench/run.py            # full run, about 5 minutes
    python bench/run.py --quick    # smaller version, about 1 minute
    python bench/run.py --profile 15   # py-spy profile of the sidecar at concurrency 32 only
    python bench/run.py --tokens       # CPU cost of token counting only: --token-metrics on vs off

Starts, as separate processes: fast fake providers (bench/fastprovider.py), the minimal aiohttp
pass-through (bench/baseline_proxy.py) and ``keyroute sidecar`` with a config rendered from
``keyroute.core.config.SidecarConfig``; runs bench/loadgen.py against each; prints a markdown report
and writes JSON + markdown to bench/results/ (gitignored).

Pinning (2 cores): the proxy under test runs alone on core 0 (any other proxy is SIGSTOPped while
it is measured); the providers, the load generator and this orchestrator share core 1. Everything
listens on 127.0.0.1; every load is bounded in count or time; children get SIGTERM if this process
dies (PR_SET_PDEATHSIG) and the providers/proxies also stop by themselves after --max-seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from benchlib import CLK_TCK, core_ticks, cpu_seconds, cpu_times, free_port, percentiles, rss_kib  # noqa: E402

PY = sys.executable
KEYROUTE = str(Path(PY).parent / "keyroute")
RESULTS = BENCH / "results"
PATH = "/v1/chat/completions"
LIFETIME = 1200.0  # seconds any helper process may live at most

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
try:
    _LIBC: Any = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _LIBC = None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def http(method: str, url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


# The idle-priority busy loop of stage_busy_core; it ends by itself, should the orchestrator not.
_SPIN = (
    "import os, time\n"
    "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
    "end = time.monotonic() + 300\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)


def _c1_diagnostic(L: list[str], rows: dict[str, Any] | None, direct: dict[str, float], title: str) -> None:
    """One c=1 diagnostic table of the report, with the sidecar's added p50 over the pass-through's."""
    if not rows:
        return
    L.append(title + "\n")
    L.append("| proxy | p50 | p90 | p99 | added p50 / p99 |")
    L.append("|---|---|---|---|---|")
    for name, r in rows.items():
        x = r["latency_ms"]
        L.append(
            f"| {name} | {x['p50']:.3f} | {x['p90']:.3f} | {x['p99']:.3f} | {x['p50'] - direct['p50']:.3f} / {x['p99'] - direct['p99']:.3f} |"
        )
    added = {k: rows[k]["latency_ms"]["p50"] - direct["p50"] for k in ("baseline", "sidecar") if k in rows}
    if len(added) == 2 and added["baseline"] > 0:
        L.append(f"\nThe sidecar's added p50 here: {added['sidecar'] / added['baseline']:.2f}x the pass-through's.")
    L.append("")


def child_setup(cores: set[int] | None) -> Callable[[], None]:
    def setup() -> None:
        if cores:
            os.sched_setaffinity(0, cores)
        if _LIBC is not None:
            _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the orchestrator

    return setup


class SidecarUnavailable(RuntimeError):
    pass


class Proc:
    """A helper process, pinned, logging to a file."""

    def __init__(self, name: str, cmd: list[str], cores: set[int] | None, log_dir: Path, kind: str = ""):
        self.name, self.cmd, self.cores, self.kind = name, cmd, cores, kind
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.p = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=child_setup(cores),
        )
        self.paused = False

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def pause(self) -> None:
        if self.alive() and not self.paused:
            os.kill(self.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
            self.paused = False

    def stop(self) -> None:
        if self.alive():
            self.resume()
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._log.close()

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_tcp(port: int, proc: Proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not listening on {port} after {timeout}s: {proc.tail()}")


NOISY_PCT = 5.0


def own_user_cpu(procs: list[Proc]) -> float:
    """User CPU seconds of ``procs``, this process and its reaped children (the load generators)."""
    total = 0.0
    for p in procs:
        with contextlib.suppress(OSError):
            total += cpu_times(p.pid)[0]
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        total += resource.getrusage(who).ru_utime
    return total


def set_affinity_all(pid: int, cores: set[int]) -> None:
    """Move every thread of ``pid`` to ``cores``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cores)


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several rounds: percentiles over all samples, sums for counts and CPU."""
    lat = [x for r in runs for x in r.pop("_lat", [])]
    ttfb = [x for r in runs for x in r.pop("_ttfb", [])]
    ok = sum(r["ok"] for r in runs)
    elapsed = sum(r["elapsed_s"] for r in runs)
    out: dict[str, Any] = {
        "rounds": len(runs),
        "ok": ok,
        "completed": sum(r["completed"] for r in runs),
        "sent_total": sum(r["sent_total"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "error_reasons": {k: v for r in runs for k, v in r["error_reasons"].items()},
        "elapsed_s": round(elapsed, 3),
        "rps": round(ok / elapsed, 1) if elapsed else 0.0,
        "latency_ms": percentiles(lat),
        "per_round": [
            {
                "rps": r["rps"],
                "p50": r["latency_ms"].get("p50"),
                "p99": r["latency_ms"].get("p99"),
                "noise": r.get("noise"),
            }
            for r in runs
        ],
    }
    if ttfb:
        out["ttfb_ms"] = percentiles(ttfb)
    if "proxy_cpu_s" in runs[0]:
        cpu = sum(r["proxy_cpu_s"] for r in runs)
        out["proxy_cpu_s"] = round(cpu, 3)
        out["proxy_cpu_us_per_req"] = round(cpu * 1e6 / max(1, out["sent_total"]), 1)
    return out


def pct(a: float | None, b: float | None) -> str:
    return f"{100.0 * a / b:.0f}%" if a and b else "n/a"


def f2(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def yes(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**NOT met**")


# --- sidecar configs ------------------------------------------------------------------------------


def fake_key(tag: str) -> str:
    return f"sk-bench-{tag}-0123456789abcdef"


def sidecar_config(
    primary_url: str, fallback_url: str, primary_keys: list[str], fallback_keys: list[str]
) -> str:
    """The rendered config JSON: chain `bench` = primary entry `acme` → fallback entry `backup`,
    each with its own pool of keys (FillFirst: acme-1 first). Built and validated by SidecarConfig."""
    from keyroute.core.config import SidecarConfig, fingerprint

    def creds(prefix: str, keys: list[str]) -> list[dict[str, Any]]:
        return [
            {"name": f"{prefix}-{i}", "key": k, "fingerprint": fingerprint(k), "priority": i}
            for i, k in enumerate(keys, 1)
        ]

    data = {
        "chain": {"name": "bench", "namespace": "default"},
        "entries": [
            {"name": "acme", "provider": "acme", "baseURL": primary_url, "pool": "acme-keys"},
            {"name": "backup", "provider": "backup", "baseURL": fallback_url, "pool": "backup-keys"},
        ],
        "pools": [
            {"name": "acme-keys", "provider": "acme", "credentials": creds("acme", primary_keys)},
            {"name": "backup-keys", "provider": "backup", "credentials": creds("backup", fallback_keys)},
        ],
    }
    return SidecarConfig.parse(data).to_json()


# --- the bench --------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.quick = args.quick
        self.tmp = Path(tempfile.mkdtemp(prefix="keyroute-bench-"))
        self.procs: list[Proc] = []
        self.proxies: list[Proc] = []
        self.res: dict[str, Any] = {"mode": "quick" if self.quick else "full", "notes": []}
        self.noise_log: list[dict[str, Any]] = []
        self.retried = 0
        cores = os.sched_getaffinity(0)
        if {0, 1} <= cores:
            self.proxy_core: set[int] | None = {0}
            self.load_core: set[int] | None = {1}
            self.pinning = (
                "proxy under test alone on core 0 (other proxies SIGSTOPped while it is measured); "
                "fast providers, load generator and orchestrator on core 1"
            )
        else:
            self.proxy_core = self.load_core = None
            self.pinning = f"NOT pinned: this process may only use cores {sorted(cores)}"
        os.sched_setaffinity(0, self.load_core or cores)
        self.res["pinning"] = self.pinning

    # --- processes --------------------------------------------------------------------------------

    def spawn(self, name: str, cmd: list[str], cores: set[int] | None, kind: str = "") -> Proc:
        p = Proc(name, cmd, cores, self.tmp, kind)
        self.procs.append(p)
        if kind == "proxy":
            self.proxies.append(p)
        return p

    def drop(self, p: Proc) -> None:
        p.stop()
        if p in self.proxies:
            self.proxies.remove(p)
        if p in self.procs:
            self.procs.remove(p)

    def start_provider(self, name: str, *extra: str) -> tuple[Proc, int]:
        port = free_port()
        cmd = [
            PY,
            str(BENCH / "fastprovider.py"),
            "--port",
            str(port),
            "--max-seconds",
            str(LIFETIME),
            *extra,
        ]
        p = self.spawn(name, cmd, self.load_core)
        deadline = time.monotonic() + 15
        while True:
            if not p.alive():
                raise RuntimeError(f"provider {name} exited: {p.tail()}")
            with contextlib.suppress(OSError):
                if http("GET", f"http://127.0.0.1:{port}/stats")[0] == 200:
                    return p, port
            if time.monotonic() > deadline:
                raise RuntimeError(f"provider {name} not ready: {p.tail()}")
            time.sleep(0.05)

    def start_baseline(self, name: str, upstream: int, loop: str = "uvloop") -> tuple[Proc, int]:
        port = free_port()
        cmd = [
            PY, str(BENCH / "baseline_proxy.py"), "--port", str(port), "--upstream",
            f"http://127.0.0.1:{upstream}", "--loop", loop, "--max-seconds", str(LIFETIME),
        ]  # fmt: skip
        p = self.spawn(name, cmd, self.proxy_core, "proxy")
        wait_tcp(port, p)
        return p, port

    def start_starlette(
        self, name: str, upstream: int, loop: str, http_impl: str, limits: str
    ) -> tuple[Proc, int]:
        port = free_port()
        cmd = [
            PY, str(BENCH / "baseline_starlette.py"), "--port", str(port), "--upstream",
            f"http://127.0.0.1:{upstream}", "--loop", loop, "--http", http_impl, "--limits", limits,
            "--max-seconds", str(LIFETIME),
        ]  # fmt: skip
        p = self.spawn(name, cmd, self.proxy_core, "proxy")
        wait_tcp(port, p)
        return p, port

    def start_sidecar(
        self, name: str, config_json: str, loop: str = "auto", extra: tuple[str, ...] = ()
    ) -> tuple[Proc, int, int]:
        cfg = self.tmp / f"{name}.json"
        cfg.write_text(config_json)
        cfg.chmod(0o600)
        port, admin = free_port(), free_port()
        cmd = [
            KEYROUTE, "sidecar", "--config", str(cfg), "--listen", f"127.0.0.1:{port}",
            "--admin-listen", f"127.0.0.1:{admin}", "--log-level", "warning",
        ]  # fmt: skip
        if loop != "auto":
            cmd += ["--loop", loop]
        cmd += extra
        p = self.spawn(name, cmd, self.proxy_core, "proxy")
        deadline = time.monotonic() + 30
        while True:
            if not p.alive():
                self.drop(p)
                text = p.tail(30)
                if "ModuleNotFoundError" in text or "ImportError" in text:
                    raise SidecarUnavailable(text)
                raise RuntimeError(f"sidecar {name} exited: {text}")
            with contextlib.suppress(OSError):
                if http("GET", f"http://127.0.0.1:{admin}/readyz")[0] == 200:
                    return p, port, admin
            if time.monotonic() > deadline:
                raise RuntimeError(f"sidecar {name} not ready: {p.tail()}")
            time.sleep(0.05)

    @contextlib.contextmanager
    def alone(self, target: Proc | None) -> Iterator[None]:
        """Pause every other proxy so the one under test has core 0 to itself."""
        others = [p for p in self.proxies if p is not target]
        for p in others:
            p.pause()
        try:
            yield
        finally:
            for p in others:
                p.resume()

    def close(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop()
        self.procs.clear()
        self.proxies.clear()

    # --- one load run -----------------------------------------------------------------------------

    def load(self, port: int, target: Proc | None, *, retry_noisy: bool = True, **kw: Any) -> dict[str, Any]:
        """One load-generator run against ``port`` (``target``: the proxy process behind it, or None).

        Another process of the machine using more than NOISY_PCT of core 0 (the proxy's) or core 1
        (generator and providers) during the run makes it noisy: it is run again, at most twice,
        and the least noisy run is kept (not the fastest). Runs whose requests change state that is
        counted afterwards (failover, provider stream counts) pass ``retry_noisy=False``.
        """
        best: dict[str, Any] | None = None
        for attempt in range(3 if retry_noisy and self.load_core else 1):
            r = self._load_once(port, target, **kw)
            r["noisy_retries"] = attempt
            self.retried += attempt > 0
            noise = max(r["noise"]["core0_other_pct"] if target else 0.0, r["noise"]["core1_other_pct"])
            if best is None or noise < best["_noise"]:
                best, best["_noise"] = r, noise
            if noise <= NOISY_PCT:
                break
            log(
                f"  (noisy run: other processes used {noise:.0f}% of a core; {'again' if attempt < 2 else 'keeping the quietest'})"
            )
        assert best is not None
        best.pop("_noise", None)
        self.noise_log.append({"proxy": target is not None, **best["noise"]})
        if best["errors"]:
            log(f"  ! {best['errors']} errors: {best['error_reasons']}")
        return best

    def _load_once(
        self,
        port: int,
        target: Proc | None,
        *,
        c: int,
        n: int | None = None,
        duration: float | None = None,
        warmup: int = 0,
        stream: bool = False,
        headers: tuple[str, ...] = (),
        unique_model: str = "",
        model: str = "",
        record_headers: bool = False,
        body_bytes: int = 0,
        client: str = "raw",
        sample_rss: bool = False,
        dump: bool = False,
    ) -> dict[str, Any]:
        cmd = [PY, str(BENCH / "loadgen.py"), "--url", f"http://127.0.0.1:{port}{PATH}", "-c", str(c)]
        cmd += ["--warmup", str(warmup), "--client", client, "--max-seconds", "240"]
        if n is not None:
            cmd += ["-n", str(n)]
        if duration is not None:
            cmd += ["--duration", str(duration)]
        if stream:
            cmd.append("--stream")
        for h in headers:
            cmd += ["--header", h]
        if unique_model:
            cmd += ["--unique-model", unique_model]
        if model:
            cmd += ["--model", model]
        if record_headers:
            cmd.append("--record-headers")
        if body_bytes:
            cmd += ["--body-bytes", str(body_bytes)]
        dump_path = self.tmp / "samples"
        if dump:
            cmd += ["--dump", str(dump_path)]
        out_path = self.tmp / "loadgen.out"
        err_path = self.tmp / "loadgen.err"
        mine_core1 = [p for p in self.procs if p.cores == self.load_core and p.alive()]
        with self.alone(target), open(out_path, "wb") as out, open(err_path, "wb") as err:
            cpu0 = cpu_seconds(target.pid) if target else 0.0
            user0 = cpu_times(target.pid)[0] if target else 0.0
            own0 = own_user_cpu(mine_core1)
            core0_a, core1_a = core_ticks(0), core_ticks(1)
            t0 = time.monotonic()
            p = subprocess.Popen(
                cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, preexec_fn=child_setup(self.load_core)
            )
            peak = 0
            try:
                while p.poll() is None:
                    if sample_rss and target is not None:
                        peak = max(peak, rss_kib(target.pid))
                    if time.monotonic() - t0 > 300:
                        p.kill()
                        raise RuntimeError("load generator ran over 300 s")
                    time.sleep(0.02 if sample_rss else 0.05)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            cpu1 = cpu_seconds(target.pid) if target else 0.0
            user1 = cpu_times(target.pid)[0] if target else 0.0
            own1 = own_user_cpu(mine_core1)  # providers + this process + the (reaped) load generator
            core0_b, core1_b = core_ticks(0), core_ticks(1)
        if p.returncode != 0:
            raise RuntimeError(f"loadgen failed ({p.returncode}): {err_path.read_text()[-2000:]}")
        res: dict[str, Any] = json.loads(out_path.read_text())
        if target is not None:
            res["proxy_cpu_s"] = round(cpu1 - cpu0, 3)
            res["proxy_cpu_us_per_req"] = round((cpu1 - cpu0) * 1e6 / max(1, res["sent_total"]), 1)
        if sample_rss:
            res["proxy_peak_rss_kib"] = peak
        # Per core while this ran: host steal, and user-space CPU used by anything but this bench's
        # own processes pinned there (user time only: kernel work on behalf of the bench's sockets,
        # e.g. connection churn handled by ksoftirqd, is not another process's load).
        res["noise"] = {}
        for core, a, b, own in ((0, core0_a, core0_b, user1 - user0), (1, core1_a, core1_b, own1 - own0)):
            d = [y - x for x, y in zip(a, b, strict=True)]
            total = max(1, sum(d))
            other = max(0.0, (d[0] + d[1]) - own * CLK_TCK)
            res["noise"][f"core{core}_steal_pct"] = round(100.0 * d[7] / total, 1)
            res["noise"][f"core{core}_other_pct"] = round(100.0 * other / total, 1)
        if dump:
            for kind in ("lat", "ttfb"):
                f = Path(f"{dump_path}.{kind}")
                if f.exists():
                    res[f"_{kind}"] = array("q", f.read_bytes()).tolist()
                    f.unlink()
        return res

    @staticmethod
    def brief(r: dict[str, Any]) -> str:
        lat = r.get("latency_ms") or {}
        s = f"{r['rps']:>8.0f} req/s  p50 {lat.get('p50', 0):.3f} ms  p99 {lat.get('p99', 0):.3f} ms"
        if r.get("ttfb_ms"):
            s += f"  ttfb p50 {r['ttfb_ms']['p50']:.3f} ms"
        if "proxy_cpu_us_per_req" in r:
            s += f"  cpu {r['proxy_cpu_us_per_req']:.0f} us/req"
        if r["errors"]:
            s += f"  ERRORS {r['errors']}"
        return s

    # --- stages -----------------------------------------------------------------------------------

    def setup(self) -> None:
        log(f"pinning: {self.pinning}")
        self.prov_a, self.port_a = self.start_provider("provider-primary")
        self.prov_b, self.port_b = self.start_provider("provider-fallback")
        self.keys_a = [fake_key("acme-1"), fake_key("acme-2")]
        self.keys_b = [fake_key("backup-1"), fake_key("backup-2")]
        self.baseline, self.port_base = self.start_baseline("baseline-aiohttp", self.port_a)
        self.res["baseline_idle_rss_kib"] = rss_kib(self.baseline.pid)
        self.sidecar: Proc | None = None
        self.start_main_sidecar()

    def start_main_sidecar(self) -> None:
        cfg = sidecar_config(
            f"http://127.0.0.1:{self.port_a}/v1",
            f"http://127.0.0.1:{self.port_b}/v1",
            self.keys_a,
            self.keys_b,
        )
        wait = self.args.wait_sidecar
        while True:
            try:
                self.sidecar, self.port_side, self.admin_side = self.start_sidecar("sidecar", cfg)
                break
            except SidecarUnavailable as e:
                if wait <= 0:
                    log(f"sidecar cannot start (import error); sidecar rows are skipped:\n{e}")
                    self.res["notes"].append(
                        "keyroute sidecar could not start (import error): sidecar rows skipped"
                    )
                    self.sidecar = None
                    return
                log(f"sidecar cannot start yet (import error); retrying in 60 s ({wait:.0f} s left)")
                time.sleep(min(60, wait))
                wait -= 60
        pid = self.sidecar.pid
        self.res["sidecar_rss_kib"] = {"after_start": rss_kib(pid)}
        time.sleep(2.0)
        self.res["sidecar_rss_kib"]["idle_2s_after_start"] = rss_kib(pid)
        if self.baseline is not None:
            self.res["baseline_rss_kib"] = {"idle_2s_after_start": rss_kib(self.baseline.pid)}
        log(f"sidecar ready (pid {pid}), idle RSS {rss_kib(pid) / 1024:.1f} MiB")

    def targets(self) -> list[tuple[str, int, Proc | None]]:
        out: list[tuple[str, int, Proc | None]] = [
            ("direct", self.port_a, None),
            ("baseline", self.port_base, self.baseline),
        ]
        if self.sidecar is not None:
            out.append(("sidecar", self.port_side, self.sidecar))
        return out

    def stage_generator(self) -> None:
        log("generator check: provider direct at c=32, raw client vs aiohttp client")
        d = 1.5 if self.quick else 3.0
        raw = self.load(self.port_a, None, c=32, duration=d, warmup=500)
        aio = self.load(self.port_a, None, c=32, duration=d, warmup=500, client="aiohttp")
        log(f"  raw     {self.brief(raw)}")
        log(f"  aiohttp {self.brief(aio)}")
        self.res["generator_check"] = {"raw_client": raw, "aiohttp_client": aio}

    def stage_latency(self) -> None:
        """Every target at c=1, 8, 32, 128; rounds interleave the targets so slow drifts of the
        machine hit all of them alike; percentiles are over all samples of all rounds."""
        if self.quick:
            rounds, plan = 1, {1: (1500, 200), 8: (3000, 300), 32: (4000, 500), 128: (4000, 500)}
        else:
            rounds, plan = 3, {1: (2000, 300), 8: (4000, 500), 32: (6000, 1000), 128: (6000, 1000)}
        out: dict[str, dict[str, Any]] = {}
        for c, (n, w) in plan.items():
            runs: dict[str, list[dict[str, Any]]] = {}
            for i in range(rounds):
                order = self.targets() if i % 2 == 0 else list(reversed(self.targets()))
                for name, port, proc in order:
                    r = self.load(port, proc, c=c, n=n, warmup=w, dump=True)
                    log(f"latency c={c} round {i + 1}/{rounds} {name:<8} {self.brief(r)}")
                    runs.setdefault(name, []).append(r)
            out[str(c)] = {name: merge(rs) for name, rs in runs.items()}
        self.res["latency"] = out

    def stage_colocated(self) -> None:
        """Diagnostic: c=1 with the proxy moved onto core 1 next to the generator and provider.

        At c=1 nothing runs in parallel, so sharing a core costs nothing; what disappears is the
        wake-up of an idle vCPU on every hop, which is where this VM's tail latency comes from."""
        n, w, rounds = (1000, 200, 1) if self.quick else (2000, 300, 2)
        out: dict[str, Any] = {}
        for name, port, proc in self.targets()[1:]:
            assert proc is not None and self.load_core and self.proxy_core
            set_affinity_all(proc.pid, self.load_core)
            try:
                rs = [self.load(port, proc, c=1, n=n, warmup=w, dump=True) for _ in range(rounds)]
            finally:
                set_affinity_all(proc.pid, self.proxy_core)
            out[name] = merge(rs)
            log(f"co-located c=1 {name:<8} {self.brief(out[name])}")
        self.res["colocated_c1"] = out

    def stage_busy_core(self) -> None:
        """Diagnostic: c=1 with the proxy alone on its core as in the latency stage, but that core
        kept from halting by a busy loop at ``SCHED_IDLE`` priority (the proxy preempts it at once).

        Each hop still crosses vCPUs; what goes is the wake-up of a *halted* vCPU, after which this
        VM's caches are cold. Not a setting a sidecar could use (it would spin on a customer's node):
        it tells the cost of those wake-ups apart from the work on the path (docs/performance.md).
        Its runs are not in the noise accounting (the loop is core 0's "other" load by design)."""
        assert self.load_core and self.proxy_core
        n, w, rounds = (1000, 200, 1) if self.quick else (2000, 300, 2)
        spin = subprocess.Popen(
            [PY, "-c", _SPIN], stdin=subprocess.DEVNULL, preexec_fn=child_setup(self.proxy_core)
        )
        runs: dict[str, list[dict[str, Any]]] = {}
        try:
            for i in range(rounds):
                order = self.targets()[1:] if i % 2 == 0 else list(reversed(self.targets()[1:]))
                for name, port, proc in order:
                    runs.setdefault(name, []).append(self._load_once(port, proc, c=1, n=n, warmup=w, dump=True))
        finally:
            spin.kill()
            spin.wait()
        out = {name: merge(rs) for name, rs in runs.items()}
        for name, r in out.items():
            log(f"busy core c=1 {name:<8} {self.brief(r)}")
        self.res["busy_core_c1"] = out

    def stage_throughput(self) -> None:
        """Closed loop at c=32 for d seconds per target, in rounds; baseline and sidecar run back to
        back in each round (order alternating), so each round also gives a paired ratio."""
        rounds, d = (2, 3.0) if self.quick else (5, 4.0)
        runs: dict[str, list[dict[str, Any]]] = {}
        for i in range(rounds):
            order = self.targets() if i % 2 == 0 else list(reversed(self.targets()))
            for name, port, proc in order:
                log(f"throughput c=32 round {i + 1}/{rounds} {name}")
                r = self.load(port, proc, c=32, duration=d if proc else 2.0, warmup=1000)
                log(f"  {self.brief(r)}")
                runs.setdefault(name, []).append(r)
        summary = {
            name: {
                "rps_median": statistics.median(r["rps"] for r in rs),
                "rps_all": [r["rps"] for r in rs],
                "cpu_us_per_req_median": statistics.median(r["proxy_cpu_us_per_req"] for r in rs)
                if "proxy_cpu_us_per_req" in rs[0]
                else None,
                "p50_ms_median": statistics.median(r["latency_ms"]["p50"] for r in rs),
                "p99_ms_median": statistics.median(r["latency_ms"]["p99"] for r in rs),
            }
            for name, rs in runs.items()
        }
        if "sidecar" in runs:
            ratios = [s["rps"] / b["rps"] for s, b in zip(runs["sidecar"], runs["baseline"], strict=True)]
            summary["sidecar"]["paired_ratios"] = [round(x, 3) for x in ratios]
            summary["sidecar"]["paired_ratio_median"] = round(statistics.median(ratios), 3)
        self.res["throughput_c32"] = {"duration_s": d, "rounds": rounds, "summary": summary, "runs": runs}

    def stage_stream_ttfb(self) -> None:
        hdr = ("X-Bench-Chunks: 10", "X-Bench-Chunk-Delay-Ms: 1")
        rounds, plan = (1, {1: 100, 32: 600}) if self.quick else (2, {1: 200, 32: 1000})
        out: dict[str, dict[str, Any]] = {}
        for c, n in plan.items():
            runs: dict[str, list[dict[str, Any]]] = {}
            for i in range(rounds):
                order = self.targets() if i % 2 == 0 else list(reversed(self.targets()))
                for name, port, proc in order:
                    r = self.load(
                        port, proc, c=c, n=n, warmup=max(10, c), stream=True, headers=hdr, dump=True
                    )
                    log(f"stream c={c} round {i + 1}/{rounds} {name:<8} {self.brief(r)}")
                    runs.setdefault(name, []).append(r)
            out[str(c)] = {name: merge(rs) for name, rs in runs.items()}
        self.res["stream_ttfb"] = {"events": 10, "event_gap_ms": 1, "runs": out}

    def stage_stream_rate(self) -> None:
        """Streams relayed at c=128: events per second through each proxy (each event its own write by
        the provider, 1 ms apart: 128 streams ask for up to ~128k events/s, so the proxy is the limit),
        in rounds with baseline and sidecar back to back; the paired ratio as for req/s. CPU per event
        of the proxy process too."""
        events = 20
        hdr = (f"X-Bench-Chunks: {events}", "X-Bench-Chunk-Delay-Ms: 1")
        rounds, d = (1, 3.0) if self.quick else (3, 4.0)
        runs: dict[str, list[dict[str, Any]]] = {}
        for i in range(rounds):
            order = [t for t in self.targets() if t[2] is not None]
            if i % 2:
                order.reverse()
            for name, port, proc in order:
                r = self.load(port, proc, c=128, duration=d, warmup=128, stream=True, headers=hdr)
                # Every stream carries ``events`` events plus the [DONE] line, which is not counted.
                r["events_per_s"] = r["rps"] * events
                if "proxy_cpu_us_per_req" in r:
                    r["proxy_cpu_us_per_event"] = r["proxy_cpu_us_per_req"] / events
                log(f"stream rate c=128 round {i + 1}/{rounds} {name:<8} {r['events_per_s']:.0f} events/s; {self.brief(r)}")
                runs.setdefault(name, []).append(r)
        summary: dict[str, Any] = {
            name: {
                "events_per_s_median": statistics.median(r["events_per_s"] for r in rs),
                "events_per_s_all": [round(r["events_per_s"]) for r in rs],
                "cpu_us_per_event_median": statistics.median(r["proxy_cpu_us_per_event"] for r in rs)
                if "proxy_cpu_us_per_event" in rs[0]
                else None,
            }
            for name, rs in runs.items()
        }
        if "sidecar" in runs and "baseline" in runs:
            ratios = [
                s["events_per_s"] / b["events_per_s"] for s, b in zip(runs["sidecar"], runs["baseline"], strict=True)
            ]
            summary["sidecar"]["paired_ratios"] = [round(x, 3) for x in ratios]
            summary["sidecar"]["paired_ratio_median"] = round(statistics.median(ratios), 3)
        self.res["stream_rate"] = {
            "concurrency": 128,
            "events": events, "event_gap_ms": 1, "duration_s": d, "rounds": rounds, "summary": summary, "runs": runs
        }  # fmt: skip

    def stage_rss_streams(self) -> None:
        hdr = ("X-Bench-Chunks: 30", "X-Bench-Chunk-Delay-Ms: 50")  # ~1.5 s per stream
        n = 128 if self.quick else 256
        out: dict[str, Any] = {}
        for name, port, proc in self.targets()[1:]:
            assert proc is not None
            before = rss_kib(proc.pid)
            http("POST", f"http://127.0.0.1:{self.port_a}/stats/reset")
            log(f"128 concurrent streams through {name} (30 events, 50 ms apart: ~1.5 s each), {n} streams")
            r = self.load(
                port, proc, c=128, n=n, warmup=0, stream=True, headers=hdr, sample_rss=True, retry_noisy=False
            )
            stats = json.loads(http("GET", f"http://127.0.0.1:{self.port_a}/stats")[1])
            time.sleep(1.0)
            after = rss_kib(proc.pid)
            out[name] = {
                "rss_before_kib": before,
                "rss_peak_kib": r["proxy_peak_rss_kib"],
                "rss_after_1s_kib": after,
                "vm_hwm_kib": rss_kib(proc.pid, "VmHWM"),
                "provider_max_open_streams": stats["max_open_streams"],
                "load": r,
            }
            log(
                f"  RSS before {before / 1024:.1f} MiB, peak {r['proxy_peak_rss_kib'] / 1024:.1f} MiB, "
                f"after {after / 1024:.1f} MiB; provider saw {stats['max_open_streams']} streams open at once; "
                f"{self.brief(r)}"
            )
        self.res["rss_streams"] = out
        if self.sidecar is not None:
            self.res["sidecar_rss_kib"]["idle_end"] = rss_kib(self.sidecar.pid)

    def stage_failover(self) -> None:
        if self.sidecar is None:
            return
        n, w = (40, 10) if self.quick else (300, 50)
        # Providers that fail for some keys: one answering 429 (Retry-After: 30), one answering 500.
        fail = {
            429: [fake_key("r429-1"), fake_key("r429-a"), fake_key("r429-b")],
            500: [fake_key("e500-1"), fake_key("e500-a"), fake_key("e500-b")],
        }
        provs = {}
        for status, keys in fail.items():
            provs[status] = self.start_provider(
                f"provider-{status}", "--fail-keys", ",".join(keys), "--fail-status", str(status)
            )
        ok = fake_key("acme-ok")
        cases = [
            ("429-next-key", 429, [fail[429][0], ok], "acme/acme-2", 1, True,
             "acme-1 answers 429: same request goes on with acme-2 (same provider)"),
            ("429-fallback", 429, fail[429][1:], "backup/backup-1", 2, True,
             "acme-1 and acme-2 both answer 429: both keys are tried, then the fallback provider"),
            ("500-retry", 500, [fail[500][0], ok], "acme/acme-2", 1, False,
             "acme-1 answers 500: retried once on the same provider with acme-2"),
            ("500-fallback", 500, fail[500][1:], "backup/backup-1", 2, True,
             "acme-1 and acme-2 both answer 500: retry once (acme-2), then the fallback provider"),
        ]  # fmt: skip
        log("failover reference: direct round trip c=1")
        direct = self.load(self.port_a, None, c=1, n=2000, warmup=200)
        log(f"  {self.brief(direct)}")
        out: dict[str, Any] = {"direct": direct, "cases": {}}
        for case, status, keys, expect, extra, has_control, what in cases:
            prov, pport = provs[status]
            cfg = sidecar_config(
                f"http://127.0.0.1:{pport}/v1", f"http://127.0.0.1:{self.port_b}/v1", keys, self.keys_b
            )
            side, sport, _ = self.start_sidecar(f"sidecar-{case}", cfg)
            try:
                http("POST", f"http://127.0.0.1:{pport}/stats/reset")
                http("POST", f"http://127.0.0.1:{self.port_b}/stats/reset")
                log(f"failover {case}: {n} samples at c=1, a new model per request")
                r = self.load(
                    sport,
                    side,
                    c=1,
                    n=n,
                    warmup=w,
                    unique_model=f"fo-{case}-",
                    record_headers=True,
                    retry_noisy=False,
                )
                sp = json.loads(http("GET", f"http://127.0.0.1:{pport}/stats")[1])
                sb = json.loads(http("GET", f"http://127.0.0.1:{self.port_b}/stats")[1])
                sent = r["sent_total"]
                primary_attempts = sp["requests"] / sent
                fallback_attempts = sb["requests"] / sent
                log(
                    f"  {self.brief(r)}  served {r.get('served_by')}  upstream attempts/request: "
                    f"primary {primary_attempts:.2f} fallback {fallback_attempts:.2f}"
                )
                control = None
                if has_control:
                    # Same process, same model every time: after the first request the model's key is
                    # cooling (429) or the primary is waiting to be restored, so these take one attempt.
                    control = self.load(
                        sport,
                        side,
                        c=1,
                        n=min(n * 2, 1000),
                        warmup=20,
                        model=f"ctl-{case}",
                        record_headers=True,
                    )
                    log(f"  control (no failover): {self.brief(control)} served {control.get('served_by')}")
                out["cases"][case] = {
                    "what": what,
                    "status": status,
                    "expected_served_by": expect,
                    "extra_attempts_expected": extra,
                    "samples": r,
                    "primary_requests": sp["requests"],
                    "primary_by_key": sp["by_key"],
                    "fallback_requests": sb["requests"],
                    "attempts_per_request": round(primary_attempts + fallback_attempts, 3),
                    "control": control,
                }
            finally:
                self.drop(side)
        for prov, _ in provs.values():
            self.drop(prov)
        self.res["failover"] = out

    def stage_compare(self) -> None:
        """Server/client/loop variants, each started fresh, alone on core 0."""
        n1, d32 = (1000, 2.0) if self.quick else (2000, 3.0)
        big = 32 * 1024
        log("compare: direct reference")
        direct = {
            "c1": self.load(self.port_a, None, c=1, n=n1, warmup=300),
            "c32": self.load(self.port_a, None, c=32, duration=d32, warmup=1000),
        }
        if not self.quick:
            direct["c1_big"] = self.load(self.port_a, None, c=1, n=n1, warmup=300, body_bytes=big)
            direct["c32_big"] = self.load(self.port_a, None, c=32, duration=d32, warmup=500, body_bytes=big)
        variants: list[tuple[str, Callable[[], tuple[Proc, int]], bool]] = [
            ("aiohttp server+client, uvloop (baseline)", lambda: self.start_baseline("cmp-aiohttp-uvloop", self.port_a, "uvloop"), True),
            ("aiohttp server+client, asyncio", lambda: self.start_baseline("cmp-aiohttp-asyncio", self.port_a, "asyncio"), False),
        ]  # fmt: skip
        if self.sidecar is not None:
            cfg = sidecar_config(
                f"http://127.0.0.1:{self.port_a}/v1",
                f"http://127.0.0.1:{self.port_b}/v1",
                self.keys_a,
                self.keys_b,
            )
            variants += [
                ("keyroute sidecar --loop uvloop", lambda: self.start_sidecar("cmp-sidecar-uvloop", cfg, "uvloop")[:2], True),
                ("keyroute sidecar --loop asyncio", lambda: self.start_sidecar("cmp-sidecar-asyncio", cfg, "asyncio")[:2], False),
            ]  # fmt: skip
        try:
            import httptools  # noqa: F401
            import starlette  # noqa: F401
            import uvicorn  # noqa: F401

            variants += [
                ("starlette+httpx on uvicorn (uvloop, httptools), httpx default pool",
                 lambda: self.start_starlette("cmp-starlette-uvloop", self.port_a, "uvloop", "httptools", "default"), False),
                ("starlette+httpx on uvicorn (asyncio, h11), httpx default pool",
                 lambda: self.start_starlette("cmp-starlette-asyncio", self.port_a, "asyncio", "h11", "default"), False),
                ("starlette+httpx on uvicorn (uvloop, httptools), httpx pool keeps all connections",
                 lambda: self.start_starlette("cmp-starlette-wide", self.port_a, "uvloop", "httptools", "wide"), False),
            ]  # fmt: skip
        except ImportError:
            self.res["notes"].append(
                "starlette/uvicorn/httptools not installed: starlette+httpx rows skipped"
            )
        rows: dict[str, Any] = {}
        for label, start, with_big in variants:
            proc, port = start()
            try:
                log(f"compare: {label}")
                row = {
                    "idle_rss_kib": rss_kib(proc.pid),
                    "c1": self.load(port, proc, c=1, n=n1, warmup=300),
                    "c32": self.load(port, proc, c=32, duration=d32, warmup=1000),
                }
                log(f"  c=1  {self.brief(row['c1'])}")
                log(f"  c=32 {self.brief(row['c32'])}")
                if with_big and not self.quick:
                    row["c1_big"] = self.load(port, proc, c=1, n=n1, warmup=300, body_bytes=big)
                    row["c32_big"] = self.load(port, proc, c=32, duration=d32, warmup=500, body_bytes=big)
                    log(f"  c=1  32 KiB body {self.brief(row['c1_big'])}")
                    log(f"  c=32 32 KiB body {self.brief(row['c32_big'])}")
                rows[label] = row
            finally:
                self.drop(proc)
        self.res["compare"] = {"direct": direct, "variants": rows, "big_body_bytes": big}

    def stage_tokens(self) -> None:
        """The CPU cost of token counting: two sidecars from one config, ``--token-metrics on`` and
        ``off``, alone on core 0 in turn; rounds alternate their order, and each round gives a
        paired ratio of CPU per request (on / off). JSON answers at c=32 carry a ``usage`` object
        (the fast provider's fixed completion); streams at c=32 exercise the per-chunk scan."""
        self.prov_a, self.port_a = self.start_provider("provider-primary")
        self.prov_b, self.port_b = self.start_provider("provider-fallback")
        cfg = sidecar_config(
            f"http://127.0.0.1:{self.port_a}/v1",
            f"http://127.0.0.1:{self.port_b}/v1",
            [fake_key("acme-1"), fake_key("acme-2")],
            [fake_key("backup-1"), fake_key("backup-2")],
        )
        on, port_on, _ = self.start_sidecar("sidecar-tokens-on", cfg)
        off, port_off, _ = self.start_sidecar("sidecar-tokens-off", cfg, extra=("--token-metrics", "off"))
        rounds, d = (6, 3.0) if not self.quick else (2, 2.0)
        out: dict[str, Any] = {"rounds": rounds, "duration_s": d}
        for kind, stream in (("json_c32", False), ("stream_c32", True)):
            runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
            for i in range(rounds):
                order = [("on", port_on, on), ("off", port_off, off)]
                for label, port, proc in order if i % 2 == 0 else reversed(order):
                    log(f"tokens {kind} round {i + 1}/{rounds} --token-metrics {label}")
                    r = self.load(port, proc, c=32, duration=d, warmup=500, stream=stream)
                    log(f"  {self.brief(r)}")
                    runs[label].append(r)
            ratios = [
                a["proxy_cpu_us_per_req"] / b["proxy_cpu_us_per_req"]
                for a, b in zip(runs["on"], runs["off"], strict=True)
            ]
            out[kind] = {
                "cpu_us_per_req_on": [r["proxy_cpu_us_per_req"] for r in runs["on"]],
                "cpu_us_per_req_off": [r["proxy_cpu_us_per_req"] for r in runs["off"]],
                "paired_ratios": [round(x, 4) for x in ratios],
                "paired_ratio_median": round(statistics.median(ratios), 4),
            }
            log(f"  {kind}: CPU per request on/off, paired median {out[kind]['paired_ratio_median']:.3f}")
        out["micro"] = micro_tokens()
        off_us = statistics.median(out["json_c32"]["cpu_us_per_req_off"])
        out["micro"]["json_added_pct_of_request"] = round(100 * out["micro"]["json_added_us"] / off_us, 2)
        log(f"  in-process: {out['micro']}")
        self.res["tokens"] = out

    def stage_profile(self, seconds: float, c: int) -> None:
        """py-spy the sidecar under load at concurrency ``c``; summarise self and inclusive time per function."""
        assert self.sidecar is not None
        raw = RESULTS / f"profile-sidecar-c{c}.txt"
        svg = RESULTS / f"profile-sidecar-c{c}.svg"
        spy = str(Path(PY).parent / "py-spy")
        for fmt, path in (("raw", raw), ("flamegraph", svg)):
            log(f"profiling the sidecar for {seconds:.0f} s at c={c} ({fmt})")
            cmd = [spy, "record", "--pid", str(self.sidecar.pid), "--duration", str(int(seconds)), "--rate", "200",
                   "--nonblocking", "--format", fmt, "-o", str(path)]  # fmt: skip
            spyp = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=child_setup(self.load_core)
            )
            r = self.load(
                self.port_side, self.sidecar, c=c, duration=seconds + 1.0, warmup=500, retry_noisy=False
            )
            _, err = spyp.communicate(timeout=60)
            if spyp.returncode != 0:
                raise RuntimeError(f"py-spy failed: {err.decode()[-1000:]}")
            log(f"  {self.brief(r)}")
        self.res["profile"] = summarize_profile(raw)
        self.res["profile"]["concurrency"] = c
        self.res["profile"]["files"] = [str(raw), str(svg)]


def _func(frame: str) -> str:
    """``Proxy.handle (keyroute/sidecar/proxy.py:84)`` -> ``Proxy.handle (keyroute/sidecar/proxy.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def _group(frame: str) -> str:
    where = frame.partition(" (")[2]
    for g in (
        "keyroute/",
        "aiohttp/",
        "asyncio/",
        "yarl/",
        "multidict/",
        "prometheus_client/",
        "json/",
        "uvloop/",
    ):
        if where.startswith(g) or f"/{g}" in where:
            return g.rstrip("/")
    return "other"


def summarize_profile(path: Path, top: int = 30) -> dict[str, Any]:
    """Self and inclusive time per function (lines merged), per line, and self time per package."""
    self_f: dict[str, int] = {}
    self_l: dict[str, int] = {}
    incl: dict[str, int] = {}
    groups: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += k
        leaf = frames[-1]
        self_l[leaf] = self_l.get(leaf, 0) + k
        self_f[_func(leaf)] = self_f.get(_func(leaf), 0) + k
        groups[_group(leaf)] = groups.get(_group(leaf), 0) + k
        for f in {_func(x) for x in frames}:
            incl[f] = incl.get(f, 0) + k

    def rank(d: dict[str, int], n: int = top) -> list[tuple[str, float]]:
        return [
            (f, round(100.0 * v / max(total, 1), 1)) for f, v in sorted(d.items(), key=lambda x: -x[1])[:n]
        ]

    return {
        "samples": total,
        "self_by_package_pct": rank(groups, 20),
        "self_pct": rank(self_f),
        "self_by_line_pct": rank(self_l),
        "inclusive_pct": rank(incl, 60),
    }


# --- report -----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cores": os.cpu_count(),
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    for mod in ("aiohttp", "uvloop", "keyroute", "starlette", "uvicorn", "httpx", "httptools"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            info[mod] = version(mod)
    return info


def machine_busy(seconds: float = 1.0) -> list[float]:
    """Per-core busy % (user+nice+system) over ``seconds``: is anything else running?"""
    a = [core_ticks(i) for i in range(os.cpu_count() or 1)]
    time.sleep(seconds)
    b = [core_ticks(i) for i in range(os.cpu_count() or 1)]
    out = []
    for x, y in zip(a, b, strict=True):
        d = [q - p for p, q in zip(x, y, strict=True)]
        out.append(round(100.0 * (d[0] + d[1] + d[2]) / max(1, sum(d)), 1))
    return out


def steal_ticks() -> int:
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return int(parts[8]) if len(parts) > 8 else 0


def evaluate(res: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    t: list[tuple[str, str, bool | None]] = []
    lat = res.get("latency", {}).get("1", {})
    if "sidecar" in lat:
        d, s = lat["direct"]["latency_ms"], lat["sidecar"]["latency_ms"]
        a50, a99 = s["p50"] - d["p50"], s["p99"] - d["p99"]
        t.append(("added latency at c=1, p50 ≤ 0.6 ms", f"{a50:.3f} ms", a50 <= 0.6))
        t.append(("added latency at c=1, p99 ≤ 2 ms", f"{a99:.3f} ms", a99 <= 2.0))
    tp = res.get("throughput_c32", {}).get("summary", {})
    if "sidecar" in tp:
        ratio = tp["sidecar"]["rps_median"] / tp["baseline"]["rps_median"]
        paired = tp["sidecar"]["paired_ratio_median"]
        t.append(
            (
                "throughput at c=32 on one core ≥ 70% of the aiohttp pass-through (median of paired rounds)",
                f"{100 * paired:.0f}% (rounds: {', '.join(f'{100 * x:.0f}%' for x in tp['sidecar']['paired_ratios'])}; "
                f"medians {tp['sidecar']['rps_median']:.0f} vs {tp['baseline']['rps_median']:.0f} req/s = {100 * ratio:.0f}%)",
                paired >= 0.70,
            )
        )
        cpu = tp["sidecar"]["cpu_us_per_req_median"]
        t.append(("CPU per request ≤ 300 µs (c=32)", f"{cpu:.0f} µs", cpu <= 300))
        cpu1 = res["latency"]["1"]["sidecar"]["proxy_cpu_us_per_req"]
        t.append(("CPU per request ≤ 300 µs (c=1)", f"{cpu1:.0f} µs", cpu1 <= 300))
    rss = res.get("sidecar_rss_kib")
    if rss:
        idle = rss["idle_2s_after_start"] / 1024
        t.append(("RSS idle ≤ 60 MB", f"{idle:.1f} MiB", idle * 1.048576 <= 60))
    rs = res.get("rss_streams", {}).get("sidecar")
    if rs:
        peak = rs["rss_peak_kib"] / 1024
        t.append(
            (
                "RSS ≤ 100 MB with 128 concurrent streams",
                f"{peak:.1f} MiB peak ({rs['provider_max_open_streams']} open at once)",
                peak * 1.048576 <= 100,
            )
        )
    t.extend(ratio_goals(res))
    fo = res.get("failover")
    if fo:
        rt = fo["direct"]["latency_ms"]["p50"]
        ref = res["latency"]["1"]["sidecar"]["latency_ms"]["p50"]
        for case, c in fo["cases"].items():
            extra_ms = c["samples"]["latency_ms"]["p50"] - ref
            over = extra_ms - c["extra_attempts_expected"] * rt
            t.append(
                (
                    f"failover {case}: ≤ {c['extra_attempts_expected']} extra round trip(s) + 2 ms (p50)",
                    f"+{extra_ms:.3f} ms over a plain sidecar request = {c['extra_attempts_expected']} x {rt:.3f} ms + {over:.3f} ms",
                    over <= 2.0,
                )
            )
    return t


def ratio_goals(res: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The goals of issue 13: the sidecar against the aiohttp pass-through, measured in the same run."""
    t: list[tuple[str, str, bool | None]] = []
    tp = res.get("throughput_c32", {}).get("summary", {})
    if "sidecar" in tp and "baseline" in tp:
        paired = tp["sidecar"]["paired_ratio_median"]
        t.append(("req/s at c=32 ≥ 90% of the pass-through's (paired median)", f"{100 * paired:.0f}%", paired >= 0.90))
        cs, cb = tp["sidecar"]["cpu_us_per_req_median"], tp["baseline"]["cpu_us_per_req_median"]
        if cs and cb:
            t.append(
                (
                    "CPU per request at c=32 ≤ 1.15x the pass-through's",
                    f"{cs / cb:.2f}x ({cs:.0f} vs {cb:.0f} µs)",
                    cs / cb <= 1.15,
                )
            )
    lat = res.get("latency", {}).get("1", {})
    if "sidecar" in lat and "baseline" in lat:
        d = lat["direct"]["latency_ms"]["p50"]
        a_s, a_b = lat["sidecar"]["latency_ms"]["p50"] - d, lat["baseline"]["latency_ms"]["p50"] - d
        if a_b > 0:
            t.append(
                (
                    "added p50 at c=1 ≤ 1.1x the pass-through's",
                    f"{a_s / a_b:.2f}x (+{1000 * a_s:.0f} vs +{1000 * a_b:.0f} µs)",
                    a_s / a_b <= 1.1,
                )
            )
    sr = res.get("stream_rate", {}).get("summary", {})
    if "sidecar" in sr and "paired_ratio_median" in sr["sidecar"]:
        paired = sr["sidecar"]["paired_ratio_median"]
        t.append(
            (
                "streams at c=128: events/s ≥ 90% of the pass-through's (paired median)",
                f"{100 * paired:.0f}% ({sr['sidecar']['events_per_s_median']:.0f} vs "
                f"{sr['baseline']['events_per_s_median']:.0f} events/s)",
                paired >= 0.90,
            )
        )
    rss = res.get("sidecar_rss_kib")
    if rss:
        idle = rss["idle_2s_after_start"] / 1024
        base = res.get("baseline_rss_kib", {}).get("idle_2s_after_start")
        extra = f" (pass-through {base / 1024:.1f} MiB)" if base else ""
        t.append(("RSS idle ≤ 45 MB", f"{idle * 1.048576:.1f} MB{extra}", idle * 1.048576 <= 45))
    return t


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    L: list[str] = []
    L.append(f"# keyroute sidecar benchmark ({res['mode']} run, {res['date']})\n")
    L.append(
        f"Machine: {m.get('cpu', '?')}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, "
        f"aiohttp {m.get('aiohttp', '?')}, uvloop {m.get('uvloop', '?')}, keyroute {m.get('keyroute', '?')}. "
        f"Run took {res['elapsed_s']:.0f} s; CPU steal during the run: {res['steal_pct']:.1f}%; load average "
        f"(1/5/15 min) {res.get('loadavg_start', '?')} at the start, {res.get('loadavg_end', '?')} at the end.\n"
    )
    L.append(f"Pinning: {res['pinning']}.\n")
    nz = res.get("noise")
    if nz:
        L.append(
            f"Noise: host steal averaged {nz['core0_steal_pct_mean']}% of core 0 during proxy runs (max "
            f"{nz['core0_steal_pct_max']}%) and {nz['core1_steal_pct_mean']}% of core 1. Other processes of the "
            f"machine used (user CPU) at most {nz['core0_other_pct_max']}% of core 0 during a proxy run and "
            f"{nz['core1_other_pct_max']}% of core 1; a run where they used more than {NOISY_PCT:.0f}% of either "
            f"core is repeated (at most twice, the quietest kept): {nz['retried_runs']} repeats, "
            f"{nz['runs_still_noisy']} of {nz['load_runs']} kept runs still above. Busy before the run (per core): "
            f"{res.get('machine_busy_before_pct')}%.\n"
        )
    L.append(
        "Requests: `POST /v1/chat/completions`, ~110-byte JSON body, 434-byte JSON answer (or SSE); "
        "closed loop, each of C workers on its own keep-alive connection; raw-socket client on uvloop. "
        "Sidecar: `keyroute sidecar --config <rendered SidecarConfig> --log-level warning` (default loop: "
        "uvloop), chain acme (2 keys) → backup (2 keys). Baseline: bench/baseline_proxy.py (aiohttp server "
        "+ one ClientSession, uvloop).\n"
    )
    g = res.get("generator_check")
    if g:
        tps = res.get("throughput_c32", {}).get("summary", {})
        best = max((v["rps_median"] for k, v in tps.items() if k != "direct"), default=0.0)
        verdict = (
            f"the fastest proxy reached {best:.0f} req/s, {100 * best / g['raw_client']['rps']:.0f}% of that, "
            "so neither the generator nor the provider is the limit"
            if best and best < 0.5 * g["raw_client"]["rps"]
            else "CHECK: a proxy came close to what the generator and provider can do alone"
        )
        L.append(
            f"Generator check (provider direct, c=32, both on core 1): raw-socket client "
            f"{g['raw_client']['rps']:.0f} req/s, aiohttp client {g['aiohttp_client']['rps']:.0f} req/s; {verdict}.\n"
        )
    for note in res["notes"]:
        L.append(f"Note: {note}\n")

    lat = res.get("latency")
    if lat:
        L.append("## Latency, non-streaming (ms)\n")
        L.append(
            "| C | direct p50 | direct p99 | baseline p50 | baseline p99 | sidecar p50 | sidecar p99 | "
            "added by baseline p50 / p99 | added by sidecar p50 / p99 | sidecar - baseline p50 / p99 | "
            "req/s direct / baseline / sidecar |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for c, row in lat.items():
            d = row["direct"]["latency_ms"]
            b = row["baseline"]["latency_ms"]
            s = row.get("sidecar", {}).get("latency_ms")
            L.append(
                f"| {c} | {d['p50']:.3f} | {d['p99']:.3f} | {b['p50']:.3f} | {b['p99']:.3f} | "
                f"{f2(s and s['p50'])} | {f2(s and s['p99'])} | {b['p50'] - d['p50']:.3f} / {b['p99'] - d['p99']:.3f} | "
                + (f"{s['p50'] - d['p50']:.3f} / {s['p99'] - d['p99']:.3f}" if s else "n/a")
                + " | "
                + (f"{s['p50'] - b['p50']:.3f} / {s['p99'] - b['p99']:.3f}" if s else "n/a")
                + f" | {row['direct']['rps']:.0f} / {row['baseline']['rps']:.0f} / "
                + (f"{row['sidecar']['rps']:.0f}" if s else "n/a")
                + " |"
            )
        L.append(
            f"\n'Added' is proxy minus direct, percentile by percentile, same run; {lat['1']['direct'].get('rounds', 1)} "
            "interleaved round(s) per cell, percentiles over all their samples.\n"
        )
        d = lat["1"]["direct"]["latency_ms"]
        _c1_diagnostic(
            L,
            res.get("colocated_c1"),
            d,
            "Diagnostic, c=1 with the proxy moved next to the generator on core 1 (nothing runs in parallel at c=1, "
            "so this removes only the cross-vCPU wake-ups; not the configuration the targets are judged on):",
        )
        _c1_diagnostic(
            L,
            res.get("busy_core_c1"),
            d,
            "Diagnostic, c=1 with the proxy alone on core 0 as in the table above, that core kept from halting by "
            "a SCHED_IDLE busy loop (the proxy preempts it; every hop still crosses vCPUs, but none wakes a halted "
            "one; not the configuration the targets are judged on):",
        )

    tp = res.get("throughput_c32")
    if tp:
        L.append(
            f"## Throughput at c=32 (median of {tp['rounds']} rounds; {tp['duration_s']:.0f} s per proxy run, 2 s direct)\n"
        )
        L.append("| target | req/s (median) | all rounds | p50 ms | p99 ms | proxy CPU µs/request |")
        L.append("|---|---|---|---|---|---|")
        for name, s in tp["summary"].items():
            cpu = s["cpu_us_per_req_median"]
            L.append(
                f"| {name} | {s['rps_median']:.0f} | {', '.join(f'{x:.0f}' for x in s['rps_all'])} | "
                f"{s['p50_ms_median']:.3f} | {s['p99_ms_median']:.3f} | {f2(cpu, 0) if cpu else '-'} |"
            )
        if "sidecar" in tp["summary"]:
            sc = tp["summary"]["sidecar"]
            L.append(
                f"\nSidecar throughput = {pct(sc['rps_median'], tp['summary']['baseline']['rps_median'])} of the aiohttp "
                f"pass-through (ratio of medians); per round, back to back: "
                f"{', '.join(f'{100 * x:.0f}%' for x in sc['paired_ratios'])} (median {100 * sc['paired_ratio_median']:.0f}%).\n"
            )
        if lat:
            L.append(
                "CPU per request (proxy process utime+stime from /proc, warm-up included, ÷ requests):\n"
            )
            L.append("| proxy | c=1 | c=8 | c=32 | c=128 |")
            L.append("|---|---|---|---|---|")
            for name in ("baseline", "sidecar"):
                if name in lat["1"]:
                    L.append(
                        f"| {name} | "
                        + " | ".join(f"{lat[c][name]['proxy_cpu_us_per_req']:.0f} µs" for c in lat)
                        + " |"
                    )
            L.append("")

    rss = res.get("sidecar_rss_kib")
    rs = res.get("rss_streams")
    if rss or rs:
        L.append("## Memory (VmRSS)\n")
        L.append(
            "| process | idle after start | before streams | peak, 128 concurrent streams | 1 s after | streams open at once (provider) |"
        )
        L.append("|---|---|---|---|---|---|")
        for name, r in (rs or {}).items():
            idle = (
                (rss or {}).get("idle_2s_after_start")
                if name == "sidecar"
                else res.get("baseline_idle_rss_kib")
            )
            L.append(
                f"| {name} | {f2(idle and idle / 1024, 1)} MiB | {r['rss_before_kib'] / 1024:.1f} MiB | "
                f"{r['rss_peak_kib'] / 1024:.1f} MiB | {r['rss_after_1s_kib'] / 1024:.1f} MiB | {r['provider_max_open_streams']} |"
            )
        L.append("")

    sr = res.get("stream_rate")
    if sr:
        L.append(
            f"## Streams relayed at c={sr['concurrency']} (median of {sr['rounds']} rounds of {sr['duration_s']:.0f} s; "
            f"{sr['events']} SSE events per stream, {sr['event_gap_ms']} ms apart, each its own write)\n"
        )
        L.append("| proxy | events/s (median) | per round | CPU per event | vs pass-through (paired median) |")
        L.append("|---|---|---|---|---|")
        for name, row in sr["summary"].items():
            cpu = row.get("cpu_us_per_event_median")
            vs = f"{100 * row['paired_ratio_median']:.0f}%" if "paired_ratio_median" in row else ""
            L.append(
                f"| {name} | {row['events_per_s_median']:.0f} | {', '.join(str(x) for x in row['events_per_s_all'])} | "
                f"{f'{cpu:.1f} µs' if cpu else 'n/a'} | "
                f"{vs} |"
            )
        L.append("")

    st = res.get("stream_ttfb")
    if st:
        L.append(
            f"## Streaming time to first body byte ({st['events']} SSE events, {st['event_gap_ms']} ms apart; first event sent with the head)\n"
        )
        L.append(
            "| C | direct TTFB p50 / p99 | baseline p50 / p99 | sidecar p50 / p99 | sidecar overhead vs direct p50 / p99 | sidecar whole stream p50 |"
        )
        L.append("|---|---|---|---|---|---|")
        for c, row in st["runs"].items():
            d, b = row["direct"]["ttfb_ms"], row["baseline"]["ttfb_ms"]
            s = row.get("sidecar", {}).get("ttfb_ms")
            L.append(
                f"| {c} | {d['p50']:.3f} / {d['p99']:.3f} | {b['p50']:.3f} / {b['p99']:.3f} | "
                + (f"{s['p50']:.3f} / {s['p99']:.3f} | {s['p50'] - d['p50']:.3f} / {s['p99'] - d['p99']:.3f} | "
                   f"{row['sidecar']['latency_ms']['p50']:.3f}" if s else "n/a | n/a | n/a")
                + " |"
            )  # fmt: skip
        L.append("")

    fo = res.get("failover")
    if fo:
        rt = fo["direct"]["latency_ms"]["p50"]
        ref = res["latency"]["1"]["sidecar"]["latency_ms"]["p50"]
        L.append("## Failover (c=1, a new model name per request so every sample really fails over)\n")
        L.append(
            f"One direct round trip (loadgen → provider) p50 = {rt:.3f} ms; a plain sidecar request (c=1, "
            f"no failover) p50 = {ref:.3f} ms. 'Extra' = failover p50 - plain sidecar p50.\n"
        )
        L.append(
            "| case | samples | served by | upstream attempts / request | p50 ms | p99 ms | extra ms | extra in direct round trips | same-process control p50 |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|")
        for case, c in fo["cases"].items():
            s = c["samples"]
            lat1 = s["latency_ms"]
            extra = lat1["p50"] - ref
            ctl = c["control"]
            L.append(
                f"| {case} | {s['ok']} ok / {s['errors']} err | {', '.join(f'{k}x{v}' for k, v in s.get('served_by', {}).items())} | "
                f"{c['attempts_per_request']:.2f} | {lat1['p50']:.3f} | {lat1['p99']:.3f} | {extra:.3f} | {extra / rt:.1f} | "
                + (
                    f"{ctl['latency_ms']['p50']:.3f} ({', '.join(ctl.get('served_by', {}))})"
                    if ctl
                    else "n/a"
                )
                + " |"
            )
        L.append("")
        for case, c in fo["cases"].items():
            L.append(f"- {case}: {c['what']}.")
        L.append("")

    cmp_ = res.get("compare")
    if cmp_:
        d1 = cmp_["direct"]["c1"]["latency_ms"]
        L.append("## Server / client / event loop comparison (each started fresh, alone on core 0)\n")
        L.append(
            f"Direct reference in this stage: c=1 p50 {d1['p50']:.3f} ms, p99 {d1['p99']:.3f} ms; "
            f"c=32 {cmp_['direct']['c32']['rps']:.0f} req/s.\n"
        )
        L.append(
            "| variant | idle RSS | c=1 p50 | c=1 p99 | added p50 | added p99 | c=32 req/s | c=32 p99 ms | CPU µs/req c=32 | errors |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for label, row in cmp_["variants"].items():
            a, b = row["c1"]["latency_ms"], row["c32"]
            L.append(
                f"| {label} | {row['idle_rss_kib'] / 1024:.0f} MiB | {a['p50']:.3f} | {a['p99']:.3f} | {a['p50'] - d1['p50']:.3f} | "
                f"{a['p99'] - d1['p99']:.3f} | {b['rps']:.0f} | {b['latency_ms'].get('p99', 0):.1f} | "
                f"{b['proxy_cpu_us_per_req']:.0f} | {row['c1']['errors'] + b['errors']} |"
            )
        bigs = {k: v for k, v in cmp_["variants"].items() if "c1_big" in v}
        if bigs and "c1_big" in cmp_["direct"]:
            db = cmp_["direct"]["c1_big"]["latency_ms"]
            L.append(
                f"\nWith a {cmp_['big_body_bytes'] // 1024} KiB request body (direct c=1 p50 {db['p50']:.3f} ms):\n"
            )
            L.append("| variant | c=1 p50 | added p50 | c=32 req/s | CPU µs/req c=32 |")
            L.append("|---|---|---|---|---|")
            for label, row in bigs.items():
                a, b = row["c1_big"]["latency_ms"], row["c32_big"]
                L.append(
                    f"| {label} | {a['p50']:.3f} | {a['p50'] - db['p50']:.3f} | {b['rps']:.0f} | {b['proxy_cpu_us_per_req']:.0f} |"
                )
        L.append("")

    prof = res.get("profile")
    if prof:
        L.append(
            f"## Profile of the sidecar at c={prof['concurrency']} (py-spy, {prof['samples']} non-idle samples)\n"
        )
        L.append(
            "Self time by package: "
            + ", ".join(f"{g} {p}%" for g, p in prof["self_by_package_pct"])
            + ". Stacks resumed from the event loop start at the coroutine, so 'inclusive' is per "
            "function as far as py-spy sees it.\n"
        )
        L.append("| self % | function |")
        L.append("|---|---|")
        for f, p in prof["self_pct"][:20]:
            L.append(f"| {p} | `{f}` |")
        L.append("\n| inclusive % | keyroute function |")
        L.append("|---|---|")
        for f, p in [x for x in prof["inclusive_pct"] if "keyroute/" in x[0]][:25]:
            L.append(f"| {p} | `{f}` |")
        L.append("")

    targets = res.get("targets")
    if targets:
        L.append("## Targets\n")
        L.append("| target | measured | |")
        L.append("|---|---|---|")
        for name, measured, ok in targets:
            L.append(f"| {name} | {measured} | {yes(ok)} |")
        L.append("")
    return "\n".join(L)


def micro_tokens(n: int = 20000) -> dict[str, float]:
    """The exact work token counting adds, timed in this process (CPU time, so another process on
    the core slows it less than the end-to-end runs): reading a JSON answer's usage and counting it,
    and a 20-event stream's scan with and without usage tracking."""
    from fastprovider import COMPLETION, sse_event
    from keyroute.core.streams import StreamWatch
    from keyroute.core.usage import body_usage
    from keyroute.sidecar.metrics import Metrics

    metrics = Metrics()

    def json_path() -> None:
        counts = body_usage(COMPLETION)
        if counts:
            metrics.tokens_used("bench", "acme", "acme-1", "gpt-bench", counts)

    final = (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","choices":[],'
        b'"usage":{"prompt_tokens":12,"completion_tokens":21,"total_tokens":33}}\n\n'
    )
    chunks = [sse_event(i, 20) for i in range(20)] + [final, b"data: [DONE]\n\n"]

    def stream(track: bool) -> None:
        w = StreamWatch(usage=track)
        for c in chunks:
            w.feed(c)
        if w.usage:
            metrics.tokens_used("bench", "acme", "acme-1", "gpt-bench", w.usage)

    def per_call_us(*fns: Callable[[], None], reps: int = 9) -> list[float]:
        """The least disturbed of ``reps`` timings of each function, interleaved so that a slow
        spell of the machine hits them alike."""
        best = [float("inf")] * len(fns)
        for _ in range(reps):
            for i, fn in enumerate(fns):
                t0 = time.process_time()
                for _ in range(n):
                    fn()
                best[i] = min(best[i], time.process_time() - t0)
        return [b * 1e6 / n for b in best]

    on, off = per_call_us(lambda: stream(True), lambda: stream(False))
    return {
        "json_added_us": round(per_call_us(json_path)[0], 2),
        "stream_22_events_on_us": round(on, 2),
        "stream_22_events_off_us": round(off, 2),
        "stream_added_us": round(on - off, 2),
    }


def tokens_report(res: dict[str, Any]) -> str:
    """The ``--tokens`` run as markdown."""
    t = res["tokens"]
    m = res["machine"]
    lines = [
        f"# keyroute token counting CPU cost ({res['date']})",
        "",
        f"Machine: {m.get('cpu', '?')}, {m['cores']} cores, Python {m['python']}; {res['pinning']}. "
        f"{t['rounds']} rounds of {t['duration_s']:g} s per sidecar per load, order alternating.",
        "",
        "| load | CPU µs/req, on | CPU µs/req, off | on/off per round | median |",
        "|---|---|---|---|---|",
    ]
    for kind in ("json_c32", "stream_c32"):
        r = t[kind]
        lines.append(
            f"| {kind} | {', '.join(f'{x:.0f}' for x in r['cpu_us_per_req_on'])} "
            f"| {', '.join(f'{x:.0f}' for x in r['cpu_us_per_req_off'])} "
            f"| {', '.join(f'{x:.3f}' for x in r['paired_ratios'])} | **{r['paired_ratio_median']:.3f}** |"
        )
    mi = t["micro"]
    lines += [
        "",
        f"In-process (CPU time of the added work alone): JSON answer {mi['json_added_us']:.1f} µs per request "
        f"({mi['json_added_pct_of_request']:.2f}% of the sidecar's median CPU per request with counting off); "
        f"a 22-event stream {mi['stream_added_us']:.1f} µs ({mi['stream_22_events_off_us']:.1f} → "
        f"{mi['stream_22_events_on_us']:.1f} µs for the scan).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller version, about a minute")
    p.add_argument("--no-compare", action="store_true", help="skip the server/client/loop comparison")
    p.add_argument("--compare", action="store_true", help="run the comparison in a --quick run too")
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="only profile the sidecar with py-spy for SECONDS (at --profile-c)")  # fmt: skip
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to SECONDS for other processes to leave both cores idle")  # fmt: skip
    p.add_argument("--profile-c", type=int, default=32, help="concurrency while profiling (default 32)")
    p.add_argument("--tokens", action="store_true",
                   help="only measure the CPU cost of token counting (--token-metrics on vs off)")  # fmt: skip
    p.add_argument("--wait-sidecar", type=float, default=0.0, metavar="SECONDS",
                   help="if the sidecar cannot import yet, retry every 60 s for this long")  # fmt: skip
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    bench = Bench(args)
    started = time.monotonic()
    steal0 = steal_ticks()
    res = bench.res
    res["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    res["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    res["machine"] = machine()
    busy = machine_busy()
    deadline = time.monotonic() + args.wait_quiet
    while max(busy) > 10 and time.monotonic() < deadline:
        log(f"machine busy (per-core busy % {busy}); waiting for it to be quiet")
        time.sleep(4.0)
        busy = machine_busy(3.0)
    res["machine_busy_before_pct"] = busy
    if max(busy) > 10:
        log(f"warning: the machine is busy before the run (per-core busy % {busy}); numbers will be noisy")
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.tokens:
        res["mode"] = "tokens"
        try:
            bench.stage_tokens()
        finally:
            bench.close()
            shutil.rmtree(bench.tmp, ignore_errors=True)  # rendered configs (fake keys)
        text = tokens_report(res)
        (RESULTS / "latest-tokens.json").write_text(json.dumps(res, indent=1, default=str))
        (RESULTS / "latest-tokens.md").write_text(text)
        print(text)
        return 0
    try:
        bench.setup()
        if args.profile:
            if bench.sidecar is None:
                log("no sidecar to profile")
                return 2
            bench.stage_profile(args.profile, args.profile_c)
        else:
            bench.stage_generator()
            bench.stage_latency()
            if bench.load_core:
                bench.stage_colocated()
                bench.stage_busy_core()
            bench.stage_throughput()
            bench.stage_stream_ttfb()
            bench.stage_stream_rate()
            bench.stage_rss_streams()
            if bench.sidecar is not None:
                bench.drop(bench.sidecar)
            bench.stage_failover()
            if not args.no_compare and (args.compare or not args.quick):
                bench.drop(bench.baseline)
                bench.stage_compare()
    except BaseException:
        log(f"failed; process logs are in {bench.tmp}")
        raise
    finally:
        bench.close()
        signal.signal(signal.SIGTERM, old)
    elapsed = time.monotonic() - started
    res["elapsed_s"] = elapsed
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    ticks = elapsed * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    res["steal_pct"] = 100.0 * (steal_ticks() - steal0) / max(ticks, 1)
    nl = bench.noise_log
    if nl:
        px = [x for x in nl if x["proxy"]]
        res["noise"] = {
            "load_runs": len(nl),
            "core0_steal_pct_mean": round(statistics.mean(x["core0_steal_pct"] for x in px), 2)
            if px
            else None,
            "core0_steal_pct_max": max((x["core0_steal_pct"] for x in px), default=None),
            "core1_steal_pct_mean": round(statistics.mean(x["core1_steal_pct"] for x in nl), 2),
            "core0_other_pct_max": max((x["core0_other_pct"] for x in px), default=None),
            "core1_other_pct_max": max(x["core1_other_pct"] for x in nl),
            "runs_still_noisy": sum(
                max(x["core0_other_pct"] if x["proxy"] else 0, x["core1_other_pct"]) > NOISY_PCT for x in nl
            ),
            "retried_runs": bench.retried,
        }
    res["targets"] = evaluate(res) if not args.profile else []
    text = report(res)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = "profile" if args.profile else res["mode"]
    (RESULTS / f"{stamp}-{kind}.json").write_text(json.dumps(res, indent=1, default=str))
    (RESULTS / f"{stamp}-{kind}.md").write_text(text)
    (RESULTS / f"latest-{kind}.json").write_text(json.dumps(res, indent=1, default=str))
    (RESULTS / f"latest-{kind}.md").write_text(text)
    logs = RESULTS / f"{stamp}-{kind}-logs"
    logs.mkdir()
    for f in bench.tmp.glob("*.log"):
        shutil.copy(f, logs / f.name)
    shutil.rmtree(bench.tmp, ignore_errors=True)  # rendered configs (fake keys) and scratch files
    print(text)
    log(f"wrote {RESULTS}/{stamp}-{kind}.json and .md ({elapsed:.0f} s); process logs in {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
