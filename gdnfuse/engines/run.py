"""Run a real engine on checkpoints, in the engine's own Python: the I/O edge of this package.

The harness scripts (``harness/``) import only the engine, never gdnfuse, so an engine can
live in its own environment (vLLM pins its transformers and torch). Which Python runs engine
``E``: ``python=`` if given, else ``GDNFUSE_<E>_PYTHON`` (``GDNFUSE_TRANSFORMERS_PYTHON``,
``GDNFUSE_MLX_PYTHON``, ...), else ``GDNFUSE_ENGINE_PYTHON``, else this interpreter when the
engine is importable here (``pip install 'gdnfuse[vllm]'``). For transformers and mlx-lm,
which many environments have, a Python from the environment variables that lacks the module
is passed over for this interpreter when this one has it.

Engines: vLLM greedy-generates (:func:`vllm_generate`), sglang's loader gives every rank's
parameters and buffers (:func:`sglang_compare`), transformers and mlx-lm give full float32
logits (:func:`transformers_logits`, :func:`mlx_logits`; returned as torch tensors).
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gdnfuse.errors import GdnfuseError, SetupError, option

HARNESS = Path(__file__).parent / "harness"
STUBS = HARNESS / "stubs"
RUNNABLE = {"vllm": "vllm", "sglang": "sglang", "transformers": "transformers", "mlx": "mlx_lm"}
"""Engines with a harness here, and the module that says whether they are installed."""
STUBBED = {"vllm": "torchvision", "sglang": "torchvision,sgl_kernel"}
"""Modules imported at import time that cannot load beside a CPU torch (stubs/ says why).
transformers and mlx-lm need none."""
COMMON = ("transformers", "mlx")
"""Engines many environments have: a chosen Python without them falls back to this one."""
PROMPT_LENGTH = 32
"""Shortest prompt (positions): long enough that RoPE's base shows in the logits and the
GDN recurrence runs over several conv windows."""
TIMEOUT_S = 1200

_ERROR_LINE = re.compile(r"(?:^|[\s\]:])([A-Z]\w*(?:Error|Exception)): (.+)$")
_WARNING = re.compile(r"\bWARNING \d\d-\d\d \d\d:\d\d:\d\d ")
"""A line of a warning in vLLM's log (a traceback it logs and carries on after)."""
_WRAPPERS = ("See root cause above", "See stack trace for root cause", "initialization failed")
"""Messages of engines' wrapper exceptions, which only point at the real one."""


def python_variable(name: str) -> str:
    """The per-engine environment variable naming its Python: ``GDNFUSE_VLLM_PYTHON``, ..."""
    return f"GDNFUSE_{re.sub(r'[^A-Z0-9]', '_', name.upper())}_PYTHON"


