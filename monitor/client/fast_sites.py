"""Which activation sites a few module hooks can see, so that capture can drop its mode.

``capture.ModuleTracker`` finds sites with a ``TorchFunctionMode`` and a hook on every module:
exact for any forward, but a Python call for each torch function and module call (0.2-0.5 ms a
step on the small models of ``benchmarks/e2e.py``, up to a quarter of their step). Most models
make every activation call in one of two ways that one hook sees as well:

- **input**: the call is the first thing a module does with its first input (``nn.ReLU`` and its
  kind): a pre-hook on that module gets the preactivation;
- **output**: the preactivation is what a submodule has just returned, unchanged
  (``F.relu(self.fc(x))``): a forward hook on that submodule gets it.

``SiteCheck`` watches one full forward and says, for every site, which module call could have
reported it, under which name; ``HookedSite`` is the result for one module. The tracker uses
the hooks only after agreeing checks, and checks again now and then (see ``capture``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from monitor.schema import SiteMode


@dataclass(frozen=True)
class HookedSite:
    """A module whose every call in a forward reports one site.

    ``when`` is "input" (pre-hook, the module's first input) or "output" (forward hook, its
    output); ``names[j]`` is the site name of its j-th call in a forward.
    """

    module: nn.Module
    when: str
    mode: SiteMode
    names: tuple[str, ...]


@dataclass
class _Call:
    path: str
    module: nn.Module
    index: int  # the module's call number in this forward
    first: Any  # its first positional argument
    version: int  # that tensor's version counter at the call (-1: not a tensor)


def _version(value: Any) -> int:
    return value._version if isinstance(value, torch.Tensor) else -1


class SiteCheck:
    """Records one forward's module calls and sites; ``result`` says how hooks would see them.

    The tracker calls ``enter``/``leave`` around every submodule call and ``site`` at every
    activation call, with the name it gave the site.
    """

    def __init__(self) -> None:
        self._running: list[_Call] = []
        self._calls: dict[str, int] = {}
        # id of a tensor a submodule returned -> (the tensor, its version then, the call)
        self._outputs: dict[int, tuple[torch.Tensor, int, _Call]] = {}
        # (module path, call number) -> (when, site name, mode, module); None: not hookable
        self._sites: dict[tuple[str, int], tuple[str, str, SiteMode, nn.Module]] | None = {}

    def enter(self, path: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        """A submodule call begins."""
        index = self._calls.get(path, 0)
        self._calls[path] = index + 1
        first = args[0] if args else None
        self._running.append(_Call(path, module, index, first, _version(first)))

    def leave(self, output: Any) -> None:
        """The innermost running submodule call returned ``output``."""
        call = self._running.pop()
        if isinstance(output, torch.Tensor):
            self._outputs[id(output)] = (output, output._version, call)

    def site(self, name: str, mode: SiteMode, preactivation: torch.Tensor) -> None:
        """An activation call on ``preactivation``, named ``name``."""
        if self._sites is None:
            return
        key: tuple[str, int] | None = None
        inner = self._running[-1] if self._running else None
        produced = self._outputs.get(id(preactivation))
        if (
            inner is not None
            and inner.first is preactivation
            and inner.version == preactivation._version  # not changed in place since
        ):
            key, when, module = (inner.path, inner.index), "input", inner.module
        elif (
            produced is not None
            and produced[0] is preactivation
            and produced[1] == preactivation._version  # not changed in place since
        ):
            call = produced[2]
            key, when, module = (call.path, call.index), "output", call.module
        if key is None or key in self._sites:
            self._sites = None  # no hook sees this call, or one call would report two sites
            return
        self._sites[key] = (when, name, mode, module)

    def spoil(self) -> None:
        """A site no hook reproduces (a channels-first view) was seen."""
        self._sites = None

    def result(self) -> dict[str, HookedSite] | None:
        """The hooks that report this forward's sites, by module path; None if some cannot.

        Every call of a hooked module must have reported a site of the same kind and mode.
        """
        if not self._sites:
            return None
        hooked: dict[str, HookedSite] = {}
        for path in sorted({path for path, _ in self._sites}):
            calls = [self._sites.get((path, j)) for j in range(self._calls[path])]
            first = calls[0]
            if first is None or any(
                c is None or (c[0], c[2], c[3]) != (first[0], first[2], first[3]) for c in calls
            ):
                return None
            hooked[path] = HookedSite(
                module=first[3],
                when=first[0],
                mode=first[2],
                names=tuple(c[1] for c in calls if c is not None),
            )
        return hooked
