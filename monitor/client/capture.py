"""Finding activation sites during a forward pass and turning their inputs into pattern rows.

Every call of a piecewise-linear activation is a site, whether it comes from a module
(``nn.ReLU`` calls ``F.relu``) or from a functional call in a hand-written ``forward``: both pass
through ``__torch_function__``, so one ``TorchFunctionMode``, active only while the watched
model's forward runs on a captured step, sees them all. The site's name is the path of the
innermost module running at the call plus ``#k``, its k-th activation call in this forward; a
call from the root model's own ``forward`` is named ``model#k``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from monitor.schema import SiteKind, SiteMode

ROOT_NAME = "model"

# Piecewise-linear activations: the pattern is preactivation > 0 (the unit's linear piece).
PIECEWISE_LINEAR: dict[Callable[..., Any], str] = {
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    torch.Tensor.relu: "relu",
    torch.Tensor.relu_: "relu",
    F.relu6: "relu",
    F.leaky_relu: "relu",
    F.leaky_relu_: "relu",
    F.prelu: "relu",
}
# Smooth activations, captured only in opt-in sign mode: the pattern of the preactivation sign.
SMOOTH: dict[Callable[..., Any], str] = {
    F.gelu: "sign",
    F.silu: "sign",
    F.elu: "sign",
    F.mish: "sign",
    torch.Tensor.sigmoid: "sign",
}


def rows_of(x: torch.Tensor) -> tuple[torch.Tensor, SiteKind]:
    """The (rows, units) view of an activation input, and the site kind.

    (N, d) is dense; (N, C, ...) with 4 or more dims is conv, units = channels, one row per
    spatial position; (N, T, d) is a sequence, one row per token.
    """
    if x.dim() == 2:
        return x, "dense"
    if x.dim() == 1:
        return x.reshape(1, -1), "dense"
    if x.dim() == 3:
        return x.reshape(-1, x.shape[-1]), "seq"
    channels = x.shape[1]
    return x.movedim(1, -1).reshape(-1, channels), "conv"


@dataclass(frozen=True)
class SiteFilter:
    """Include/exclude sites by shell-style name patterns (``fnmatch``); exclude wins."""

    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()

    def __call__(self, name: str) -> bool:
        """Whether the site is captured."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self.include)


SiteCallback = Callable[[str, SiteMode, torch.Tensor], None]


class _ActivationMode(TorchFunctionMode):
    """Calls ``on_site(name, mode, preactivation)`` for each activation call, before the call
    (an in-place activation overwrites its input)."""

    def __init__(self, tracker: ModuleTracker, functions: dict[Callable[..., Any], str]) -> None:
        super().__init__()
        self._tracker = tracker
        self._functions = functions

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        mode = self._functions.get(func)
        if mode is not None and args and isinstance(args[0], torch.Tensor):
            self._tracker.site_call(mode, args[0])  # type: ignore[arg-type]
        return func(*args, **(kwargs or {}))


class ModuleTracker:
    """Owns the hooks that track which module is running and the mode that sees activations.

    Nothing happens unless ``armed`` is true when the root forward starts, so an unscheduled
    step costs one attribute check per module call.
    """

    def __init__(self, model: nn.Module, on_site: SiteCallback, sign_mode: bool) -> None:
        self.armed = False
        # Training captures skip forwards run without autograd (validation loops); probes, which
        # run under no_grad on purpose, clear this flag while they forward.
        self.require_grad = True
        self.on_site = on_site
        self._stack: list[str] = []
        self._calls: dict[str, int] = {}
        functions = dict(PIECEWISE_LINEAR)
        if sign_mode:
            functions.update(SMOOTH)
        self._mode = _ActivationMode(self, functions)
        self._active = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for path, module in model.named_modules():
            name = path or ROOT_NAME
            self._handles.append(module.register_forward_pre_hook(self._enter(name, module is model)))
            self._handles.append(
                module.register_forward_hook(self._leave(module is model), always_call=True)
            )

    def _enter(self, name: str, is_root: bool) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            if is_root and not self._active:
                if not self.armed or (self.require_grad and not torch.is_grad_enabled()):
                    return
                self._active = True
                self._calls.clear()
                self._stack.clear()
                self._mode.__enter__()
            if self._active:
                self._stack.append(name)

        return hook

    def _leave(self, is_root: bool) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            if not self._active:
                return
            self._stack.pop()
            if is_root and not self._stack:
                self._active = False
                self._mode.__exit__(None, None, None)

        return hook

    def site_call(self, mode: SiteMode, preactivation: torch.Tensor) -> None:
        """Name the call after the innermost running module and report it."""
        owner = self._stack[-1] if self._stack else ROOT_NAME
        k = self._calls.get(owner, 0)
        self._calls[owner] = k + 1
        self.on_site(f"{owner}#{k}", mode, preactivation)

    # -- probe forwards (APT probes and sweeps, monitor/client/apt.py) ------------------------
    @contextmanager
    def probing(self, on_site: SiteCallback) -> Iterator[None]:
        """Report the sites of forwards inside this block to ``on_site``, armed, even without grad.

        The training callback and flags are restored afterwards.
        """
        saved = (self.on_site, self.armed, self.require_grad)
        self.on_site, self.armed, self.require_grad = on_site, True, False
        try:
            yield
        finally:
            self.on_site, self.armed, self.require_grad = saved

    # -- end of probe forwards ----------------------------------------------------------------

    def close(self) -> None:
        """Remove every hook; leave the mode if a forward was interrupted."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._active:
            self._active = False
            self._mode.__exit__(None, None, None)
