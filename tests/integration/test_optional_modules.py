"""numba builds on a slim base: a module its package can do without is a warning, not a refusal.

numba's wheel ships ``tbbpool``, an extension module linked to Intel's TBB, which no slim
base has. numba imports it inside ``try/except ImportError`` and picks another threading
layer, so uv's Dockerfile builds an image in which numba runs. imgbuild refused it until
the link check read how numba imports the module. These read PyPI and use the engine and
registry of ``dev/infra.sh``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import build_from_pypi
from tests.integration.test_debian_bases import run_in_image

pytestmark = [pytest.mark.docker, pytest.mark.pypi]

PARALLEL = """\
import numba, numpy
@numba.njit(parallel=True)
def total(a):
    s = 0.0
    for i in numba.prange(a.size):
        s += a[i]
    return s
print(total(numpy.ones(1000)), numba.threading_layer())
"""


def test_numba_builds_warns_for_its_tbb_layer_and_runs_in_parallel(
    docker_env: TestInfra, image_cleanup: list[str], tmp_path: Path
) -> None:
    tag = "imgbuild-test/numba:1"
    image_cleanup.append(tag)
    warnings = build_from_pypi(tmp_path, "jit", "numba==0.68.1", tag)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(
        "warning: numba 0.68.1: numba/np/ufunc/tbbpool.cpython-311-x86_64-linux-gnu.so needs "
        "libtbb.so.12, which the image does not have; its package loads these files only for "
        "a feature that needs them"
    )
    status, out = run_in_image(docker_env, tag, "-c", PARALLEL, entrypoint="/app/.venv/bin/python")
    assert (status, out.strip().splitlines()[-1]) == (0, "1000.0 omp"), out
    # What the warning named fails where it is used, and for that library.
    status, out = run_in_image(
        docker_env, tag, "-c", "from numba.np.ufunc import tbbpool",
        entrypoint="/app/.venv/bin/python",
    )  # fmt: skip
    assert status == 1 and "libtbb.so.12: cannot open shared object file" in out, out
