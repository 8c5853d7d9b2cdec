"""CUDA wheels from PyPI build: a plugin's unmet needs are a warning, and the image says why.

PyTorch's CUDA stack ships plugins that link libraries an image rarely has (cuFile's RDMA
transport needs InfiniBand's). Nothing links them, so a build warns instead of refusing,
and the built image shows both sides of that line: what Python loads loads, and the
plugin fails to open for the library the warning named. These read PyPI and use the engine
and registry of ``dev/infra.sh``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import build_from_pypi
from tests.integration.test_debian_bases import run_in_image

pytestmark = [pytest.mark.docker, pytest.mark.pypi]

LIB = "/app/.venv/lib/python3.11/site-packages/nvidia/cu13/lib"
OPEN = "import ctypes, sys\nctypes.CDLL(sys.argv[1])\nprint('opened', sys.argv[1])\n"


def test_a_plugin_that_lacks_a_library_is_a_warning_and_fails_only_when_opened(
    docker_env: TestInfra, image_cleanup: list[str], tmp_path: Path
) -> None:
    tag = "imgbuild-test/gpu-plugin:1"
    image_cleanup.append(tag)
    warnings = build_from_pypi(tmp_path, "gds", "nvidia-cufile==1.17.1.22", tag)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(
        "warning: nvidia-cufile 1.17.1.22: nvidia/cu13/lib/libcufile_rdma.so.1 needs "
        "libibverbs.so.1 (and 2 more: libmlx5.so.1, librdmacm.so.1), which the image does "
        "not have"
    )
    python = "/app/.venv/bin/python"
    status, out = run_in_image(
        docker_env, tag, "-c", OPEN, f"{LIB}/libcufile.so.0", entrypoint=python
    )
    assert (status, out.strip()) == (0, f"opened {LIB}/libcufile.so.0")
    status, out = run_in_image(
        docker_env, tag, "-c", OPEN, f"{LIB}/libcufile_rdma.so.1", entrypoint=python
    )
    # (the loader names the first of them it looks for)
    assert status == 1 and re.search(
        r"(libibverbs|libmlx5|librdmacm)\.so\.1: cannot open shared object file", out
    ), out
