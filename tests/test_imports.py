"""Which extension modules a wheel imports only where it can do without them (``install.imports``).

The wheels here hold Python files only: what is judged is how they import a module, and a
module's own file need not exist for that.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from imagebuild.install.imports import guarded_modules, module_of

MOD = "pkg._fast"


def wheel(tmp_path: Path, files: dict[str, str]) -> Path:
    path = tmp_path / "pkg-1.0-cp311-cp311-manylinux_2_17_x86_64.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def guarded(tmp_path: Path, source: str, *, name: str = "pkg/__init__.py") -> bool:
    return MOD in guarded_modules(wheel(tmp_path, {name: source}), [MOD])


@pytest.mark.parametrize(
    "source",
    [
        "try:\n    from . import _fast\nexcept ImportError:\n    _fast = None\n",
        "try:\n    import pkg._fast as f\nexcept (OSError, ImportError):\n    f = None\n",
        "try:\n    from pkg._fast import go\nexcept Exception:\n    go = None\n",
        "try:\n    from ._fast import go\nexcept:\n    go = None\n",
        "try:\n    from ._fast import go\nexcept builtins.BaseException as e:\n    log(e)\n",
        "import contextlib\nwith contextlib.suppress(ImportError):\n    from . import _fast\n",
        # A guard around a class body holds: the body runs where it stands.
        "try:\n    class C:\n        from . import _fast\nexcept ImportError:\n    pass\n",
        # A guard inside the function holds when the function runs.
        "def use():\n    try:\n        from . import _fast\n"
        "    except ImportError:\n        return None\n",
        # An earlier handler for another error is passed by.
        "try:\n    from . import _fast\nexcept KeyError:\n    raise\n"
        "except ImportError:\n    pass\n",
    ],
)
def test_an_import_under_a_guard_that_lets_the_error_go_is_guarded(
    tmp_path: Path, source: str
) -> None:
    assert guarded(tmp_path, source)


@pytest.mark.parametrize(
    "source",
    [
        "from . import _fast\n",
        "import pkg._fast\n",
        # numba's _typeconv: the handler makes a longer message of it, and raises.
        "try:\n    from . import _fast\n"
        "except ImportError as e:\n    raise ImportError('no') from e\n",
        "try:\n    from . import _fast\nexcept ImportError:\n    if strict:\n        raise\n",
        # A library that cannot load raises ImportError, which this handler does not catch.
        "try:\n    from . import _fast\nexcept ModuleNotFoundError:\n    pass\n",
        "with suppress(KeyError):\n    from . import _fast\n",
        # The guard around a definition is gone when the function runs.
        "try:\n    def use():\n        from . import _fast\nexcept ImportError:\n    pass\n",
        # In the handler or the else of a try, an import is not in its body.
        "try:\n    import os\nexcept ImportError:\n    from . import _fast\n",
        "try:\n    import os\nexcept ImportError:\n    pass\nelse:\n    from . import _fast\n",
        # Guarded once, needed another time.
        "try:\n    from . import _fast\nexcept ImportError:\n    pass\nfrom ._fast import go\n",
    ],
)
def test_an_import_without_such_a_guard_is_not(tmp_path: Path, source: str) -> None:
    assert not guarded(tmp_path, source)


def test_a_module_no_import_statement_names_is_not_guarded(tmp_path: Path) -> None:
    # Imported by importlib, by C code or by the user: nothing says the package does without.
    source = "import importlib\n_fast = importlib.import_module('pkg._fast')\n"
    assert not guarded(tmp_path, source)
    assert not guarded(tmp_path, "# _fast is imported by the user\n")


def test_every_file_of_the_wheel_counts_and_relative_imports_resolve(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "try:\n    from .. import _fast\nexcept ImportError:\n    pass\n",
        "pkg/sub/mod.py": "try:\n    from .._fast import go\nexcept ImportError:\n    pass\n",
        "pkg/sub/other.py": "try:\n    from . import _fast\nexcept ImportError:\n    pass\n",
        "pkg.data/purelib/pkg/extra.py": "from . import _fast_not\n",
    }
    assert guarded_modules(wheel(tmp_path, files), [MOD, "pkg.sub._fast"]) == {
        MOD,
        "pkg.sub._fast",
    }
    files["pkg-1.0.data/platlib/pkg/late.py"] = "from pkg import _fast\n"
    assert guarded_modules(wheel(tmp_path, files), [MOD]) == frozenset()
    # Files that do not parse are passed by; names they spell do not count.
    files = {"pkg/bad.py": "from . import _fast(\n", "pkg/ok.py": "from . import _slow\n"}
    assert guarded_modules(wheel(tmp_path, files), [MOD]) == frozenset()


def test_a_member_path_names_its_module() -> None:
    assert module_of("numba/np/ufunc/tbbpool.cpython-311-x86_64-linux-gnu.so") == (
        "numba.np.ufunc.tbbpool"
    )
    assert module_of("ujson.cpython-311-x86_64-linux-gnu.so") == "ujson"
    assert module_of("pkg/_speedups.abi3.so") == "pkg._speedups"
    assert module_of("pkg-1.0.data/platlib/pkg/_c.so") == "pkg._c"
    assert module_of("pkg/sub/__init__.py") == "pkg.sub"
