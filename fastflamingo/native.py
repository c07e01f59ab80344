"""The optional native CPU extension: build it with CMake, find it, load it.

``CMakeLists.txt`` at the top of a source checkout builds ``csrc/`` into
``libfastflamingo_native.so``, PyTorch operators under ``torch.ops.fastflamingo_native``:
the image-causal cross-attention and the Perceiver attention, forward and backward (the CPU
counterparts of the Triton kernels). ``fastflamingo build-native`` (or :func:`build`) configures and builds it in
``build/native/<key>/``, where the key names the torch version and installation, and the CPU's
instruction sets (the library is compiled with ``-march=native`` for the machine that runs it).
``$FASTFLAMINGO_NATIVE_BUILD`` names another folder, which nothing keys: a library there records
the torch and the CPU it was built for (:data:`STAMP`), and one built for another torch (a C++
ABI difference would crash or give wrong results) or another CPU's instruction sets (a folder
shared between machines: an illegal instruction kills the process) is refused, not loaded.

Once built, it is found and loaded when ``fastflamingo`` is imported (``FASTFLAMINGO_NATIVE=0``
turns that off; then, not inside a first ``torch.compile`` trace, which may touch no file), and
:func:`fastflamingo.ops.image_causal_attention` and :func:`fastflamingo.ops.perceiver_attention`
with ``backend="auto"`` run it for CPU tensors; ``backend="native"`` asks for it (and says how to build it when it is missing).
Without it the package runs its PyTorch path, as before.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the source checkout (where CMakeLists.txt is)
LIBRARY = "libfastflamingo_native.so"
STAMP = "built_for.json"  # beside the library: the torch (version, folder) and CPU it was built for
OPS = "fastflamingo_native"
REBUILD = "rebuild it with `fastflamingo build-native` in the source checkout (needs cmake and g++)"

# "problem": (path, why a library there did not load), for messages (unavailable_reason)
_state = {"loaded": False, "probed": False, "path": None}


def _sources() -> list[Path]:
    return [ROOT / "CMakeLists.txt", *sorted((ROOT / "csrc").glob("*.cpp")), *sorted((ROOT / "csrc").glob("*.h"))]


@functools.cache  # /proc/cpuinfo, read once: the build folder's key and the stamp both use it
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def this_build() -> dict[str, str]:
    """What a library for this process must be built for, as :data:`STAMP` records it: the torch
    (its version and its folder) and the CPU (a hash of its architecture and instruction sets)."""
    import torch
    cpu = hashlib.sha256(f"{platform.machine()}\n{_cpu_flags()}".encode()).hexdigest()[:12]
    return {"torch": torch.__version__, "torch_dir": str(Path(torch.__file__).resolve().parent), "cpu": cpu}


def build_dir() -> Path:
    """Where this machine's build lives: ``$FASTFLAMINGO_NATIVE_BUILD`` or
    ``<checkout>/build/native/torch-<version>-<hash of torch's folder and the CPU's flags>``."""
    if os.environ.get("FASTFLAMINGO_NATIVE_BUILD"):
        return Path(os.environ["FASTFLAMINGO_NATIVE_BUILD"])
    this = this_build()
    key = hashlib.sha256(f"{this['torch_dir']}\n{platform.machine()}\n{_cpu_flags()}".encode()).hexdigest()[:12]
    return ROOT / "build" / "native" / f"torch-{this['torch'].replace('+', '_')}-{key}"


def library_path() -> Path:
    return build_dir() / LIBRARY


def up_to_date(path: Path | None = None) -> bool:
    """Whether a built library exists and is newer than every source it is built from."""
    path = library_path() if path is None else path
    if not path.exists():
        return False
    built = path.stat().st_mtime
    return all(src.stat().st_mtime <= built for src in _sources() if src.exists())


def _cmake_cache(out: Path) -> dict[str, str]:
    """The entries of ``out``'s CMakeCache.txt ({} without one)."""
    try:
        lines = (out / "CMakeCache.txt").read_text().splitlines()
    except OSError:
        return {}
    entries = (line.split("=", 1) for line in lines if "=" in line and not line.startswith(("#", "//")))
    return {key.split(":", 1)[0]: value for key, value in entries}


def _configured_for(out: Path) -> dict[str, str]:
    """What the CMake configuration in ``out`` was made with: its Python and the torch folder it
    links against (its cached ``libc10``); {} without one."""
    cache = _cmake_cache(out)
    found = {"python": str(Path(cache["Python_EXECUTABLE"]).resolve())} if cache.get("Python_EXECUTABLE") else {}
    if cache.get("C10_LIB"):
        found["torch_dir"] = str(Path(cache["C10_LIB"]).resolve().parent.parent)  # <torch>/lib/libc10.so
    return found


def built_for(path: Path) -> dict[str, str]:
    """The torch the library at ``path`` was built for: the :data:`STAMP` that :func:`build`
    writes beside it, else (built by hand with CMake) the torch folder of its folder's CMake
    configuration; {} where neither says."""
    try:
        stamp = json.loads(path.with_name(STAMP).read_text())
    except (OSError, ValueError):
        stamp = None
    if isinstance(stamp, dict):
        return stamp
    found = _configured_for(path.parent)
    return {"torch_dir": found["torch_dir"]} if "torch_dir" in found else {}


