"""`@runq.function` and target loading, as a user declares and serves functions."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import pydantic
import pytest
from pydantic import BaseModel, Field

import runq
from runq.errors import ConfigError, TargetError
from runq.functions import Function, load_target, validation_message


class Point(BaseModel):
    x: float
    y: float


# declaring ------------------------------------------------------------------------------------


def test_plain_function_is_batched_by_default() -> None:
    @runq.function
    def Embed(texts: list[str]) -> list[int]:
        return [len(t) for t in texts]

    assert isinstance(Embed, Function)
    assert Embed.name == "embed"  # lower-cased: it is part of the URL
    assert Embed.batch is True
    assert Embed.input_type is str  # one item of the batch, as a caller sends it
    assert Embed.output_type is int
    assert Embed.declared == {}
    assert Embed(["ab", "c"]) == [2, 1]  # still callable as plain Python


def test_decorator_keywords_are_the_declared_settings() -> None:
    @runq.function(name="re-rank", max_batch_size=8, timeout_s=2.5)
    def rerank(pairs: list[Any]) -> list[float]:
        return [0.0 for _ in pairs]

    assert rerank.name == "re-rank"
    assert rerank.declared == {"max_batch_size": 8, "timeout_s": 2.5}


def test_unknown_decorator_keyword_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting.*max_batch\b.*known: "):
        runq.function(max_batch=8)


@pytest.mark.parametrize(
    "name", ["Embed", "9lives", "a b", "x" * 64, "ünï", "a__b", "emb_", "re--rank"]
)
def test_name_that_cannot_be_a_url_part_or_variable_is_an_error(name: str) -> None:
    def f(xs: list[int]) -> list[int]:
        return xs

    with pytest.raises(ConfigError, match="must be 1-63 lowercase"):
        runq.function(name=name)(f)


def test_unbatched_function_takes_and_gives_one_item() -> None:
    @runq.function(batch=False)
    def double(value: int) -> int:
        return value * 2

    assert double.batch is False
    assert double.input_type is int
    assert double.output_type is int
    assert double(21) == 42


def test_list_types_of_unbatched_function_are_kept_whole() -> None:
    @runq.function(batch=False)
    def total(values: list[int]) -> int:
        return sum(values)

    assert total.input_type == list[int]
    assert total.validate_input(["1", 2]) == [1, 2]


def test_batched_function_without_list_hints_is_an_error() -> None:
    def one(value: int) -> int:
        return value

    with pytest.raises(ConfigError, match=r"argument must be a list.*batch=False"):
        runq.function(one)


def test_batched_function_returning_a_non_list_is_an_error() -> None:
    def total(values: list[int]) -> int:
        return sum(values)

    with pytest.raises(ConfigError, match="return value must be a list"):
        runq.function(total)


def test_missing_hints_mean_any() -> None:
    @runq.function
    def echo(inputs):  # type: ignore[no-untyped-def]
        return inputs

    assert echo.input_type is Any
    assert echo.output_type is Any
    assert echo.validate_input({"free": ["form"]}) == {"free": ["form"]}


def test_sequence_hints_are_batches() -> None:
    @runq.function
    def lengths(texts: Sequence[str]) -> Sequence[int]:
        return [len(t) for t in texts]

    assert lengths.input_type is str
    assert lengths.output_type is int


def test_function_must_take_exactly_one_argument() -> None:
    def none() -> list[int]:
        return []

    def two(a: list[int], b: list[int]) -> list[int]:
        return a

    for target in (none, two):
        with pytest.raises(ConfigError, match="exactly one argument"):
            runq.function(target)


def test_class_is_set_up_by_load_not_at_decoration() -> None:
    setups: list[object] = []

    @runq.function(max_batch_size=4)
    class Model:
        def setup(self) -> None:
            setups.append(self)
            self.scale = 10

        def __call__(self, inputs: list[int]) -> list[int]:
            return [x * self.scale for x in inputs]

    assert setups == []
    assert Model.name == "model"
    assert Model.input_type is int and Model.output_type is int
    assert Model.declared == {"max_batch_size": 4}

    model = Model.load()
    assert len(setups) == 1
    assert model([1, 2]) == [10, 20]
    assert model([3]) == [30]
    assert len(setups) == 1  # calls reuse the loaded model

    Model.load()
    assert len(setups) == 2  # once per load, i.e. per worker process


def test_class_without_setup_loads() -> None:
    @runq.function(batch=False)
    class Shout:
        def __call__(self, text: str) -> str:
            return text.upper()

    assert Shout.load()("hi") == "HI"
    assert Shout("hi") == "HI"


def test_plain_function_loads_as_itself() -> None:
    def f(xs: list[int]) -> list[int]:
        return xs

    assert runq.function(f).load() is f


# examples -------------------------------------------------------------------------------------


def test_example_defaults_by_input_type_and_can_be_given() -> None:
    @runq.function
    def ints(xs: list[int]) -> list[int]:
        return xs

    @runq.function(example={"x": 3, "y": 4})
    def norm(points: list[Point]) -> list[float]:
        return [1.0 for _ in points]

    @runq.function(batch=False)
    def bounded(x: Annotated[float, Field(ge=0)]) -> float:
        return x

    assert ints.example == 1
    assert norm.example == {"x": 3, "y": 4}
    assert bounded.example == 1.0


# input validation -----------------------------------------------------------------------------


def test_input_is_validated_into_the_declared_type() -> None:
    @runq.function
    def norm(points: list[Point]) -> list[float]:
        return [(p.x**2 + p.y**2) ** 0.5 for p in points]

    point = norm.validate_input({"x": 3, "y": "4"})
    assert point == Point(x=3, y=4)
    with pytest.raises(pydantic.ValidationError) as caught:
        norm.validate_input({"x": "far"})
    message = validation_message(caught.value)
    assert "x: Input should be a valid number" in message
    assert "y: Field required" in message
    assert "https://" not in message  # no pydantic doc links in answers to callers


def test_top_level_error_is_reported_against_input() -> None:
    @runq.function(batch=False)
    def double(value: int) -> int:
        return value * 2

    with pytest.raises(pydantic.ValidationError) as caught:
        double.validate_input("twenty")
    assert validation_message(caught.value).startswith("input: ")


def test_annotated_constraints_are_enforced() -> None:
    @runq.function
    def embed(texts: list[Annotated[str, Field(min_length=2)]]) -> list[int]:
        return [len(t) for t in texts]

    @runq.function(batch=False)
    def sqrt(x: Annotated[float, Field(ge=0)]) -> float:
        return float(x**0.5)

    assert embed.validate_input("ok") == "ok"
    with pytest.raises(pydantic.ValidationError, match="at least 2 characters"):
        embed.validate_input("a")
    with pytest.raises(pydantic.ValidationError, match="greater than or equal to 0"):
        sqrt.validate_input(-1)


# load_target ----------------------------------------------------------------------------------

TARGET = """
    import runq

    @runq.function
    def echo(inputs: list[int]) -> list[int]:
        return inputs

    @runq.function(batch=False)
    def double(value: int) -> int:
        return value * 2

    helper = 3
