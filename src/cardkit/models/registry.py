"""Name -> factory registry and the single entry point that builds models."""

import inspect
import json
import math
from collections.abc import Callable, Sequence

from torch import nn

from cardkit.errors import CardkitError
from cardkit.models._common import positive_int
from cardkit.models.normalize import Normalize
from cardkit.registry import Registry, import_module

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
_COMMON = ("num_classes", "in_channels", "input_size", "mean", "std")
DATA_KEYWORDS = _COMMON  # what the dataset decides, never a model option
_OPTION_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its ``__name__``; its extra keyword parameters become the model's options."""
    missing = [p for p in _COMMON if p not in inspect.signature(fn).parameters]
    if missing:
        raise CardkitError(
            f"model factory {fn.__name__!r} lacks parameters {', '.join(missing)}; "
            f"every factory must accept {', '.join(_COMMON)}"
        )
    return MODELS.register(fn.__name__, fn)


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model (or a user's ``package.module:factory``, which gets those of the
    dataset's values that its signature names) for ``[0, 1]`` inputs of shape
    (in_channels, input_size, input_size).

    ``mean``/``std`` (one value per channel, or one for all) feed the model's
    first layer ``model.normalize``; by default it is the identity. The returned
    model carries ``model.arch``, a JSON-ready dict from which
    ``create_model(**model.arch)`` rebuilds the same architecture.
    """
    factory = lookup_model(name)
    options = _bind_options(name, factory, _flatten_arch_kwargs(kwargs))
    common = {
        "num_classes": positive_int(num_classes, "num_classes", name),
        "in_channels": positive_int(in_channels, "in_channels", name),
        "input_size": positive_int(input_size, "input_size", name),
        "mean": _per_channel(mean, 0.0, "mean", in_channels, name),
        "std": _per_channel(std, 1.0, "std", in_channels, name),
    }
    if min(common["std"]) <= 0:
        raise CardkitError(f"{name}: std={common['std']} has a value <= 0; every std must be positive")
    if is_user_factory(name):  # a user's factory takes those of the dataset's values it names
        accepted = inspect.signature(factory).parameters
        model = factory(**{k: v for k, v in common.items() if k in accepted}, **options)
    else:
        model = factory(**common, **options)
    _check_built(name, model)
    model.arch = {"name": name, **common, "kwargs": options}
    return model


def lookup_model(name: str) -> Callable[..., nn.Module]:
    """A registered factory, or a user's `package.module:factory` imported by its path."""
    if isinstance(name, str) and ":" in name:
        return _imported_factory(name)
    return MODELS.lookup(name)


def is_user_factory(name: str) -> bool:
    return ":" in name


def _imported_factory(path: str) -> Callable[..., nn.Module]:
    module, _, attribute = path.partition(":")
    if not module or not attribute.isidentifier():
        raise CardkitError(f"model {path!r}: write a user factory as 'package.module:function'")
    factory = getattr(import_module(module, f"model {path!r}"), attribute, None)
    if not callable(factory):
        raise CardkitError(f"model {path!r}: module {module!r} has no function {attribute!r}; check the name")
    # A record read from a file may name any function: only a classifier factory is called.
    try:
        takes_classes = "num_classes" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_classes = False
    if not takes_classes:
        raise CardkitError(f"model {path!r} does not take num_classes; a model factory must accept "
                           f"num_classes (and may accept in_channels, input_size, mean, std)")
    return factory


def _flatten_arch_kwargs(kwargs: dict) -> dict:
    """Accept the options nested under "kwargs", as stored in ``model.arch``."""
    nested = kwargs.get("kwargs")
    if not isinstance(nested, dict):
        return kwargs
    rest = {k: v for k, v in kwargs.items() if k != "kwargs"}
    clash = sorted(set(rest) & set(nested))
    if clash:
        raise CardkitError(f"options {', '.join(clash)} are given both directly and inside kwargs; give each once")
    return {**rest, **nested}


def _bind_options(name: str, factory: Callable, kwargs: dict) -> dict:
    """Check ``kwargs`` against the factory's options and fill in their defaults, so arch records every choice."""
    params = [
        p for p in inspect.signature(factory).parameters.values() if p.kind in _OPTION_KINDS and p.name not in _COMMON
    ]
    accepted = [p.name for p in params]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise CardkitError(
            f"model {name!r} got unknown keyword {', '.join(repr(u) for u in unknown)}; "
            f"accepted: {', '.join(accepted) or 'none'}. Remove it or use one of those"
        )
    options = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    options.update(kwargs)
    missing = [a for a in accepted if a not in options]
    if missing:
        raise CardkitError(f"model {name!r} needs keyword {', '.join(missing)}; pass it to create_model")
    try:
        json.dumps(options)
    except (TypeError, ValueError):
        raise CardkitError(f"model {name!r}: options {options!r} must be plain JSON values (numbers, strings, lists)")
    return options


def _per_channel(values, default: float, what: str, in_channels: int, name: str) -> list[float]:
    if values is None:
        return [default] * in_channels
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise CardkitError(f"{name}: {what}={values!r} is not a list of numbers; give one number per input channel")
    if len(values) == 1:
        values = values * in_channels
    if len(values) != in_channels or not all(math.isfinite(v) for v in values):
        raise CardkitError(
            f"{name}: {what}={values} does not fit in_channels={in_channels}; give {in_channels} finite numbers"
        )
    return values


def _check_built(name: str, model) -> None:
    if is_user_factory(name) and not isinstance(model, nn.Module):
        raise CardkitError(f"model factory {name!r} returned {type(model).__name__}; it must return an nn.Module")
    if not is_user_factory(name) and not (isinstance(model, nn.Module)
                                          and isinstance(getattr(model, "normalize", None), Normalize)):
        raise CardkitError(
            f"model factory {name!r} returned {type(model).__name__}; it must return an nn.Module "
            f"whose attribute `normalize` is a Normalize layer applied first"
        )
