"""Import-time stand-ins for modules an engine imports but never calls on our path.

Put on ``PYTHONPATH`` by :mod:`gdnfuse.engines.harness` (so vLLM's and sglang's spawned
worker processes get it too): every module named in ``GDNFUSE_STUB_MODULES`` (and its
submodules) imports as a stand-in whose attributes are stand-ins and whose every call
raises. Each call is appended to the file ``GDNFUSE_STUB_LOG`` first, so a harness can
assert that the engine never used a stand-in (its result would otherwise be unknowable).

Why: PyPI's torchvision cannot load beside the CPU build of torch ("operator
torchvision::nms does not exist"), and sgl_kernel has no CPU build, yet vLLM's and
sglang's Qwen3.5 modules import them (image processors, fused kernels) at import time.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import types

_NAMES = {n for n in os.environ.get("GDNFUSE_STUB_MODULES", "").split(",") if n}
_LOG = os.environ.get("GDNFUSE_STUB_LOG")


def _record(what: str) -> None:
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} {what}\n")


class _Stand:
    """An attribute of a stand-in module: any attribute is another stand-in; calls raise."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Stand":
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _Stand(f"{self._name}.{attr}")

    def __call__(self, *args: object, **kwargs: object) -> object:
        _record(self._name)
        raise RuntimeError(f"gdnfuse stand-in {self._name} was called")

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (object,)

    def __repr__(self) -> str:
        return f"<gdnfuse stand-in {self._name}>"


class _Module(types.ModuleType):
    def __getattr__(self, attr: str) -> _Stand:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _Stand(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):  # noqa: ANN001
        if name.split(".")[0] not in _NAMES:
            return None
        spec = importlib.machinery.ModuleSpec(name, self, is_package=True)
        spec.submodule_search_locations = []
        return spec

    def create_module(self, spec):  # noqa: ANN001
        module = _Module(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+gdnfuse-stand-in"
        return module

    def exec_module(self, module) -> None:  # noqa: ANN001
        pass


if _NAMES:
    sys.meta_path.insert(0, _Finder())
