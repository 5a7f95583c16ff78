"""gdnfuse: fuse Qwen3.5 Gated DeltaNet projections offline, exactly, and verify the result.

The public API, typed (``py.typed``); every error is a :class:`gdnfuse.errors.GdnfuseError`::

    from gdnfuse import convert, inspect, plan, verify

    plan("./Qwen3.5-27B", engine="vllm", text_only=True).summary()   # headers only
    result = convert("./Qwen3.5-27B", "./out", engine="vllm", text_only=True, tp=4)
    report = verify(result.out, against="./Qwen3.5-27B")            # bool(report) == ok
    inspect("./any-checkpoint")                                      # per-engine verdicts
"""

__version__ = "0.1.0"

from gdnfuse.convert import ConvertResult, convert  # noqa: E402
from gdnfuse.convert import plan_source as plan  # noqa: E402
from gdnfuse.loaders import verdicts as inspect  # noqa: E402
from gdnfuse.verify import VerifyReport, verify  # noqa: E402

__all__ = ["ConvertResult", "VerifyReport", "__version__", "convert", "inspect", "plan", "verify"]
