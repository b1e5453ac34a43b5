"""Importing VLMEvalKit (the `vlmeval` package) where torchvision cannot be imported.

Every VLMEvalKit snapshot imports its whole model zoo when `vlmeval.config`, `vlmeval.vlm` or
`vlmeval.dataset` is imported, and some of those modules import torchvision at module level
(e.g. `from torchvision.transforms import InterpolationMode` and then `InterpolationMode.BICUBIC`).
None of that code runs for our model or our datasets. On a machine whose torch is the CPU build
and whose package index only has torchvision wheels built for the CUDA torch, `import torchvision`
fails (ImportError, or RuntimeError "operator torchvision::nms does not exist"), and with it
`import vlmeval`.

`import_vlmeval()` therefore first tries the real torchvision; only when that import fails does
it put a placeholder in its place for the rest of the process: every module and attribute of
the placeholder exists, and calling anything in it raises a RuntimeError naming the original
import error. A working torchvision is always used as is.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

TORCHVISION = 'torchvision'


class Unavailable:
    """Stands in for any torchvision object; usable at import time, fails when used."""

    def __init__(self, name: str, reason: str):
        self._name = name
        self._reason = reason

    def __getattr__(self, attribute):
        if attribute.startswith('__'):
            raise AttributeError(attribute)
        return Unavailable(f'{self._name}.{attribute}', self._reason)

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f'{self._name} is unavailable: torchvision could not be imported ({self._reason}); '
                           f'VLMEvalKit was imported with a placeholder in its place')

    def __mro_entries__(self, bases):   # `class X(torchvision.Something)` at import time
        return (object,)


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, reason: str):
        self.reason = reason

    def find_spec(self, name, path=None, target=None):
        if name == TORCHVISION or name.startswith(TORCHVISION + '.'):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__version__ = '0+unavailable'
        reason = self.reason

        def missing(attribute, prefix=spec.name):
            if attribute.startswith('__'):
                raise AttributeError(attribute)
            return Unavailable(f'{prefix}.{attribute}', reason)

        module.__getattr__ = missing
        return module

    def exec_module(self, module):
        pass


def torchvision_placeholder_reason() -> str | None:
    """Why a placeholder stands in for torchvision in this process, or None if none does."""
    finder = next((f for f in sys.meta_path if isinstance(f, _PlaceholderFinder)), None)
    return None if finder is None else finder.reason


def ensure_torchvision_importable() -> str | None:
    """Import torchvision; if that fails, install the placeholder and return the reason."""
    if torchvision_placeholder_reason() is not None:
        return torchvision_placeholder_reason()
    try:
        importlib.import_module(TORCHVISION)
        return None
    except Exception as exc:   # ImportError, or RuntimeError from a torchvision built for another torch
        reason = f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""}'.rstrip(': ')
    for name in [n for n in sys.modules if n == TORCHVISION or n.startswith(TORCHVISION + '.')]:
        del sys.modules[name]
    sys.meta_path.insert(0, _PlaceholderFinder(reason))
    return reason


MISSING_VLMEVAL = ('eval.adapters.vlmevalkit needs VLMEvalKit (the `vlmeval` package): ./dev.sh installs the pinned '
                   'snapshot (requirements/eval-frameworks.txt); python -m eval.run evaluates without it')


def import_vlmeval():
    """`vlmeval` with its config, datasets and model base class imported; one-line ImportError otherwise."""
    ensure_torchvision_importable()
    try:
        for name in ('vlmeval.smp', 'vlmeval.vlm.base', 'vlmeval.dataset', 'vlmeval.config', 'vlmeval.inference'):
            importlib.import_module(name)
    except Exception as exc:   # a missing package or a broken dependency anywhere in VLMEvalKit's import chain
        detail = str(exc).splitlines()[0] if str(exc) else ''
        raise ImportError(f'{MISSING_VLMEVAL} (importing it failed: {type(exc).__name__}: {detail})') from exc
    return sys.modules['vlmeval']


__all__ = ['MISSING_VLMEVAL', 'Unavailable', 'ensure_torchvision_importable', 'import_vlmeval',
           'torchvision_placeholder_reason']
