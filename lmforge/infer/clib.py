"""The C helpers of decoding (``native.c``): compiled here on first use, loaded with ctypes, and the argument blocks
of their calls. Nothing here needs PyTorch, so a process that decodes without it (``lmforge.infer.lean``) loads the
same library; ``lmforge.infer.native`` drives it with PyTorch tensors.

Built with the system's C compiler (``cc -O3 -march=native``) into ``~/.cache/lmforge/native/`` (keyed by the
source, the compiler and the CPU), once per machine; where there is no compiler, or ``LMFORGE_NATIVE=0``,
``library()`` is None."""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC"]
OPENMP = ["-fopenmp"]  # tried first: large C work then runs on PyTorch's OpenMP threads (shares_torch_openmp)
ACTIVATION_CODES = {"silu": 0, "swiglu": 0, "gelu": 1, "geglu": 1, "gelu_tanh": 2, "geglu_tanh": 2, "relu": 3,
                    "reglu": 3}  # an MLP's activation as native.c's act_args numbers it
REFINE_TOP = 64  # top candidates of an int8 output projection recomputed exactly per row (lmf_head_refine)
_LIB: ctypes.CDLL | None | bool = False  # False: not tried yet; None: not available here


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model name and flags (a cache shared by machines stays right)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep)))


def _cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lmforge/native`` (``~/.cache`` by default), beside the checkpoint-hash cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / "native"


def _compiler() -> str | None:
    """The C compiler: ``$CC``, else cc, gcc or clang on the PATH."""
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(cc) if cc else None
        if path:
            return path
    return None