def _describe(torch: dict[str, str]) -> str:
    return f"torch {torch['torch']} ({torch['torch_dir']})" if "torch" in torch else f"the torch in {torch['torch_dir']}"


def _mismatch(path: Path) -> str | None:
    """Why the library at ``path`` is not for this process's torch or this machine's CPU, or None."""
    built, this = built_for(path), this_build()
    if any(built.get(k) not in (None, this[k]) for k in ("torch", "torch_dir")):
        return f"{path} was built for {_describe(built)}, but this process runs {_describe(this)}"
    if built.get("cpu") not in (None, this["cpu"]):
        return (f"{path} was built on another CPU (instruction sets {built['cpu']}, this machine's {this['cpu']}; "
                "it is compiled with -march=native and may use instructions this one lacks)")
    return None


def build(verbose: bool = False, jobs: int | None = None) -> Path:
    """Configure (once) and build the extension for this Python's torch; returns the library's
    path. CMake rebuilds only what changed, so a second call costs about a second. A folder
    configured by another Python or torch (a shared ``$FASTFLAMINGO_NATIVE_BUILD``), or holding a
    library built for another torch or CPU, is configured afresh and rebuilt from scratch."""
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
    this = this_build()
    configured = _configured_for(out)
    if configured and configured != {"python": str(Path(sys.executable).resolve()), "torch_dir": this["torch_dir"]}:
        # CMake keeps what it found (the torch libraries) in its cache: start from none
        (out / "CMakeCache.txt").unlink()
        shutil.rmtree(out / "CMakeFiles", ignore_errors=True)
    fresh = not (out / "CMakeCache.txt").exists()
    configure = [cmake, "-S", str(ROOT), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={sys.executable}"]
    if shutil.which("ninja") and fresh:
        configure += ["-G", "Ninja"]
    steps = [configure] if fresh else []
    steps.append([cmake, "--build", str(out), "--parallel", str(jobs or os.cpu_count() or 1)])
    if (out / LIBRARY).exists() and (fresh and configured or _mismatch(out / LIBRARY)):
        steps[-1].append("--clean-first")  # objects compiled against another torch's headers, or CPU
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=not verbose, text=True)
        if done.returncode != 0:
            log = "" if verbose else (done.stdout + done.stderr)[-4000:]
            raise RuntimeError(f"building the native extension failed ({' '.join(cmd)}):\n{log}")
    path = out / LIBRARY
    if not path.exists():
        raise RuntimeError(f"the build finished but made no {path}")
    # up to date now, also where CMake relinked nothing: an edit that changes no object (a comment
    # in CMakeLists.txt) would otherwise leave it older than its sources however often it is built
    os.utime(path)
    stamp = path.with_name(f"{STAMP}.{os.getpid()}.tmp")  # replaced whole: a reader sees one version
    stamp.write_text(json.dumps(this))
    stamp.replace(path.with_name(STAMP))
    return path


def load(path: str | Path | None = None) -> Path:
    """Load the built library (``path``, default :func:`library_path`) into this process and
    register its operators' fake and autograd functions; returns its path. Loading twice is a
    no-op. Raises with the build command where there is no build, where it is older than its
    sources or was built for another torch or CPU (:func:`built_for`), and where the loader refuses it
    (with the loader's reason)."""
    import torch
    if _state["loaded"]:
        return _state["path"]
    path = Path(path) if path is not None else library_path()
    if not path.exists():
        raise RuntimeError(f"the native extension is not built ({path} does not exist): run "
                           "`fastflamingo build-native` in the source checkout (needs cmake and g++)")
    stale = path == library_path() and not up_to_date(path)
    problem = f"{path} is older than its sources (csrc/, CMakeLists.txt)" if stale else _mismatch(path)
    if problem is None:
        try:
            torch.ops.load_library(str(path))
        except OSError as e:  # torch's message names only the file; the loader's says why
            problem = f"{path} exists but failed to load: {e.__cause__ or e}"
    if problem is not None:
        _state["problem"] = (path, problem)
        raise RuntimeError(f"{problem}: {REBUILD}")
    _state.pop("problem", None)
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
        if _state["expected"].exists():
            load()
    except (OSError, RuntimeError):
        return False
    return _state["loaded"]


def _problem() -> str | None:
    """Why the library where it is looked for did not load, where load() said so."""
    path, problem = _state.get("problem", (None, None))
    return problem if not _state["loaded"] and path is not None and path == _state.get("expected") else None


def unavailable_reason() -> str | None:
    """Why the native operators are not loaded (None when they are), for messages: turned off,
    not built (where it is looked for), or a library there that is older than its sources, was
    built for another torch or CPU, or failed to load (the loader's reason). Probes like
    :func:`available`, so it touches no file inside a torch.compile trace."""
    if available():
        return None
    if os.environ.get("FASTFLAMINGO_NATIVE", "1") == "0":
        return "FASTFLAMINGO_NATIVE=0 turns it off"
    return _problem() or f"it is not built for this machine ({expected_path()})"


def expected_path() -> Path | str:
    """Where the library is looked for, or, where one is there but did not load, why (for
    messages; read at the first probe, so that a message raised inside a torch.compile trace
    touches no file)."""
    if "expected" in _state:
        return _problem() or _state["expected"]
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