def same_python(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two interpreter paths are one environment (venvs link the same binary, so
    the path decides, not the file it resolves to)."""
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def has_module(python: str, module: str) -> bool:
    """Whether ``python`` can import ``module`` (a subprocess; this interpreter: in-process)."""
    if same_python(python, sys.executable):
        return importlib.util.find_spec(module) is not None
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60,
                              stdin=subprocess.DEVNULL).returncode == 0  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False


def engine_python(name: str, python: str | os.PathLike[str] | None = None) -> str:
    """The Python that has engine ``name`` installed, or a one-line error saying how to get it."""
    if name not in RUNNABLE:
        raise GdnfuseError(
            f"{option('engine', name)}: gdnfuse cannot run {name} (runnable here: "
            f"{', '.join(RUNNABLE)}); its loading rules are read from its code, see "
            "`gdnfuse inspect`"
        )
    variable = python_variable(name)
    chosen, source = (python, "python") if python else next(
        ((os.environ[v], v) for v in (variable, "GDNFUSE_ENGINE_PYTHON") if os.environ.get(v)),
        (None, None))  # fmt: skip
    here = importlib.util.find_spec(RUNNABLE[name]) is not None
    if chosen:
        if not Path(chosen).exists():
            raise SetupError(f"engine Python does not exist ({source})", path=str(chosen))
        if name in COMMON and here and not has_module(str(chosen), RUNNABLE[name]):
            return sys.executable
        return str(chosen)
    if here:
        return sys.executable
    raise SetupError(
        f"{name} is not installed: pip install {_PIP.get(name, repr('gdnfuse[' + name + ']'))}, "
        f"or set {variable} (or GDNFUSE_ENGINE_PYTHON) to a Python that has it"
    )


_PIP = {"transformers": "transformers", "mlx": "'mlx[cpu]' mlx-lm"}


def prompts_for(
    vocab: int, count: int = 3, length: int = PROMPT_LENGTH, avoid: Iterable[int] = ()
) -> list[list[int]]:
    """Fixed token-id prompts inside the vocabulary (no tokenizer needed), ``length``,
    ``length + 1``, ... positions long, without the ids in ``avoid`` (a VL model's image and
    video placeholders: a text-only forward must not meet them)."""
    avoid = set(avoid)
    if len(avoid & set(range(vocab))) >= vocab:
        raise ValueError("every token id is avoided")

    def token(x: int) -> int:
        while x % vocab in avoid:
            x += 1
        return x % vocab

    return [[token(17 + 7919 * (i + 1) * (j + 3)) for j in range(length + i)]
            for i in range(count)]  # fmt: skip


def special_tokens(config: Mapping[str, Any]) -> set[int]:
    """Token ids of a config's image/video placeholders and vision markers (top level and
    ``text_config``), which :func:`prompts_for` leaves out."""
    ids = set()
    for c in (config, config.get("text_config")):
        if isinstance(c, Mapping):
            for key, value in c.items():
                if key.endswith("_token_id") and any(
                        w in key for w in ("image", "video", "vision", "audio")):  # fmt: skip
                    ids.update(value if isinstance(value, list) else [value])
    return {i for i in ids if isinstance(i, int)}


def _env(name: str, tp: int, stub_log: str) -> dict[str, str]:
    env = dict(os.environ)
    if name in STUBBED:
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


def _run(name: str, script: str, args: Sequence[str], tp: int, python: str | None,
         workdir: str | None = None) -> Run:  # fmt: skip
    """Run harness ``script``; ``{workdir}`` in ``args`` becomes ``workdir`` (default: a
    temporary directory removed afterwards; pass one to read files the harness writes)."""
    exe = engine_python(name, python)
    with tempfile.TemporaryDirectory(prefix="gdnfuse-engine-") as tmp:
        work = workdir or tmp
        log = os.path.join(tmp, "stand-ins.log")
        cmd = [exe, str(HARNESS / script), *args]
        if "{workdir}" in args:
            cmd = [a.replace("{workdir}", work) for a in cmd]
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
    if called:
        raise GdnfuseError(f"{name} called an import-time stand-in: {called[0]}")
    return Run(json.loads(line.removeprefix("GDNFUSE-RESULT ")), proc.stdout, called)


def _short(message: str, limit: int = 400) -> str:
    """One line of at most ``limit`` characters, cut after a sentence where it can be."""
    text = " ".join(message.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > limit // 3 else text[: limit - 3] + "..."


def root_cause(log: str) -> str:
    """The first specific ``SomeError: message`` of an engine's log (stdout and stderr: vLLM's
    workers log their tracebacks through its logger), skipping wrappers that only point at it."""
    found = [m.groups() for ln in log.splitlines()
             if not _WARNING.search(ln) and (m := _ERROR_LINE.search(ln.strip()))]  # fmt: skip
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
    mode: str = "raw_logits",
    python: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Greedy tokens, top-k logprobs of every generated step and every prompt position
    (``prompt_logprobs``, the first ``None``) per model (``{"refused": why}`` when vLLM
    refuses). ``mode``: vLLM's ``logprobs_mode`` (``raw_logits``: the top-k logits)."""
    paths = [str(Path(m).resolve()) for m in models]
    args = ["--tp", str(tp), "--prompts", json.dumps([list(p) for p in prompts]),
            "--max-tokens", str(max_tokens), "--top-k", str(top_k), "--mode", mode,
            *paths]  # fmt: skip
    run = _run("vllm", "vllm_generate.py", args, tp, python)
    logs = _sections(run.log)
    out = {}
    for path, res in run.result.items():
        if "refused" in res and any(w in res["refused"] for w in _WRAPPERS):
            res = {"refused": root_cause(logs.get(path, "") + res["refused"])}
        elif "refused" in res:
            res = {"refused": _short(res["refused"])}
        out[path] = res
    return out