def build(force: bool = False) -> Path | None:
    """Compile ``native.c`` for this machine (once; later calls find the library in the cache). None when there is
    no working C compiler."""
    cc = _compiler()
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_signature()]).encode())
    user = getattr(os, "getuid", lambda: 0)()
    for base in (_cache_dir(), Path(tempfile.gettempdir()) / f"lmforge-native-{user}"):
        lib = base / f"lmforge_native_{key.hexdigest()[:16]}.so"
        if lib.exists() and not force:
            return lib
        try:
            base.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=base)
            os.close(fd)
        except OSError:
            continue  # not writable: try the next place
        try:
            for extra in (OPENMP, []):  # without OpenMP where the compiler has none
                out = subprocess.run([cc, *FLAGS, *extra, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                                     text=True, timeout=120)
                if out.returncode == 0:
                    break
            else:
                return None
            os.replace(tmp, lib)  # atomic: concurrent builds each write their own file
            for old in base.glob("lmforge_native_*.so"):  # builds of earlier sources (unlinking a loaded one is safe)
                if old != lib:
                    old.unlink(missing_ok=True)
            return lib
        except (OSError, subprocess.SubprocessError):
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name in ("lmf_add_norm", "lmf_attention", "lmf_activation", "lmf_head_refine"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p], None
    for name in ("lmf_linear", "lmf_step"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [ctypes.c_void_p], None
    lib.lmf_linear_fast.argtypes, lib.lmf_linear_fast.restype = [], ctypes.c_int
    lib.lmf_gemv.argtypes, lib.lmf_gemv.restype = [ctypes.c_void_p], None
    lib.lmf_gemv_ok.argtypes, lib.lmf_gemv_ok.restype = [ctypes.c_int], ctypes.c_int
    lib.lmf_head_vnni.argtypes, lib.lmf_head_vnni.restype = [ctypes.c_void_p], None
    lib.lmf_vnni_ok.argtypes, lib.lmf_vnni_ok.restype = [], ctypes.c_int
    lib.lmf_kv_half_ok.argtypes, lib.lmf_kv_half_ok.restype = [], ctypes.c_int
    lib.lmf_kv_blocks_ok.argtypes, lib.lmf_kv_blocks_ok.restype = [], ctypes.c_int
    lib.lmf_openmp.argtypes, lib.lmf_openmp.restype = [], ctypes.c_void_p
    lib.lmf_int4.argtypes, lib.lmf_int4.restype = [ctypes.c_void_p], None
    lib.lmf_flash.argtypes, lib.lmf_flash.restype = [ctypes.c_void_p], ctypes.c_int
    lib.lmf_flash_ok.argtypes, lib.lmf_flash_ok.restype = [ctypes.c_int], ctypes.c_int
    lib.lmf_amx_init.argtypes, lib.lmf_amx_init.restype = [], ctypes.c_int
    lib.lmf_step_join.argtypes, lib.lmf_step_join.restype = [], None  # (waits: lets the interpreter lock go)
    lib.lmf_step_thread_ok.argtypes, lib.lmf_step_thread_ok.restype = [], ctypes.c_int
    atexit.register(lib.lmf_step_join)  # a step begun in the background ends before the interpreter frees its tensors
    held = lib.held = ctypes.PyDLL(str(path), handle=lib._handle)  # short calls that keep the interpreter lock
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    held.lmf_gather_rows.argtypes, held.lmf_gather_rows.restype = [ptr, i64, i64, ptr, i64, ptr], i64
    held.lmf_argmax_rows.argtypes, held.lmf_argmax_rows.restype = [ptr, i64, i64, i64, ptr], None
    held.lmf_sample_rows.argtypes, held.lmf_sample_rows.restype = [ptr], None
    held.lmf_distribution_rows.argtypes, held.lmf_distribution_rows.restype = [ptr, ptr], None
    held.lmf_step_start.argtypes, held.lmf_step_start.restype = [ptr], ctypes.c_int
    held.lmf_step_seconds.argtypes, held.lmf_step_seconds.restype = [], ctypes.c_double
    if os.environ.get("LMFORGE_AMX", "1") != "0":
        lib.lmf_amx_init()  # int4 products of several rows on AMX tiles where the CPU and the OS allow them
    set_parallel(lib)
    return lib


def set_parallel(lib: ctypes.CDLL | None = None) -> None:
    """Whether the C code may share its work among OpenMP threads: its own pool is the only one in a process without
    PyTorch; with PyTorch, only when that pool is PyTorch's. Decided when the library loads, and again when PyTorch
    is imported after that (``lmforge.infer.native`` calls this on import)."""
    lib = lib or (_LIB or None)
    if lib is not None:
        parallel = shares_torch_openmp(lib) if "torch" in sys.modules else bool(lib.lmf_openmp())
        ctypes.c_int.in_dll(lib, "lmf_parallel_ok").value = int(parallel)


def shares_torch_openmp(lib: ctypes.CDLL) -> bool:
    """Whether the library's OpenMP runtime is the one PyTorch's CPU kernels use (libgomp, matched by its name when
    the library was opened), so work it shares among threads runs on PyTorch's pool. A second runtime would keep a
    pool of its own on the same cores, each pool waiting on the other's: the C code then keeps to its calling
    thread."""
    ours, torch = lib.lmf_openmp(), sys.modules.get("torch")
    if not ours or torch is None:
        return False
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = Path(torch.__file__).parent / "lib" / name
        if path.exists():
            try:
                theirs = ctypes.cast(ctypes.CDLL(str(path)).omp_get_max_threads, ctypes.c_void_p).value
            except (OSError, AttributeError):
                return False
            return theirs == ours
    return False


def loaded() -> ctypes.CDLL | None:
    """The library if this process has loaded it already (``library`` would build it first where it is not built)."""
    return _LIB or None


def library() -> ctypes.CDLL | None:
    """The compiled helpers (built on first use), or None where that is not possible or ``LMFORGE_NATIVE=0``."""
    global _LIB
    if os.environ.get("LMFORGE_NATIVE", "1") == "0":
        return None
    if _LIB is False:
        _LIB = None
        for force in (False, True):  # a file in the cache that does not load (damaged) is built again, once
            try:
                path = build(force)
                _LIB = _load(path) if path is not None else None
                break
            except Exception:  # noqa: BLE001 - whatever goes wrong here, decoding keeps the PyTorch step
                continue
    return _LIB


# ---- the argument blocks (mirroring native.c) --------------------------------------------------------

_i32, _i64, _f32, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _NormArgs(ctypes.Structure):
    _fields_ = [("n", _i32), ("d", _i32), ("kind", _i32), ("y_bf", _i32), ("out_bf", _i32),
                ("y_stride", _i64), ("out_stride", _i64), ("eps", _f32), ("x", _ptr), ("y_bias", _ptr),
                ("w", _ptr), ("b", _ptr), ("out", _ptr), ("tmp", _ptr)]


class _AttnArgs(ctypes.Structure):
    _fields_ = [("n", _i32), ("nh", _i32), ("nkv", _i32), ("hd", _i32), ("rd", _i32), ("interleaved", _i32),
                ("max_len", _i32), ("y_bf", _i32), ("out_bf", _i32), ("y_stride", _i64), ("out_stride", _i64),
                ("scale", _f32), ("pos", _ptr), ("slot", _ptr), ("cos", _ptr), ("sin", _ptr), ("bias", _ptr),
                ("k", _ptr), ("v", _ptr), ("out", _ptr), ("tmp", _ptr), ("kv_half", _i32),
                ("kvb", _ptr), ("kvb_len", _ptr), ("kvb_slots", _i32)]


class _ActArgs(ctypes.Structure):
    _fields_ = [("n", _i32), ("f", _i32), ("gated", _i32), ("act", _i32), ("y_bf", _i32), ("out_bf", _i32),
                ("y_stride", _i64), ("out_stride", _i64), ("bias", _ptr), ("out", _ptr), ("tmp", _ptr)]


class _HeadArgs(ctypes.Structure):
    _fields_ = [("n", _i32), ("N", _i32), ("K", _i32), ("k", _i32), ("y_stride", _i64), ("q", _ptr), ("scales", _ptr),
                ("bias", _ptr), ("x", _ptr), ("out", _ptr), ("idx", _ptr)]


class _LinArgs(ctypes.Structure):
    _fields_ = [("n", _i32), ("K", _i32), ("N", _i32), ("Np", _i32), ("x_stride", _i64), ("x", _ptr), ("wt", _ptr),
                ("bias", _ptr), ("out", _ptr)]


class _GemvArgs(ctypes.Structure):
    _fields_ = [("n", _i32), ("K", _i32), ("N", _i32), ("x_stride", _i64), ("out_stride", _i64), ("x", _ptr),
                ("w", _ptr), ("bias", _ptr), ("out", _ptr)]


class _VnniArgs(ctypes.Structure):
    _fields_ = [("n", _i32), ("N", _i32), ("K", _i32), ("qi", _ptr), ("qsum", _ptr), ("scales", _ptr), ("bias", _ptr),
                ("x", _ptr), ("out", _ptr), ("xq", _ptr), ("xs", _ptr)]


class _Int4Args(ctypes.Structure):
    _fields_ = [("n", _i32), ("N", _i32), ("K", _i32), ("G", _i32), ("x_stride", _i64), ("out_stride", _i64),
                ("w", _ptr), ("scales", _ptr), ("zeros", _ptr), ("x", _ptr), ("out", _ptr), ("xq", _ptr),
                ("xs", _ptr), ("half", _i32)]


class _FlashArgs(ctypes.Structure):
    _fields_ = ([(n, _i32) for n in ("B", "H", "KV", "T", "S", "D", "causal")] + [("scale", _f32)]
                + [(n, _i64) for n in ("q_sb", "q_sh", "q_st", "k_sb", "k_sh", "k_ss", "v_sb", "v_sh", "v_ss",
                                       "m_sb", "m_sh", "m_st")]
                + [(n, _ptr) for n in ("q", "k", "v", "mask", "out")])


class _StepArgs(ctypes.Structure):
    _fields_ = [("n_layer", _i32), ("first", _ptr), ("lin", _ptr), ("attn", _ptr), ("norm2", _ptr), ("act", _ptr),
                ("after", _ptr), ("head", _ptr), ("top", _ptr)]


class _SampleArgs(ctypes.Structure):
    _fields_ = [("n", _i32), ("V", _i32), ("stride", _i64)] + [(n, _ptr) for n in (
        "logits", "temperature", "top_k", "top_p", "min_p", "u", "out", "e", "idx", "bsum")]


SAMPLE_BLOCK = 64  # native.c's: weights summed a block at a time
_scratch = threading.local()  # each thread's scratch of lmf_sample_rows: (V it holds, weights, ids, block sums)


def _sample_args(logits: int, n: int, V: int, stride: int, params: list, us: list[float]) -> tuple:
    """The argument block of ``lmf_sample_rows``/``lmf_distribution_rows`` and the arrays it points into (kept alive
    by the caller), on this thread's scratch."""
    sc = getattr(_scratch, "buf", None)
    if sc is None or sc[0] < V:
        sc = _scratch.buf = (V, (ctypes.c_float * V)(), (ctypes.c_int32 * V)(),
                             (ctypes.c_double * (V // SAMPLE_BLOCK + 1))())
    arrays = ((ctypes.c_float * n)(*[p.temperature for p in params]), (ctypes.c_int32 * n)(*[p.top_k for p in params]),
              (ctypes.c_float * n)(*[p.top_p for p in params]), (ctypes.c_float * n)(*[p.min_p for p in params]),
              (ctypes.c_double * n)(*us), (ctypes.c_int64 * n)())
    a = ctypes.addressof
    args = _SampleArgs(n=n, V=V, stride=stride, logits=logits, temperature=a(arrays[0]), top_k=a(arrays[1]),
                       top_p=a(arrays[2]), min_p=a(arrays[3]), u=a(arrays[4]), out=a(arrays[5]), e=a(sc[1]),
                       idx=a(sc[2]), bsum=a(sc[3]))
    return args, arrays


def draw_rows(lib: ctypes.CDLL, logits: int, n: int, V: int, stride: int, params: list, us: list[float]) -> list[int]:
    """The token of each of ``n`` rows of float32 logits at address ``logits`` (``stride`` floats apart), drawn by
    ``lmf_sample_rows`` with that row's ``SamplingParams`` (temperature, top-k, top-p, min-p; temperature 0: the
    argmax) and its uniform draw in [0, 1) from ``us``. The interpreter lock is kept (a few microseconds a row)."""
    args, arrays = _sample_args(logits, n, V, stride, params, us)
    lib.held.lmf_sample_rows(ctypes.byref(args))
    return arrays[5][:]


def distribution_rows(lib: ctypes.CDLL, logits: int, n: int, V: int, stride: int, params: list, out: int) -> None:
    """The distributions ``draw_rows`` draws those rows' tokens from, written to ``out`` (the address of n x V
    floats; a greedy row's: 1 at its argmax) by ``lmf_distribution_rows``."""
    args, _arrays = _sample_args(logits, n, V, stride, params, [0.0] * n)
    lib.held.lmf_distribution_rows(ctypes.byref(args), out)