"""


@pytest.fixture
def imports() -> Iterator[None]:
    """Undoes what importing a target does to sys.path and sys.modules."""
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        del sys.modules[name]


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


@pytest.mark.usefixtures("imports")
def test_load_file(tmp_path: Path) -> None:
    path = write(tmp_path, "serve_echo.py", TARGET)
    functions = load_target(str(path))
    assert sorted(functions) == ["double", "echo"]
    assert functions["double"](4) == 8


@pytest.mark.usefixtures("imports")
def test_file_imports_its_sibling_modules(tmp_path: Path) -> None:
    write(tmp_path, "runq_test_sibling.py", "FACTOR = 3\n")
    path = write(
        tmp_path,
        "serve_sibling.py",
        """
        import runq
        from runq_test_sibling import FACTOR

        @runq.function(batch=False)
        def triple(value: int) -> int:
            return value * FACTOR
        """,
    )
    assert load_target(str(path))["triple"](2) == 6


@pytest.mark.usefixtures("imports")
def test_load_module_and_module_attr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "runq_test_target.py", TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert sorted(load_target("runq_test_target")) == ["double", "echo"]
    only = load_target("runq_test_target:double")
    assert list(only) == ["double"]
    assert only["double"](5) == 10


@pytest.mark.usefixtures("imports")
def test_load_file_attr(tmp_path: Path) -> None:
    path = write(tmp_path, "serve_attr.py", TARGET)
    assert list(load_target(f"{path}:echo")) == ["echo"]


@pytest.mark.usefixtures("imports")
@pytest.mark.parametrize("attr", ["missing", "helper", "runq"])
def test_attr_that_is_not_a_declared_function_is_an_error(tmp_path: Path, attr: str) -> None:
    path = write(tmp_path, "serve_bad_attr.py", TARGET)
    with pytest.raises(TargetError, match=f"{attr}' is not a function declared"):
        load_target(f"{path}:{attr}")


@pytest.mark.usefixtures("imports")
def test_file_declaring_no_function_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "serve_nothing.py", "def plain(x):\n    return x\n")
    with pytest.raises(TargetError, match=r"declares no function with @runq\.function"):
        load_target(str(path))


@pytest.mark.usefixtures("imports")
def test_two_functions_with_one_name_is_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "serve_twice.py",
        """
        import runq

        @runq.function(name="embed")
        def first(xs: list[int]) -> list[int]:
            return xs

        @runq.function(name="embed")
        def second(xs: list[int]) -> list[int]:
            return xs
        """,
    )
    with pytest.raises(TargetError, match="two functions named 'embed'"):
        load_target(str(path))


@pytest.mark.usefixtures("imports")
def test_missing_file_or_module_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="no such file"):
        load_target(str(tmp_path / "absent.py"))
    with pytest.raises(TargetError, match="cannot import 'runq_test_absent_module'"):
        load_target("runq_test_absent_module")


def test_file_named_like_an_imported_module_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "json.py", TARGET)
    with pytest.raises(TargetError, match="shadows the module 'json'"):
        load_target(str(path))
    assert sys.modules["json"].__file__ != str(path)


def test_file_that_fails_to_import_leaves_no_module_behind(tmp_path: Path) -> None:
    path = write(tmp_path, "serve_broken.py", "raise RuntimeError('broken at import')\n")
    with pytest.raises(RuntimeError, match="broken at import"):
        load_target(str(path))
    assert "serve_broken" not in sys.modules
