"""Building and loading the quantized matmul kernels (`kernels.c`) on the machine that runs them.

The library is compiled once per machine with the C compiler found there (`$CC`, else cc, gcc or clang), for that
machine's own CPU (`-march=native`: AVX2 where the CPU has it, plain C elsewhere) and with OpenMP, and kept under
`~/.cache/layerline/kernels/` (`$LAYERLINE_KERNEL_CACHE`) by a hash of the source, the compiler and the CPU, so a
later start loads it in milliseconds. It is loaded with ctypes after torch, so it shares torch's OpenMP runtime
(one thread pool, sized by torch.set_num_threads). Building takes a few seconds.

`kernels()` returns the loaded library or raises `KernelUnavailable` saying why (no compiler, a failed build, or
`LAYERLINE_KERNELS=off`); callers decide what to do without it. This module knows nothing of models.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import secrets
import shutil
import subprocess
import threading

import torch  # noqa: F401  (loaded first: the library then binds to torch's OpenMP runtime)

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.c")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error = ""


class KernelUnavailable(RuntimeError):
    """The kernel library cannot be built or loaded here; the message says why."""


def cache_root() -> str:
    explicit = os.environ.get("LAYERLINE_KERNEL_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "layerline", "kernels")


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _attempts(cc: str, out: str) -> list[list[str]]:
    # no contraction of a * b + c into FMAs the compiler picks per call site: a row computed alone and in a
    # group of rows must give the same bits (batched sessions equal each session alone)
    base = [cc, "-O3", "-std=gnu11", "-ffp-contract=off", "-fPIC", "-shared", "-o", out, SOURCE, "-lm"]
    native = ["-march=native"] if platform.machine() in ("x86_64", "AMD64", "i686") else ["-mcpu=native"]
    # extra flags after the CPU's own, e.g. "-mno-avx512vnni -mno-avxvnni" to time the plain AVX2 paths
    native += os.environ.get("LAYERLINE_KERNEL_FLAGS", "").split()
    return [base + native + ["-fopenmp"], base + native, base + ["-fopenmp"], base]


def _build() -> ctypes.CDLL:
    if os.environ.get("LAYERLINE_KERNELS", "").lower() in ("0", "off", "no", "false"):
        raise KernelUnavailable("the quantized kernels are turned off (LAYERLINE_KERNELS=off)")
    cc = _compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc or clang) to build the quantized kernels")
    with open(SOURCE, "rb") as f:
        source = f.read()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"the C compiler {cc} does not run: {e}") from None
    flags = " ".join(a for cmd in _attempts(cc, "") for a in cmd).encode()
    key = hashlib.sha256(b"\0".join([source, flags, version.encode(), _cpu_signature().encode()])).hexdigest()
    root = cache_root()
    path = os.path.join(root, f"layerline-kernels-{key[:24]}.so")
    if not os.path.isfile(path):
        os.makedirs(root, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        errors = []
        for cmd in _attempts(cc, tmp):
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(str(e))
                continue
            if r.returncode == 0:
                os.replace(tmp, path)
                logger.info("built the quantized kernels: %s", " ".join(cmd[:1] + cmd[1:5] + cmd[9:]))
                break
            errors.append(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
        else:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise KernelUnavailable(f"building the quantized kernels with {cc} failed: {errors[0]}")
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise KernelUnavailable(f"loading the quantized kernels from {path} failed: {e}") from None
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, p, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    sigs = {
        "ll_row_bytes": (i64, [i32, i64]),
        "ll_supported": (i32, [i32]),
        "ll_simd": (i32, []),
        "ll_threads": (i32, [i32]),
        "ll_scratch_bytes": (i64, [p, i64]),
        "ll_linear": (None, [p, p, i64, i64, p, i64, i32, p, f32, i32, p, i32]),
        "ll_dequant": (None, [i32, i32, p, i64, i64, i64, p, i32]),
        "ll_gather": (None, [i32, i32, p, i64, p, i64, p]),
        "ll_x8_supported": (i32, [i32]),
        "ll_repack_x8": (i32, [i32, p, i64, i64]),
        "ll_gemm_x8": (None, [i32, p, i64, i64, p, i64, p]),
        "ll_gemm": (None, [i32, p, i64, i64, p, i64, p]),
        "ll_gemm_ref": (None, [i32, p, i64, i64, p, i64, p]),
        "ll_act_bytes": (i64, [i32, i64]),
        "ll_quantize_act": (None, [i32, p, i64, i64, p]),
        "ll_quantize_weights": (i32, [i32, p, i64, i64, p, i32]),
        "ll_decode_scratch_bytes": (i64, [p, i64, i64, i64, i64, i64, i64]),
        "ll_decode_layers": (None, [p, i64, p, i64, i64, i64, i64, i64, i64, f32, p, p, p, f32, p, i32]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def kernels() -> ctypes.CDLL:
    """The kernel library, built on first use; KernelUnavailable says why not."""
    global _lib, _error
    with _lock:
        if _lib is None and not _error:
            try:
                _lib = _build()
            except KernelUnavailable as e:
                _error = str(e)
        if _lib is None:
            raise KernelUnavailable(_error)
        return _lib


def available() -> str:
    """ "" when the kernels load here, else why they do not."""
    try:
        kernels()
        return ""
    except KernelUnavailable as e:
        return str(e)


def simd() -> str:
    """The instruction set the loaded kernels use ("avx2+vnni", "avx2" or "c")."""
    return {3: "avx2+vnni", 2: "avx2"}.get(kernels().ll_simd(), "c")
