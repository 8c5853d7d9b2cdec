"""The GPU driver's libraries: what a container given a GPU has mounted, and no image ships.

The NVIDIA container toolkit mounts the driver's user-space libraries into a container that
asks for a GPU (``--gpus``, CDI), from the host, matched to its kernel module. CUDA wheels
link some of them all the same (PyTorch's ``libcaffe2_nvrtc.so`` needs ``libcuda.so.1``), so
the link check counts them as provided.
"""

from __future__ import annotations

_LIBRARIES = frozenset(
    {
        # libnvidia-container's lists (src/nvc_info.c): utility, compute, video, graphics
        # (GLVND's vendor libraries), NGX and WSL's dxcore; named as before ".so".
        "libnvidia-ml",
        "libnvidia-cfg",
        "libnvidia-nscq",
        "libcuda",
        "libcudadebugger",
        "libnvidia-opencl",
        "libnvidia-gpucomp",
        "libnvidia-ptxjitcompiler",
        "libnvidia-fatbinaryloader",
        "libnvidia-allocator",
        "libnvidia-compiler",
        "libnvidia-pkcs11",
        "libnvidia-pkcs11-openssl3",
        "libnvidia-nvvm",
        "libnvidia-tileiras",
        "libvdpau_nvidia",
        "libnvidia-encode",
        "libnvidia-opticalflow",
        "libnvcuvid",
        "libnvidia-eglcore",
        "libnvidia-glcore",
        "libnvidia-tls",
        "libnvidia-glsi",
        "libnvidia-fbc",
        "libnvidia-ifr",
        "libnvidia-rtcore",
        "libnvoptix",
        "libGLX_nvidia",
        "libEGL_nvidia",
        "libGLESv2_nvidia",
        "libGLESv1_CM_nvidia",
        "libnvidia-glvkspirv",
        "libnvidia-cbl",
        "libnvidia-ngx",
        "libdxcore",
    }
)
"""The GPU driver's libraries: a container that asks for a GPU has them mounted, an image never."""


def from_the_gpu_driver(library: str) -> bool:
    """Whether the DT_NEEDED name ``library`` (``libcuda.so.1``) is one of the driver's."""
    return library.rpartition("/")[2].partition(".so")[0] in _LIBRARIES
