"""The layer cache key: everything a layer's bytes depend on, hashed into one name."""

from __future__ import annotations

import hashlib
import json

from imagebuild import __version__
from imagebuild.digest import digest_file
from imagebuild.install.compilescript import COMPILE_SCRIPT_ID
from imagebuild.install.layers import VenvLayout
from imagebuild.install.plan import LayerSpec


def layer_key(
    spec: LayerSpec, venv: VenvLayout, compiled: str | None, mtime: int, *, layer_format: str
) -> str:
    """The hex key of the layer ``spec`` makes; equal keys give byte-equal layers.

    ``compiled`` is the bytecode compiler's identity (``None`` without bytecode; the compile
    script's ``COMPILE_SCRIPT_ID`` goes with it), ``mtime`` the ``SOURCE_DATE_EPOCH`` written
    into the tar, ``layer_format`` how the tar is written and compressed
    (``image.tarball.LAYER_FORMAT``). imgbuild's own version is part of the key, so a new
    release never reuses an older one's layers.
    """
    material = {
        "imgbuild": __version__,
        "kind": spec.kind,
        "wheels": [[w.name, w.version, w.sha256 or digest_file(w.path)] for w in spec.wheels],
        "venv": str(venv.root),
        "interpreter": str(venv.base_interpreter),
        "python": list(venv.python_version),
        "compiled": None if compiled is None else f"{compiled} {COMPILE_SCRIPT_ID}",
        "mtime": mtime,
        "format": layer_format,
    }
    if spec.files:
        material["files"] = [
            [str(path), hashlib.sha256(data).hexdigest()] for path, data in spec.files
        ]
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
