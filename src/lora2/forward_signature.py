"""A wrapper's ``forward`` that advertises the wrapped model's signature.

🤗 Trainer drops dataset columns the model's ``forward`` does not name, and finds label columns
from it; pipelines inspect it too. A wrapper whose forward is ``(*args, **kwargs)`` would lose
``input_ids``, ``labels``... So the descriptor hands out, per instance, a function carrying the
wrapped model's signature that calls the instance's ``_forward``.
"""

from __future__ import annotations

import inspect
from typing import Any


class BoundForward:
    """What ``instance.forward`` is: calls ``instance._forward`` and advertises the wrapped model's signature
    (``__signature__``, which tools and wrappers copy), like a bound method it has ``__func__`` (a function of
    ``self`` whose signature is ``self`` plus the model's) and ``__self__``. accelerate's mixed precision wraps
    ``forward.__func__`` and binds it to the model; ``unwrap_model(..., keep_fp32_wrapper=False)`` binds the
    innermost function again, so a forward without ``self`` would get the model as its first input."""

    def __init__(self, obj: Any) -> None:
        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self._forward(*args, **kwargs)

        signature: inspect.Signature = obj._forward_signature
        own = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        forward.__signature__ = signature.replace(parameters=[own, *signature.parameters.values()])  # type: ignore[attr-defined]
        forward.__doc__ = type(obj)._forward.__doc__
        self.__func__, self.__self__ = forward, obj
        self.__signature__, self.__doc__, self.__name__ = signature, forward.__doc__, "forward"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__self__._forward(*args, **kwargs)


class ForwardWithBaseSignature:
    """Class attribute ``forward = ForwardWithBaseSignature()`` on a module that sets
    ``_forward_signature`` (the wrapped model's ``inspect.signature``) and defines ``_forward``."""

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:  # class-level inspection (Trainer's find_labels): the common HF signature
            return class_level_forward
        return BoundForward(obj)


def class_level_forward(self: Any, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
    """Run the wrapped model; add γ·R to its loss whenever it computes one (method.md §3)."""
    if labels is not None:
        kwargs["labels"] = labels
    return self._forward(*args, **kwargs)
