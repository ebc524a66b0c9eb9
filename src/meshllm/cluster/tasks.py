"""Doing one thing on every device at once, and reporting every failure together."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

from meshllm.errors import ConfigError

ERROR_INDENT = "\n       "  # continuation lines line up under the text after "error: "

Item = TypeVar("Item")
Result = TypeVar("Result")


def parallel(function: Callable[[Item], Result], items: Iterable[Item]) -> list[Result | Exception]:
    """function(item) for every item at once (ssh round trips overlap), in order; a raised error is returned."""
    items = list(items)
    if not items:
        return []

    def guarded(item: Item) -> Result | Exception:
        try:
            return function(item)
        except Exception as error:
            return error

    with ThreadPoolExecutor(max_workers=min(16, len(items))) as pool:
        return list(pool.map(guarded, items))


def raise_all(errors: Iterable[object]) -> None:
    """Raise the exceptions among `errors` as one ConfigError, one line each (any other kind as it is)."""
    found = [error for error in errors if isinstance(error, Exception)]
    for error in found:
        if not isinstance(error, ConfigError):
            raise error
    if found:
        raise ConfigError(ERROR_INDENT.join(str(error) for error in found))


def parallel_or_raise(function: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
    """`parallel`, raising its errors together (see `raise_all`) instead of returning them."""
    results = parallel(function, items)
    raise_all(results)
    return cast(list[Result], results)  # no Exception among them: raise_all raised if there was one