def sglang_compare(
    a: str | os.PathLike[str], b: str | os.PathLike[str], *, tp: int = 1,
    python: str | None = None, fp8_loader_only: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per rank: sglang's parameters and buffers from ``a`` vs from ``b`` (see
    harness/sglang_params.py)."""
    many = sglang_compare_many(a, [b], tp=tp, python=python, fp8_loader_only=fp8_loader_only)
    return many[str(Path(b).resolve())]


def sglang_compare_many(
    a: str | os.PathLike[str], others: Sequence[str | os.PathLike[str]], *, tp: int = 1,
    python: str | None = None, fp8_loader_only: bool = False,
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """:func:`sglang_compare` of ``a`` with each of ``others``, in one harness run (sglang
    loads ``a`` once per rank): ``{resolved path of b: ranks}``.

    ``fp8_loader_only``: FP8 checkpoints on a CPU without AMX; sglang's own construction,
    FP8 ignore-list matching and weight loading run, only its AMX repacking of the loaded FP8
    weights is skipped, and the raw loaded FP8 weights and scales are compared (the
    harness's ``--fp8-loader-only``). Each rank then reports ``fp8_bypassed``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    paths = [str(Path(b).resolve()) for b in others]
    flags = ["--fp8-loader-only"] if fp8_loader_only else []
    run = _run("sglang", "sglang_params.py",
               ["--tp", str(tp), "--port", str(port), "--workdir", "{workdir}", *flags,
                str(Path(a).resolve()), *paths], tp, python)  # fmt: skip
    ranks = list(run.result)
    return {b: [r["results"][i] if "results" in r else r for r in ranks]
            for i, b in enumerate(paths)}  # fmt: skip


def _logits(name: str, script: str, models: Sequence[str | os.PathLike[str]],
            prompts: Sequence[Sequence[int]], python: str | None) -> dict[str, dict[str, Any]]:
    """Run a logits harness; read the logits files it wrote (one safetensors file per model,
    ``prompt<i>``: ``[len(prompt), vocab]`` float32) into torch tensors."""
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover (gdnfuse[verify] has torch)
        raise SetupError(f"reading {name}'s logits needs torch: pip install "
                         "'gdnfuse[verify]'") from None  # fmt: skip
    paths = [str(Path(m).resolve()) for m in models]
    with tempfile.TemporaryDirectory(prefix=f"gdnfuse-{name}-") as work:
        run = _run(name, script, ["--workdir", "{workdir}", "--prompts",
                                  json.dumps([list(p) for p in prompts]), *paths],
                   1, python, workdir=work)  # fmt: skip
        logs = _sections(run.log)
        out: dict[str, dict[str, Any]] = {}
        for path in paths:
            res = dict(run.result[path])
            if "refused" in res:
                why = res["refused"]
                if any(w in why for w in _WRAPPERS):
                    why = root_cause(logs.get(path, "") + why)
                res["refused"] = _short(why)
            else:
                tensors = load_file(os.path.join(work, res.pop("file")))
                res["logits"] = [tensors[f"prompt{i}"] for i in range(len(prompts))]
            out[path] = res
    return out


def transformers_logits(
    models: Sequence[str | os.PathLike[str]], prompts: Sequence[Sequence[int]], *,
    python: str | None = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """transformers' float32 logits of each prompt, per model (harness/transformers_logits.py):
    ``{path: {"logits": [tensor per prompt], "cls", "version", "missing", "unexpected",
    "mismatched"}}`` or ``{path: {"refused": why, "version", "unknown_type": bool}}``
    (``unknown_type``: this transformers does not know the model type)."""
    return _logits("transformers", "transformers_logits.py", models, prompts, python)


def mlx_logits(
    models: Sequence[str | os.PathLike[str]], prompts: Sequence[Sequence[int]], *,
    python: str | None = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """mlx-lm's float32 logits of each prompt, per model (harness/mlx_logits.py), as
    :func:`transformers_logits`."""
    return _logits("mlx", "mlx_logits.py", models, prompts, python)


@dataclass(frozen=True)
class Comparison:
    """vLLM's results for an output against the source's (:func:`compare_generations`)."""

    same: bool
    detail: str
    max_logprob_diff: float
    """Largest difference of a value both report (logits or logprobs, per ``mode``)."""
    limit: float = 0.0
    positions: int = 0
    """Positions compared: every prompt position after the first, then each greedy step."""


BF16_LOGIT_TOLERANCE = 2.0**-5
"""Raw-logit comparison limit, as a fraction of the largest |logit| the source reports: 4
bf16 ulps at the top of that range. A Qwen3.5 VL source runs vLLM's MRoPE path (3-D
positions) where the Qwen3-Next output runs plain RoPE: the same function, but rounded
differently in bf16 (measured: 1 ulp, 0.0156 on logits up to 3.3, where a text-only
source and its output differ by 0); a RoPE base of 1e4 instead of 1e7 moved them by 0.30."""
LOGPROB_TOLERANCE = 1e-3
"""The limit for ``raw_logprobs`` results (absolute)."""


def _step(r: Mapping[str, float], g: Mapping[str, float], tol: float, k: int) -> str | None:
    """Why top-``k`` ``r`` and ``g`` of one position disagree beyond ``tol``, or None. A
    token in one top-k only is a disagreement unless it is within ``tol`` of the other's
    k-th value. (A prompt position also reports the prompt's own token: in both, anywhere.)"""
    for t in set(r) & set(g):
        if abs(r[t] - g[t]) > tol:
            return f"token {t}: {r[t]:.6g} vs {g[t]:.6g}"
    for mine, other, side in ((r, g, "source"), (g, r, "output")):
        kth = sorted(other.values(), reverse=True)[: k][-1]
        for t in sorted(mine, key=mine.__getitem__, reverse=True)[:k]:
            if t not in other and mine[t] > kth + tol:
                return f"token {t} ({mine[t]:.6g}) in the {side}'s top-{k} only"
    return None


def compare_generations(
    ref: Mapping[str, Any], got: Mapping[str, Any], tol: float | None = None
) -> Comparison:
    """Equal greedy tokens (a flip between tokens tied within the limit ends that prompt's
    comparison, it is not a failure), and at every prompt position and greedy step the same
    top-k values within the limit: ``tol``, else :data:`BF16_LOGIT_TOLERANCE` of the largest
    |logit| for ``raw_logits`` results, :data:`LOGPROB_TOLERANCE` for logprobs."""
    logits = ref.get("mode") == "raw_logits"
    if tol is None:
        values = [abs(v) for o in ref["outputs"] for step in o.get("prompt_logprobs", []) +
                  o["logprobs"] if step for v in step.values()]  # fmt: skip
        tol = BF16_LOGIT_TOLERANCE * max(values, default=0.0) if logits else LOGPROB_TOLERANCE
    what = "logits" if logits else "logprobs"
    k = int(ref.get("top_k") or min((len(st) for o in ref["outputs"] for st in o["logprobs"]),
                                    default=1))  # fmt: skip
    worst, count, ties = 0.0, 0, 0
    for i, (r, g) in enumerate(zip(ref["outputs"], got["outputs"], strict=True)):
        positions = [(f"prompt position {p}", x, y) for p, (x, y) in
                     enumerate(zip(r.get("prompt_logprobs", []), g.get("prompt_logprobs", []),
                                   strict=True)) if x is not None and y is not None]  # fmt: skip
        positions += [(f"step {s}", x, y) for s, (x, y) in
                      enumerate(zip(r["logprobs"], g["logprobs"], strict=True))]  # fmt: skip
        n_prompt = len(positions) - len(r["logprobs"])
        for at, (where, x, y) in enumerate(positions):
            why = _step(x, y, tol, k)
            if why is not None:
                return Comparison(False, f"prompt {i} {where}: top-k {what} differ ({why}; "
                                  f"limit {tol:.3g})", float("inf"), tol, count)  # fmt: skip
            count += 1
            common = set(x) & set(y)
            worst = max([worst] + [abs(x[t] - y[t]) for t in common])
            s = at - n_prompt
            if s >= 0 and r["tokens"][s] != g["tokens"][s]:
                a, b = str(r["tokens"][s]), str(g["tokens"][s])
                if a in y and b in x and abs(x[a] - x[b]) <= tol and abs(y[a] - y[b]) <= tol:
                    ties += 1  # a near-tie decided differently: later steps differ by right
                    break
                return Comparison(False, f"prompt {i}: greedy tokens differ from step {s} "
                                  f"({r['tokens']} vs {g['tokens']})", float("inf"), tol,
                                  count)  # fmt: skip
    n = len(ref["outputs"])
    tie = f"; {ties} prompt(s) diverged at a tie" if ties else ""
    return Comparison(True, f"{n} prompts, {count} positions: same greedy tokens{tie}, top-k "
                      f"{what} within {worst:.3g} (limit {tol:.3g})", worst, tol,
                      count)  # fmt: skip


@dataclass(frozen=True)
class LogitsComparison:
    """Logits of an output against the source's: ``relative`` = max |diff| / max |source|."""

    same: bool
    detail: str
    max_abs_diff: float
    relative: float


def compare_logits(ref: Sequence[Any], got: Sequence[Any], tol: float = 1e-5) -> LogitsComparison:
    """Every prompt's logits (torch tensors) within ``tol`` relative to the largest source logit."""
    worst, scale = 0.0, 0.0
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        if tuple(r.shape) != tuple(g.shape):
            why = f"prompt {i}: logits of shape {list(g.shape)}, the source's {list(r.shape)}"
            return LogitsComparison(False, why, float("inf"), float("inf"))
        if not (bool(g.isfinite().all()) and bool(r.isfinite().all())):
            return LogitsComparison(False, f"prompt {i}: non-finite logits", float("inf"),
                                    float("inf"))  # fmt: skip
        worst = max(worst, float((r.double() - g.double()).abs().max()))
        scale = max(scale, float(r.double().abs().max()))
    rel = worst / scale if scale else (0.0 if worst == 0 else float("inf"))
    positions = sum(int(r.shape[0]) for r in ref)
    text = (f"{len(ref)} prompts ({positions} positions): max |logit difference| {worst:.3g}, "
            f"{rel:.2g} of the largest source logit (limit {tol:g})")  # fmt: skip
    return LogitsComparison(rel <= tol, text, worst, rel)
