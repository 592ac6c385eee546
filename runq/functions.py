"""`@runq.function`: declaring a served function, its batching contract and its schemas."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from pydantic import TypeAdapter, ValidationError

from runq.errors import ConfigError, TargetError
from runq.settings import FUNCTION_SETTING_NAMES

# Part of URLs and of RUNQ_FUNCTIONS__<NAME>__<SETTING> variables, so no "__" and no trailing "_".
NAME_PATTERN = re.compile(r"^(?=.{1,63}$)[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*$")


@dataclass(frozen=True, eq=False)
class Function:
    """A declared function: what to call, how to batch it, and the types it takes and gives.

    ``target`` is either a callable or a class whose instances have ``setup()`` (optional) and
    ``__call__``. Batched functions take a list of inputs and return a list of the same length.
    A generator streams: unbatched, it yields chunks for its one input; batched, each yield is
    a list aligned with the batch's inputs, a chunk or None (nothing this step) per input. Its
    task's output is the list of its chunks (``output_type`` is ``list[chunk_type]``).
    """

    name: str
    target: Callable[..., Any]
    batch: bool
    declared: Mapping[str, Any]
    input_type: Any
    output_type: Any
    input_adapter: TypeAdapter[Any] = field(repr=False)
    example: Any = None
    # Only a type that says so (Field(allow_inf_nan=True)) takes NaN and Infinity: runq's JSON
    # is strict, and pydantic's plain float would take them.
    allows_inf_nan: bool = False
    stream: bool = False
    # What one chunk is (streaming functions only), from the Iterator/Generator return hint.
    chunk_type: Any = None

    def load(self) -> Callable[[Any], Any]:
        """Instantiates and sets up the model: once per worker process, never in the gateway."""
        if not inspect.isclass(self.target):
            return self.target
        instance = self.target()
        setup = getattr(instance, "setup", None)
        if callable(setup):
            setup()
        return typing.cast(Callable[[Any], Any], instance)

    def validate_input(self, value: Any) -> Any:
        return self.input_adapter.validate_python(value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Declared functions stay callable as plain Python, e.g. in a user's own unit tests.
        if inspect.isclass(self.target):
            return self.load()(*args, **kwargs)
        return self.target(*args, **kwargs)


@overload
def function(target: Callable[..., Any], /) -> Function: ...


@overload
def function(
    *, name: str | None = None, batch: bool = True, example: Any = None, **settings: Any
) -> Callable[[Callable[..., Any]], Function]: ...


def function(
    target: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    batch: bool = True,
    example: Any = None,
    **settings: Any,
) -> Function | Callable[[Callable[..., Any]], Function]:
    """Declares a served function or class; other keywords are the per-function settings.

    ``example`` is one input, shown in the API docs and in the curl line `runq serve` prints.
    """
    unknown = set(settings) - FUNCTION_SETTING_NAMES
    if unknown:
        raise ConfigError(
            f"@runq.function got unknown setting(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(FUNCTION_SETTING_NAMES))}"
        )

    def declare(obj: Callable[..., Any]) -> Function:
        fn_name = name or obj.__name__.lower()
        if not NAME_PATTERN.match(fn_name):
            raise ConfigError(
                f"function name {fn_name!r} must be 1-63 lowercase letters and digits, words "
                "joined by single '_' or '-', starting with a letter (it is part of URLs)"
            )
        input_type, output_type = _io_types(obj, batch)
        stream = inspect.isgeneratorfunction(obj.__call__ if inspect.isclass(obj) else obj)
        chunk_type = _chunk_type(obj, output_type, batch) if stream else None
        if stream:
            output_type = list[chunk_type]  # type: ignore[valid-type]
        input_adapter = TypeAdapter(input_type)
        return Function(
            name=fn_name,
            target=obj,
            batch=batch,
            declared=dict(settings),
            input_type=input_type,
            output_type=output_type,
            input_adapter=input_adapter,
            example=example if example is not None else _default_example(input_type),
            allows_inf_nan=_says_allow_inf_nan(input_adapter.core_schema),
            stream=stream,
            chunk_type=chunk_type,
        )

    return declare(target) if target is not None else declare


def _says_allow_inf_nan(schema: Any) -> bool:
    """Whether any part of a pydantic core schema sets allow_inf_nan explicitly."""
    if isinstance(schema, dict):
        if schema.get("allow_inf_nan") is True:
            return True
        return any(_says_allow_inf_nan(part) for part in schema.values())
    if isinstance(schema, list | tuple):
        return any(_says_allow_inf_nan(part) for part in schema)
    return False


def _io_types(obj: Callable[..., Any], batch: bool) -> tuple[Any, Any]:
    call = obj.__call__ if inspect.isclass(obj) else obj
    try:
        # include_extras keeps Annotated[..., Field(...)] constraints for input validation.
        hints = typing.get_type_hints(call, include_extras=True)
    except Exception as exc:
        raise ConfigError(f"cannot resolve the type hints of {obj!r}: {exc}") from None
    params = [
        p
        for p in inspect.signature(call).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) != 1:
        raise ConfigError(
            f"{obj.__qualname__} must take exactly one argument "
            f"({'a list of inputs' if batch else 'one input'})"
        )
    input_hint = hints.get(params[0].name, Any)
    output_hint = hints.get("return", Any)
    if not batch:
        return input_hint, output_hint
    if inspect.isgeneratorfunction(call):
        # Each yield is the list of the step's chunks; _chunk_type takes it apart.
        return _item_type(obj, input_hint, "argument"), output_hint
    return _item_type(obj, input_hint, "argument"), _item_type(obj, output_hint, "return value")


_STREAMS = (Iterator, Generator, Iterable)


def _chunk_type(obj: Callable[..., Any], hint: Any, batch: bool) -> Any:
    """The chunk type of a generator from its return hint: ``Iterator[C]`` unbatched,
    ``Iterator[list[C | None]]`` batched (None: no chunk for that input this step)."""
    if hint is Any:
        return Any
    if typing.get_origin(hint) not in _STREAMS:
        raise ConfigError(
            f"{obj.__qualname__} is a generator, so its return hint must be Iterator[...] or "
            f"Generator[...] (got {hint!r})"
        )
    args = typing.get_args(hint)
    step = args[0] if args else Any
    if not batch:
        return step
    item = _item_type(obj, step, "yield")
    if typing.get_origin(item) in (typing.Union, types.UnionType):
        kept = [arg for arg in typing.get_args(item) if arg is not type(None)]
        item = kept[0] if len(kept) == 1 else typing.Union[tuple(kept)]  # noqa: UP007
    return item


def _item_type(obj: Callable[..., Any], hint: Any, what: str) -> Any:
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if hint is Any:
        return Any
    if typing.get_origin(hint) in (list, Sequence, Iterable):
        args = typing.get_args(hint)
        return args[0] if args else Any
    if hint is list:
        return Any
    raise ConfigError(
        f"{obj.__qualname__} is batched, so its {what} must be a list (got {hint!r}); "
        "declare it with batch=False to take one input at a time"
    )


def _default_example(input_type: Any) -> Any:
    if typing.get_origin(input_type) is typing.Annotated:
        input_type = typing.get_args(input_type)[0]
    base = typing.get_origin(input_type) or input_type
    return {str: "hello", int: 1, float: 1.0, bool: True, list: [], dict: {}}.get(base, "hello")


def validation_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'input'}: {err['msg']}"
        for err in exc.errors(include_url=False)
    )


def load_target(target: str) -> dict[str, Function]:
    """Imports ``path/to/file.py``, ``module`` or ``module:attr`` and returns its functions."""
    module_part, _, attr = target.partition(":")
    module = _import(module_part)
    if attr:
        obj = getattr(module, attr, None)
        if not isinstance(obj, Function):
            raise TargetError(f"{target!r} is not a function declared with @runq.function")
        return {obj.name: obj}
    found: dict[str, Function] = {}
    for value in vars(module).values():
        if isinstance(value, Function):
            if value.name in found and found[value.name] is not value:
                raise TargetError(f"{target!r} declares two functions named {value.name!r}")
            found[value.name] = value
    if not found:
        raise TargetError(f"{target!r} declares no function with @runq.function")
    return found


def _import(module_part: str) -> Any:
    if module_part.endswith(".py"):
        path = Path(module_part).resolve()
        if not path.is_file():
            raise TargetError(f"no such file: {module_part}")
        # Sibling modules of the target file import, but last: a folder holding, say, a
        # `queue` package must not shadow the standard library's for everything imported later.
        if str(path.parent) not in sys.path:
            sys.path.append(str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise TargetError(f"cannot import {module_part}")
        loaded = sys.modules.get(path.stem)
        if loaded is not None and getattr(loaded, "__file__", None) != str(path):
            raise TargetError(
                f"{module_part}: its name shadows the module {path.stem!r} "
                f"({getattr(loaded, '__file__', 'built in')}); rename the file"
            )
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[path.stem]
            raise
        return module
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as exc:
        raise TargetError(f"cannot import {module_part!r}: {exc}") from None
