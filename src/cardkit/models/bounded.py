"""Building a model from an architecture record read from a file, without trusting the record.

A record in a file (widths, depths, channel counts) can ask for a model of any size, and a file
from a stranger may. `build_on_meta` runs the builder on the meta device, where tensors have shapes
but no storage, and stops it as soon as it has made more tensors or bytes than allowed (a claimed
depth cannot make it loop for long either). The caller compares the model's shapes with the
tensors the file stores and only then builds the model for real, so nothing is allocated in
proportion to a claimed width before the claim is checked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cardkit.errors import CardkitError

# A model makes at most a few tensors and a few dozen torch calls per state entry (measured:
# registry models make 1.3-1.6 tensors and 5-7 calls per entry, parameters count twice in bytes).
TENSORS_PER_ENTRY, CALLS_PER_ENTRY, BYTES_FACTOR = 4, 64, 4
BASE_TENSORS, BASE_CALLS, BASE_BYTES = 64, 2048, 1 << 20


# In-place random fills change no shape; on the meta device they are skipped (torch's meta
# kernel of normal_ goes through a decomposition whose first use imports sympy: seconds).
_FILLS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.random_,
          torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_}


class _OverBudget(BaseException):
    """Raised inside the builder; a BaseException so that no `except Exception` in it swallows it."""


class _Budget(TorchFunctionMode):
    """Counts the torch calls of a build and the tensors (and their bytes) it creates."""

    def __init__(self, tensors: int, calls: int, nbytes: int):
        super().__init__()
        self.limits = (tensors, calls, nbytes)
        self.tensors = self.calls = self.nbytes = 0
        self._seen: set[int] = set()
        self._keep: list[torch.Tensor] = []  # meta tensors hold no storage; kept so ids stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if self.calls > self.limits[1]:
            raise _OverBudget(f"more than {self.limits[1]:,} torch calls")
        if func in _FILLS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and not tensor._is_view() and id(tensor) not in self._seen:
                self._seen.add(id(tensor))
                self._keep.append(tensor)
                self.tensors += 1
                self.nbytes += tensor.numel() * tensor.element_size()
                if self.tensors > self.limits[0]:
                    raise _OverBudget(f"more than {self.limits[0]:,} tensors")
                if self.nbytes > self.limits[2]:
                    raise _OverBudget(f"more than {self.limits[2]:,} bytes")
        return out


def build_on_meta(build: Callable[[], nn.Module], *, entries: int, nbytes: int, what: str) -> nn.Module:
    """`build()` on the meta device, stopped once it makes more tensors or bytes than a model of
    `entries` state tensors and `nbytes` bytes needs (with the slack above). Any failure of the
    builder, including its own CardkitError, becomes one CardkitError that starts with `what`.
    The global random state is not touched: meta tensors draw no random numbers."""
    budget = _Budget(TENSORS_PER_ENTRY * entries + BASE_TENSORS, CALLS_PER_ENTRY * entries + BASE_CALLS,
                     BYTES_FACTOR * nbytes + BASE_BYTES)
    try:
        with torch.device("meta"), budget:
            model = build()
    except _OverBudget as err:
        raise CardkitError(f"{what}: its architecture record describes a larger model than the file allows "
                           f"({entries:,} tensors of {nbytes:,} bytes; building it made {err}); the file is "
                           f"corrupt or was edited") from None
    except CardkitError as err:
        raise CardkitError(f"{what}: its architecture record is invalid ({err})") from None
    except Exception as err:  # an architecture record can make a builder fail in any way
        raise CardkitError(f"{what}: its architecture record cannot be built ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); the file is corrupt or was "
                           f"edited") from None
    if not isinstance(model, nn.Module):
        raise CardkitError(f"{what}: its architecture record builds a {type(model).__name__}, not a model")
    return model


def check_arch_record(arch, what: str) -> dict:
    """The fields every architecture record has, checked before any builder sees them: a name,
    and `mean` / `std` listing one number per input channel (so `in_channels` is bounded by the
    file's own length and no builder expands a claimed channel count into a list)."""
    if arch is None:
        raise CardkitError(f"{what} records no architecture; the file is corrupt or was edited")
    if not isinstance(arch, dict):
        raise CardkitError(f"{what}: its architecture record is a {type(arch).__name__}, not a mapping; "
                           f"the file is corrupt or was edited")
    missing = [k for k in ("name", "num_classes", "in_channels", "input_size", "mean", "std") if k not in arch]
    if missing:
        raise CardkitError(f"{what}: its architecture record lacks {', '.join(missing)}; the file is corrupt "
                           f"or was edited")
    channels = arch["in_channels"]
    for key in ("mean", "std"):
        values = arch[key]
        if not isinstance(values, list) or isinstance(channels, bool) or not isinstance(channels, int) \
                or len(values) != channels:
            raise CardkitError(f"{what}: its architecture record gives {key}={_short(values)} for "
                               f"in_channels={_short(channels)}; one number per channel is expected; the "
                               f"file is corrupt or was edited")
    if not isinstance(arch.get("kwargs", {}), dict) or not isinstance(arch.get("structured", {}), dict):
        raise CardkitError(f"{what}: its architecture record's kwargs and structured entries must be "
                           f"mappings; the file is corrupt or was edited")
    return arch


def base_arch(arch: dict) -> dict:
    """The keyword arguments of `create_model` for the record: its name, the data's fields and the
    model's options (for a structured record, its full-size base, built the way
    `model_from_arch` builds it)."""
    if "structured" in arch:
        return {k: v for k, v in arch.items() if k != "structured"}
    return {k: arch[k] for k in ("name", "num_classes", "in_channels", "input_size", "mean", "std")} | {
        "kwargs": arch.get("kwargs", {})}


def state_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], int]]:
    """(shape, bytes) of every state-dict entry (works on the meta device)."""
    return {name: (tuple(t.shape), t.numel() * t.element_size()) for name, t in model.state_dict().items()}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
