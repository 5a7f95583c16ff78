"""Run a real engine on checkpoints, in the engine's own Python: the I/O edge of this package.

The harness scripts (``harness/``) import only the engine, never gdnfuse, so an engine can
live in its own environment (vLLM pins its transformers and torch). Which Python runs them:
``python=`` if given, else ``GDNFUSE_ENGINE_PYTHON``, else this interpreter when the engine
is importable here (``pip install 'gdnfuse[vllm]'``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gdnfuse.errors import GdnfuseError, SetupError, option

HARNESS = Path(__file__).parent / "harness"
STUBS = HARNESS / "stubs"
RUNNABLE = {"vllm": "vllm", "sglang": "sglang"}
"""Engines with a harness here, and the module that says whether they are installed."""
STUBBED = {"vllm": "torchvision", "sglang": "torchvision,sgl_kernel"}
"""Modules imported at import time that cannot load beside a CPU torch (stubs/ says why)."""
TIMEOUT_S = 1200

_ERROR_LINE = re.compile(r"(?:^|[\s\]:])([A-Z]\w*(?:Error|Exception)): (.+)$")
_WRAPPERS = ("See root cause above", "See stack trace for root cause", "initialization failed")
"""Messages of engines' wrapper exceptions, which only point at the real one."""


def engine_python(name: str, python: str | os.PathLike[str] | None = None) -> str:
    """The Python that has engine ``name`` installed, or a one-line error saying how to get it."""
    if name not in RUNNABLE:
        raise GdnfuseError(
            f"{option('engine', name)}: gdnfuse cannot run {name} (runnable here: "
            f"{', '.join(RUNNABLE)}); its loading rules are read from its code, see "
            "`gdnfuse inspect`"
        )
    chosen = python or os.environ.get("GDNFUSE_ENGINE_PYTHON")
    if chosen:
        if not Path(chosen).exists():
            raise SetupError("engine Python does not exist", path=str(chosen))
        return str(chosen)
    if importlib.util.find_spec(RUNNABLE[name]) is not None:
        return sys.executable
    raise SetupError(
        f"{name} is not installed: pip install 'gdnfuse[{name}]', or set GDNFUSE_ENGINE_PYTHON "
        f"to a Python that has it"
    )


def prompts_for(vocab: int, count: int = 3, length: int = 6) -> list[list[int]]:
    """Fixed token-id prompts inside the vocabulary (no tokenizer needed)."""
    return [[(17 + 7919 * (i + 1) * (j + 3)) % vocab for j in range(length + i)]
            for i in range(count)]  # fmt: skip


def _env(name: str, tp: int, stub_log: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STUBS), env.get("PYTHONPATH")]))
    env["GDNFUSE_STUB_MODULES"] = STUBBED[name]
    env["GDNFUSE_STUB_LOG"] = stub_log
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU build's default is larger
    if tp == 1:  # the engine core in this process: 4x faster per model on 2 cores (measured)
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:  # one core group per rank
        cpus = sorted(os.sched_getaffinity(0))
        per = max(1, len(cpus) // tp)
        groups = [cpus[i * per: (i + 1) * per] or cpus[-1:] for i in range(tp)]
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(f"{g[0]}-{g[-1]}" for g in groups)
    if name == "sglang":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    return env


@dataclass(frozen=True)
class Run:
    result: Any
    log: str
    """The harness's stdout: the engine's log, with GDNFUSE-BEGIN markers per model."""
    stand_ins_called: tuple[str, ...]


def _run(name: str, script: str, args: Sequence[str], tp: int, python: str | None) -> Run:
    exe = engine_python(name, python)
    with tempfile.TemporaryDirectory(prefix="gdnfuse-engine-") as tmp:
        log = os.path.join(tmp, "stand-ins.log")
        cmd = [exe, str(HARNESS / script), *args]
        if "{workdir}" in args:
            cmd = [a.replace("{workdir}", tmp) for a in cmd]
        try:
            proc = subprocess.run(cmd, env=_env(name, tp, log), capture_output=True, text=True,
                                  timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise GdnfuseError(f"{name} did not finish within {TIMEOUT_S} s") from None
        called = tuple(Path(log).read_text().split("\n")[:-1]) if os.path.exists(log) else ()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("GDNFUSE-RESULT ")), None)
    log = proc.stdout + proc.stderr
    if line is None:
        raise GdnfuseError(f"{name} harness failed (exit {proc.returncode}): {root_cause(log)}")
    return Run(json.loads(line.removeprefix("GDNFUSE-RESULT ")), proc.stdout, called)


