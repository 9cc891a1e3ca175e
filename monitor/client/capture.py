"""Finding activation sites during a forward pass and turning their inputs into pattern rows.

Every call of a piecewise-linear activation is a site, whether it comes from a module
(``nn.ReLU`` calls ``F.relu``) or from a functional call in a hand-written ``forward``: both pass
through ``__torch_function__``, so one ``TorchFunctionMode``, active only while the watched
model's forward runs on a captured step, sees them all. The site's name is the path of the
innermost module running at the call plus ``#k``, its k-th activation call in this forward; a
call from the root model's own ``forward`` is named ``model#k``.

Covered: ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.PReLU``, ``nn.RReLU``, ``nn.ReLU6`` (a hardtanh with
lower bound 0), their in-place forms, and ``F.relu``/``F.relu_``/``torch.relu``/``torch.relu_``/
``Tensor.relu``/``Tensor.relu_``/``F.leaky_relu``/``F.leaky_relu_``/``F.relu6``/``F.prelu``,
``nn.Hardtanh``/``F.hardtanh`` with lower bound 0, and ``clamp``/``clip``/``clamp_min`` (function,
method, in place) with the number 0 as lower bound, called anywhere in a forward; a module
called twice (torchvision's BasicBlock ``relu``) gives ``relu#0`` and ``relu#1``. In opt-in sign
mode GELU, SiLU, ELU, Mish and sigmoid sites are added,
marked ``mode="sign"``. The call is seen before it runs, so in-place forms report the
preactivation. A call made inside another captured call (``F.relu6`` inside a captured op) is
not seen twice: the mode is inactive while it handles a call.

The mode and a hook on every module cost a Python call for each torch function and module call
of the forward. When the first ``VERIFY_FORWARDS`` captured forwards show that a few module hooks
see every site (``fast_sites``: an ``nn.ReLU``'s input, or a submodule's output passed straight
to ``F.relu``), the tracker hooks those modules alone and drops the mode; the names and tensors
are the same. One captured forward in ``RECHECK_EVERY`` runs in full again and checks. A check
that finds other sites, an activation module running outside a watched forward, or a training
forward entered through a submodule end the fast hooks for the rest of the run. A functional
activation that runs only on some steps is seen by the checks, not in between.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from monitor.client.fast_sites import HookedSite, SiteCheck
from monitor.schema import SiteKind, SiteMode

ROOT_NAME = "model"
MAX_FILTER_ANSWERS = 4096  # site names whose filter answer is kept
VERIFY_FORWARDS = 2  # full forwards that must agree before the fast hooks are used
RECHECK_EVERY = 64  # one captured forward in this many runs in full and checks the fast hooks

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
    F.rrelu: "relu",
    F.rrelu_: "relu",
}
# ``nn.ReLU6`` calls ``F.hardtanh(x, 0.0, 6.0)``: a hardtanh whose lower bound is 0 is a ReLU6
# site (pattern x > 0); other hardtanh calls are not ReLU-like and are left alone.
HARDTANH = (F.hardtanh, F.hardtanh_)
# ``clamp(min=0)``/``clamp_min(0)`` (and ``clip``) are ReLUs in all but name (with ``max``: a
# ReLU6-like clip); a clamp whose lower bound is not the number 0 is left alone.
CLAMP = (
    torch.clamp,
    torch.clip,
    torch.clamp_min,
    torch.Tensor.clamp,
    torch.Tensor.clip,
    torch.Tensor.clamp_,
    torch.Tensor.clip_,
    torch.Tensor.clamp_min,
    torch.Tensor.clamp_min_,
)
# Smooth activations, captured only in opt-in sign mode: the pattern of the preactivation sign.
SMOOTH: dict[Callable[..., Any], str] = {
    F.gelu: "sign",
    F.silu: "sign",
    F.elu: "sign",
    F.mish: "sign",
    torch.Tensor.sigmoid: "sign",
}


# Modules whose 3-dim output is (N, C, L), channels first. An activation called on such an output
# itself (``Conv1d -> ReLU``, ``Conv1d -> BatchNorm1d -> ReLU``) is read with channels as units:
# the tracker hands on ``x.movedim(1, -1)``, (N, L, C), one row per position as for a conv site.
CHANNELS_FIRST_1D = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.BatchNorm1d,
    nn.InstanceNorm1d,
    nn.GroupNorm,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveAvgPool1d,
)


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


def site_kind(x: torch.Tensor) -> SiteKind:
    """Dense for (N, d) (and (d,)), sequence for (N, T, d), conv for (N, C, ...) with >= 4 dims.

    A 3-dim input is read as a sequence; the tracker hands on a Conv1d-like module's (N, C, L)
    output as its (N, L, C) view (``CHANNELS_FIRST_1D``), so that its units are the channels.
    """
    if x.dim() <= 2:
        return "dense"
    return "seq" if x.dim() == 3 else "conv"


@dataclass(frozen=True)
class SiteFilter:
    """Include/exclude sites by shell-style name patterns (``fnmatch``); exclude wins."""

    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    # Each name's answer, asked at every site of every captured step (a model has few names).
    _answers: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, name: str) -> bool:
        """Whether the site is captured."""
        answer = self._answers.get(name)
        if answer is None:
            answer = not any(fnmatch.fnmatchcase(name, p) for p in self.exclude) and any(
                fnmatch.fnmatchcase(name, p) for p in self.include
            )
            if len(self._answers) < MAX_FILTER_ANSWERS:
                self._answers[name] = answer
        return answer


SiteCallback = Callable[[str, SiteMode, torch.Tensor], None]


class _ActivationMode(TorchFunctionMode):
    """Calls ``on_site(name, mode, preactivation)`` for each activation call.

    The call is reported before it runs, because an in-place activation overwrites its input.
    """

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
        if mode is None and func in HARDTANH and _lower_bound(args, kwargs) == 0:
            mode = "relu"
        if mode is None and func in CLAMP and _clamp_min(args, kwargs) == 0:
            mode = "relu"
        if mode is not None and args and isinstance(args[0], torch.Tensor):
            self._tracker.site_call(mode, args[0])  # type: ignore[arg-type]
        return func(*args, **(kwargs or {}))


def _clamp_min(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> float | None:
    """The lower bound of a clamp call when it is a plain number (None otherwise)."""
    low = args[1] if len(args) > 1 else (kwargs or {}).get("min")
    if isinstance(low, bool) or not isinstance(low, (int, float)):
        return None
    return float(low)


def _lower_bound(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> float:
    """``min_val`` of a hardtanh call."""
    if len(args) > 1:
        return float(args[1])
    return float((kwargs or {}).get("min_val", -1.0))


ForwardCallback = Callable[[str, nn.Module, tuple[Any, ...], dict[str, Any]], None]


class ModuleTracker:
    """Owns the hooks that track which module is running and the mode that sees activations.

    The root module always carries one pre-hook and one post-hook; the hooks on the other
    modules, which name the sites, exist only while ``armed`` is true, so an unscheduled step
    costs one attribute check per forward (STYLE.md 5). While armed, a forward that enters
    through a submodule (a LightningModule's ``training_step`` calling ``self.net(x)``) is
    captured too: the outermost module whose forward runs starts the capture, and sites directly
    in its ``forward`` are named after its path. ``on_forward(path, module, args, kwargs)``, when
    set, hears of each such outermost forward before it runs (APT probes keep its inputs there),
    and ``on_forward_end(sites)`` of its end, with the number of activation calls it made.
    """

    def __init__(self, model: nn.Module, on_site: SiteCallback, sign_mode: bool) -> None:
        self._armed = False
        # Training captures skip forwards run without autograd (validation loops); probes, which
        # run under no_grad on purpose, clear this flag while they forward.
        self.require_grad = True
        self.on_site = on_site
        self.on_forward: ForwardCallback | None = None
        self.on_forward_end: Callable[[int], None] | None = None
        self._model = model
        self._stack: list[str] = []
        self._calls: dict[str, int] = {}
        functions = dict(PIECEWISE_LINEAR)
        if sign_mode:
            functions.update(SMOOTH)
        self._mode = _ActivationMode(self, functions)
        self._active = False
        self._entry: nn.Module | None = None
        # Outputs of CHANNELS_FIRST_1D modules in the running forward, by id (kept alive, so that
        # an id is never another tensor's).
        self._channels_first: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = [
            model.register_forward_pre_hook(self._enter(ROOT_NAME), with_kwargs=True),
            model.register_forward_hook(self._leave, always_call=True),
        ]
        self._module_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._hooks_kind = ""  # "full", "fast" or "" (none on the submodules)
        self._in_mode = False
        self._probing = False
        self._captured = 0  # captured forwards so far
        self._recheck = False  # check the next forward in full
        # The fast hooks, by module path (None until checked); the check of the running forward.
        self.fast_sites: dict[str, HookedSite] | None = None
        self._fast_off = False  # a check failed: full tracking for the rest of the run
        self._candidate: dict[str, HookedSite] | None = None
        self._verified = 0
        self._check: SiteCheck | None = None

    @property
    def armed(self) -> bool:
        """Whether the next forward is captured."""
        return self._armed

    @armed.setter
    def armed(self, value: bool) -> None:
        if value and not self._hooks_kind:
            self._use_hooks("fast" if self.fast_sites is not None else "full")
        elif not value and self._hooks_kind and not self._active:
            self._remove_module_hooks()
        self._armed = value

    def _use_hooks(self, kind: str) -> None:
        """Hook every submodule ("full") or only the verified activation modules ("fast")."""
        if kind == self._hooks_kind:
            return
        self._remove_module_hooks()
        add = self._module_handles.append
        if kind == "fast":
            for path, site in (self.fast_sites or {}).items():
                if site.when == "input":
                    add(site.module.register_forward_pre_hook(self._fast_site(path, site)))
                else:
                    add(site.module.register_forward_hook(self._fast_site(path, site)))
        else:
            for path, module in self._model.named_modules():
                if module is self._model:
                    continue
                add(module.register_forward_pre_hook(self._enter(path), with_kwargs=True))
                add(module.register_forward_hook(self._leave, always_call=True))
                if isinstance(module, CHANNELS_FIRST_1D):
                    add(module.register_forward_hook(self._note_1d))
        self._hooks_kind = kind

    def _remove_module_hooks(self) -> None:
        for handle in self._module_handles:
            handle.remove()
        self._module_handles.clear()
        self._hooks_kind = ""

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._active:
                self._stack.append(name)
                if self._check is not None:
                    self._check.enter(name, module, args)
                return
            if not self._armed or (self.require_grad and not torch.is_grad_enabled()):
                return
            if self.on_forward is not None:
                self.on_forward(name, module, args, kwargs)
            self._begin(name, module)

        return hook

    def _begin(self, name: str, module: nn.Module) -> None:
        """Start capturing the forward of ``module``: with the fast hooks, or in full."""
        self._active = True
        self._entry = module
        self._calls.clear()
        self._channels_first.clear()
        self._stack.clear()
        self._stack.append(name)
        from_root = module is self._model and not self._probing
        due_check = self._recheck or self._captured % RECHECK_EVERY == 0
        self._recheck = False
        self._captured += 1
        if from_root and self.fast_sites is not None and not due_check:
            self._use_hooks("fast")
            return
        self._use_hooks("full")  # a forward entered through a submodule found them there
        if from_root and not self._fast_off:
            self._check = SiteCheck()
        elif not self._probing:
            self._end_fast_hooks()  # a training forward entered through a submodule
        self._mode.__enter__()
        self._in_mode = True

    def _fast_site(self, path: str, site: HookedSite) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], *output: Any) -> None:
            if not self._active:
                if self._armed and (not self.require_grad or torch.is_grad_enabled()):
                    self._end_fast_hooks()  # a training forward the root's hook did not see
                return
            j = self._calls.get(path, 0)
            self._calls[path] = j + 1
            value = output[0] if output else (args[0] if args else None)
            if j < len(site.names) and isinstance(value, torch.Tensor):
                self.on_site(site.names[j], site.mode, value)
            else:
                self._recheck = True  # more calls than checked: check the next forward

        return hook

    def _end_fast_hooks(self) -> None:
        self._fast_off = True
        self.fast_sites = self._candidate = None

    def _leave(self, module: nn.Module, _args: Any, _output: Any) -> None:
        if not self._active:
            return
        if len(self._stack) > 1:
            self._stack.pop()
            if self._check is not None:
                self._check.leave(_output)
            return
        if module is not self._entry:
            return
        self._stack.pop()
        self._active = False
        self._entry = None
        self._channels_first.clear()
        if self._in_mode:
            self._in_mode = False
            self._mode.__exit__(None, None, None)
        if self._check is not None:
            self._settle(self._check.result())
            self._check = None
        if not self._armed:
            self._remove_module_hooks()
        if self.on_forward_end is not None:
            self.on_forward_end(sum(self._calls.values()))

    def _settle(self, found: dict[str, HookedSite] | None) -> None:
        """Fast hooks after ``VERIFY_FORWARDS`` agreeing checks; off for good on a mismatch."""
        expected = self.fast_sites if self.fast_sites is not None else self._candidate
        if found is None or (expected is not None and found != expected):
            self._end_fast_hooks()
            return
        self._candidate = found
        self._verified += 1
        if self._verified >= VERIFY_FORWARDS:
            self.fast_sites = found

    def _note_1d(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if self._active and isinstance(output, torch.Tensor) and output.dim() == 3:
            self._channels_first[id(output)] = output

    def site_call(self, mode: SiteMode, preactivation: torch.Tensor) -> None:
        """Name the call after the innermost running module and report it.

        A channels-first (N, C, L) preactivation (see ``CHANNELS_FIRST_1D``) is reported as its
        (N, L, C) view.
        """
        owner = self._stack[-1] if self._stack else ROOT_NAME
        k = self._calls.get(owner, 0)
        self._calls[owner] = k + 1
        name = f"{owner}#{k}"
        if self._channels_first.get(id(preactivation)) is preactivation:
            preactivation = preactivation.movedim(1, -1)
            if self._check is not None:
                self._check.spoil()  # the fast hooks do not know channels-first outputs
        elif self._check is not None:
            self._check.site(name, mode, preactivation)
        self.on_site(name, mode, preactivation)

    # -- probe forwards (APT probes and sweeps, monitor/client/apt.py) ------------------------
    @contextmanager
    def probing(self, on_site: SiteCallback) -> Iterator[None]:
        """Report the sites of forwards inside this block to ``on_site``, armed, even without grad.

        The training callback and flags are restored afterwards.
        """
        saved = (self.on_site, self.armed, self.require_grad, self.on_forward, self.on_forward_end)
        self.on_site, self.armed, self.require_grad = on_site, True, False
        self.on_forward = self.on_forward_end = None
        # A probe may forward a submodule: in full, whose hooks see any entry.
        self._probing = True
        self._use_hooks("full")
        try:
            yield
        finally:
            self._probing = False
            (
                self.on_site,
                self.armed,
                self.require_grad,
                self.on_forward,
                self.on_forward_end,
            ) = saved

    # -- end of probe forwards ----------------------------------------------------------------

    def close(self) -> None:
        """Remove every hook; leave the mode if a forward was interrupted."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._remove_module_hooks()
        self._channels_first.clear()
        if self._active:
            self._active = False
            self._entry = None
            if self._in_mode:
                self._in_mode = False
                self._mode.__exit__(None, None, None)
