"""The optional native CPU extension: build it with CMake, find it, load it.

``CMakeLists.txt`` at the top of a source checkout builds ``csrc/`` into
``libfastflamingo_native.so``, PyTorch operators under ``torch.ops.fastflamingo_native``:
the image-causal cross-attention and the Perceiver attention, forward and backward (the CPU
counterparts of the Triton kernels). ``fastflamingo build-native`` (or :func:`build`) configures and builds it in
``build/native/<key>/``, where the key names the torch version and installation, and the CPU's
instruction sets (the library is compiled with ``-march=native`` for the machine that runs it).

Once built, it is found and loaded when ``fastflamingo`` is imported (``FASTFLAMINGO_NATIVE=0``
turns that off; then, not inside a first ``torch.compile`` trace, which may touch no file), and
:func:`fastflamingo.ops.image_causal_attention` and :func:`fastflamingo.ops.perceiver_attention`
with ``backend="auto"`` run it for CPU tensors; ``backend="native"`` asks for it (and says how to build it when it is missing).
Without it the package runs its PyTorch path, as before.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the source checkout (where CMakeLists.txt is)
LIBRARY = "libfastflamingo_native.so"
OPS = "fastflamingo_native"

_state = {"loaded": False, "probed": False, "path": None}


def _sources() -> list[Path]:
    return [ROOT / "CMakeLists.txt", *sorted((ROOT / "csrc").glob("*.cpp")), *sorted((ROOT / "csrc").glob("*.h"))]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir() -> Path:
    """Where this machine's build lives: ``$FASTFLAMINGO_NATIVE_BUILD`` or
    ``<checkout>/build/native/torch-<version>-<hash of torch's folder and the CPU's flags>``."""
    if os.environ.get("FASTFLAMINGO_NATIVE_BUILD"):
        return Path(os.environ["FASTFLAMINGO_NATIVE_BUILD"])
    import torch
    torch_dir = Path(torch.__file__).resolve().parent
    key = hashlib.sha256(f"{torch_dir}\n{platform.machine()}\n{_cpu_flags()}".encode()).hexdigest()[:12]
    return ROOT / "build" / "native" / f"torch-{torch.__version__.replace('+', '_')}-{key}"


def library_path() -> Path:
    return build_dir() / LIBRARY


def up_to_date(path: Path | None = None) -> bool:
    """Whether a built library exists and is newer than every source it is built from."""
    path = library_path() if path is None else path
    if not path.exists():
        return False
    built = path.stat().st_mtime
    return all(src.stat().st_mtime <= built for src in _sources() if src.exists())


def build(verbose: bool = False, jobs: int | None = None) -> Path:
    """Configure (once) and build the extension for this Python's torch; returns the library's
    path. CMake rebuilds only what changed, so a second call costs about a second."""
    if not (ROOT / "CMakeLists.txt").exists() or not (ROOT / "csrc").is_dir():
        raise RuntimeError(f"the native extension builds from a source checkout (CMakeLists.txt and csrc/ "
                           f"beside the fastflamingo package); {ROOT} has none. Clone the repository and "
                           "pip install -e it, then run fastflamingo build-native")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("building the native extension needs cmake (>= 3.18) and a C++20 compiler "
                           "(g++ >= 10 or clang >= 12): apt install cmake g++, or pip install cmake")
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    configure = [cmake, "-S", str(ROOT), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={sys.executable}"]
    if shutil.which("ninja") and not (out / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja"]
    steps = [] if (out / "CMakeCache.txt").exists() else [configure]
    steps.append([cmake, "--build", str(out), "--parallel", str(jobs or os.cpu_count() or 1)])
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=not verbose, text=True)
        if done.returncode != 0:
            log = "" if verbose else (done.stdout + done.stderr)[-4000:]
            raise RuntimeError(f"building the native extension failed ({' '.join(cmd)}):\n{log}")
    path = out / LIBRARY
    if not path.exists():
        raise RuntimeError(f"the build finished but made no {path}")
    return path


def load(path: str | Path | None = None) -> Path:
    """Load the built library (``path``, default :func:`library_path`) into this process and
    register its operators' fake and autograd functions; returns its path. Loading twice is a
    no-op. Raises with the build command where there is no up-to-date build."""
    import torch
    if _state["loaded"]:
        return _state["path"]
    path = Path(path) if path is not None else library_path()
    if not path.exists():
        raise RuntimeError(f"the native extension is not built ({path} does not exist): run "
                           "`fastflamingo build-native` in the source checkout (needs cmake and g++)")
    if path == library_path() and not up_to_date(path):
        raise RuntimeError(f"{path} is older than its sources (csrc/, CMakeLists.txt): rebuild it with "
                           "`fastflamingo build-native`")
    torch.ops.load_library(str(path))
    from .ops import image_causal_op, perceiver_op
    image_causal_op.register_native()
    perceiver_op.register_native()
    _state.update(loaded=True, probed=True, path=path)
    return path


def available() -> bool:
    """Whether the native operators are loaded, loading an up-to-date build on the first call
    (unless ``FASTFLAMINGO_NATIVE=0``). Never builds. Cheap after the first call; under
    torch.compile it only reads the state (no file access in a traced function)."""
    if _state["loaded"] or _state["probed"]:
        return _state["loaded"]
    import torch
    if torch.compiler.is_compiling():
        return False
    _state["probed"] = True
    if os.environ.get("FASTFLAMINGO_NATIVE", "1") == "0":
        return False
    try:
        _state["expected"] = library_path()
        if up_to_date(_state["expected"]):
            load()
    except (OSError, RuntimeError):
        return False
    return _state["loaded"]


def expected_path() -> Path | str:
    """Where the library is looked for (for messages; read at the first probe, so that a message
    raised inside a torch.compile trace touches no file)."""
    if "expected" in _state:
        return _state["expected"]
    import torch
    return "build/native/<torch, CPU>" if torch.compiler.is_compiling() else library_path()


def add_parser(sub) -> None:
    p = sub.add_parser("build-native", help="build the optional native CPU extension (CMakeLists.txt) for "
                       "this machine", description=__doc__.split("\n\n")[0])
    p.add_argument("--verbose", action="store_true", help="show CMake's and the compiler's output")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: the CPU count)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    path = build(verbose=args.verbose, jobs=args.jobs)
    load(path)
    print(f"built {path}\nloaded: torch.ops.{OPS}.image_causal_attention and .perceiver_attention (and their "
          "_backward); fastflamingo's backend='auto' now runs them for CPU tensors")
    return 0