def root_cause(log: str) -> str:
    """The first specific ``SomeError: message`` of an engine's log (stdout and stderr: vLLM's
    workers log their tracebacks through its logger), skipping wrappers that only point at it."""
    found = [m.groups() for ln in log.splitlines() if (m := _ERROR_LINE.search(ln.strip()))]
    specific = [f for f in found if not any(w in f[1] for w in _WRAPPERS)]
    if not (specific or found):
        tail = [ln for ln in log.splitlines() if ln.strip()][-1:]
        return tail[0][:300] if tail else "no error message"
    kind, message = (specific or found)[0]
    return " ".join(f"{kind}: {message}".split())[:400]


def _sections(log: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    current = None
    for ln in log.splitlines():
        if ln.startswith("GDNFUSE-BEGIN "):
            current = ln.removeprefix("GDNFUSE-BEGIN ")
            parts[current] = ""
        elif current is not None:
            parts[current] += ln + "\n"
    return parts


def vllm_generate(
    models: Sequence[str | os.PathLike[str]],
    *,
    tp: int = 1,
    prompts: Sequence[Sequence[int]],
    max_tokens: int = 8,
    top_k: int = 5,
    python: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Greedy tokens and top-k logprobs per model (``{"refused": why}`` when vLLM refuses)."""
    paths = [str(Path(m).resolve()) for m in models]
    args = ["--tp", str(tp), "--prompts", json.dumps([list(p) for p in prompts]),
            "--max-tokens", str(max_tokens), "--top-k", str(top_k), *paths]  # fmt: skip
    run = _run("vllm", "vllm_generate.py", args, tp, python)
    if run.stand_ins_called:
        raise GdnfuseError(f"vLLM called an import-time stand-in: {run.stand_ins_called[0]}")
    logs = _sections(run.log)
    out = {}
    for path, res in run.result.items():
        if "refused" in res and any(w in res["refused"] for w in _WRAPPERS):
            res = {"refused": root_cause(logs.get(path, "") + res["refused"])}
        elif "refused" in res:
            res = {"refused": " ".join(res["refused"].split())[:400]}
        out[path] = res
    return out


def sglang_compare(
    a: str | os.PathLike[str], b: str | os.PathLike[str], *, tp: int = 1,
    python: str | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per rank: sglang's parameters from ``a`` vs from ``b`` (see harness/sglang_params.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = _run("sglang", "sglang_params.py",
               ["--tp", str(tp), "--port", str(port), "--workdir", "{workdir}",
                str(Path(a).resolve()), str(Path(b).resolve())], tp, python)  # fmt: skip
    if run.stand_ins_called:
        raise GdnfuseError(f"sglang called an import-time stand-in: {run.stand_ins_called[0]}")
    return list(run.result)


@dataclass(frozen=True)
class Comparison:
    """Greedy generations of an output against the source's."""

    same: bool
    detail: str
    max_logprob_diff: float


def compare_generations(
    ref: Mapping[str, Any], got: Mapping[str, Any], tol: float = 1e-3
) -> Comparison:
    """Equal tokens at every step, the same top-k ids and logprobs within ``tol``."""
    worst = 0.0
    for i, (r, g) in enumerate(zip(ref["outputs"], got["outputs"], strict=True)):
        if r["tokens"] != g["tokens"]:
            pairs = enumerate(zip(r["tokens"], g["tokens"], strict=False))
            step = next((s for s, (x, y) in pairs if x != y),
                        min(len(r["tokens"]), len(g["tokens"])))  # fmt: skip
            return Comparison(False, f"prompt {i}: greedy tokens differ from step {step} "
                              f"({r['tokens']} vs {g['tokens']})", float("inf"))  # fmt: skip
        for s, (x, y) in enumerate(zip(r["logprobs"], g["logprobs"], strict=True)):
            if set(x) != set(y):
                return Comparison(False, f"prompt {i} step {s}: top-k token ids differ "
                                  f"({sorted(x)} vs {sorted(y)})", float("inf"))  # fmt: skip
            worst = max(worst, max(abs(x[t] - y[t]) for t in x))
    if worst > tol:
        return Comparison(False, f"top-k logprobs differ by up to {worst:.3g} (limit {tol:g})",
                          worst)  # fmt: skip
    n = len(ref["outputs"])
    return Comparison(True, f"{n} prompts: equal greedy tokens, top-k logprobs within "
                      f"{worst:.1e} (limit {tol:g})", worst)  # fmt: skip
