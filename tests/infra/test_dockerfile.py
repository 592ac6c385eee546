"""infra/Dockerfile and the build context: a non-root, python-slim image with runq as its
entrypoint, CPU torch pinned as the Makefile pins it, valid settings in its environment, and a
.dockerignore that keeps what the image copies and nothing heavy."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from runq.errors import ConfigError
from runq.settings import load_settings
from tests.infra.helpers import (
    DOCKERIGNORE,
    ROOT,
    arg_defaults,
    deployments,
    dockerfile_stages,
    image_env,
    parse_runq_command,
    substitute,
)

# the image ------------------------------------------------------------------------------------


def image_user() -> str:
    users = [rest for instruction, rest in dockerfile_stages()[-1] if instruction == "USER"]
    assert users, "the final stage has no USER: the image would run as root"
    return users[-1]


def test_image_runs_as_a_non_root_user_that_kubernetes_can_check() -> None:
    user, _, group = image_user().partition(":")
    assert user not in ("root", "0", "") and group not in ("root", "0")
    # Numeric, so that runAsNonRoot can verify it; the manifests run as that same uid.
    assert user.isdigit()
    for deployment in deployments():
        security = deployment["spec"]["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == int(user)


def test_image_is_python_slim_with_runq_as_entrypoint_serving_the_gateway_by_default() -> None:
    stages = dockerfile_stages()
    global_args = arg_defaults(stages[0])
    stage_names = {rest.split()[-1] for (_, rest), *_ in stages[1:] if " AS " in rest.upper()}
    bases = [substitute(rest.split()[0], global_args) for (_, rest), *_ in stages[1:]]
    assert all(base in stage_names or base == "python:3.11-slim" for base in bases), bases
    final = stages[-1]
    assert json.loads(next(rest for i, rest in final if i == "ENTRYPOINT")) == ["runq"]
    command = json.loads(next(rest for i, rest in final if i == "CMD"))
    assert command[0] == "gateway"
    # Bound past loopback, the image's gateway will not start until it is told about keys.
    with pytest.raises(ConfigError, match="`auth`"):
        parse_runq_command(command, image_env())
    parse_runq_command(command, {**image_env(), "RUNQ_AUTH": "keys"})
    assert "8000" in next(rest for i, rest in final if i == "EXPOSE").split()


def test_image_installs_cpu_torch_pinned_as_the_makefile_before_the_package() -> None:
    build = next(stage for stage in dockerfile_stages() if "pip install" in str(stage))
    args = arg_defaults(build)
    runs = [substitute(rest, args) for instruction, rest in build if instruction == "RUN"]
    torch_runs = [i for i, run in enumerate(runs) if "torch==" in run]
    package_runs = [i for i, run in enumerate(runs) if re.search(r"pip install \S*\.\[", run)]
    assert torch_runs and package_runs and torch_runs[0] < package_runs[0], runs
    torch_run = runs[torch_runs[0]]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_run.replace('"', "")
    makefile_pin = re.search(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text())
    assert makefile_pin is not None
    assert f"torch=={makefile_pin.group(1)}" in torch_run.replace('"', "")


def test_image_settings_from_its_environment_are_valid() -> None:
    env = image_env()
    assert any(key.startswith("RUNQ_") for key in env)
    load_settings(env=env)


# .dockerignore --------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        regex = _pattern_regex(line.lstrip("!").strip().strip("/"))
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def copied_sources() -> Iterator[Path]:
    for instruction, rest in (i for stage in dockerfile_stages() for i in stage):
        if instruction == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            yield from (ROOT / source for source in sources)


def test_build_context_holds_what_the_image_copies_and_nothing_heavy() -> None:
    sources = list(copied_sources())
    assert sources
    for source in sources:
        assert source.exists(), source
        files = [source] if source.is_file() else source.rglob("*.py")
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not dockerignored(relative), relative
    for left_out in (
        ".git/HEAD",
        ".venv/bin/python",
        ".mypy_cache/3.11/cache.db",
        ".ruff_cache/CACHEDIR.TAG",
        ".pytest_cache/README.md",
        "benchmarks/results/latest.json",
        "runq/__pycache__/cli.cpython-311.pyc",
        "runq.egg-info/PKG-INFO",
        "tests/infra/test_dockerfile.py",
    ):
        assert dockerignored(left_out), left_out
