"""The native extension's build folder (fastflamingo.native): a library records the torch and CPU
it was built for and is refused by another; a folder configured by another Python or torch is configured
afresh; a library that is there but does not load is reported with the loader's reason, not as
"not built". No compiler runs here: CMake's steps are recorded, not run (tests/conftest.py builds
the real extension, and tests/test_native.py runs it)."""
import ctypes
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import fastflamingo.ops as ops
from fastflamingo import native


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """An empty $FASTFLAMINGO_NATIVE_BUILD, and the native state as if nothing were loaded yet
    (restored afterwards: the real library stays loaded for the other tests)."""
    monkeypatch.setenv("FASTFLAMINGO_NATIVE_BUILD", str(tmp_path))
    monkeypatch.delenv("FASTFLAMINGO_NATIVE", raising=False)
    monkeypatch.setitem(native._state, "loaded", False)
    monkeypatch.setitem(native._state, "probed", False)
    monkeypatch.setitem(native._state, "problem", (None, None))
    monkeypatch.delitem(native._state, "expected", raising=False)
    return tmp_path


@pytest.fixture
def cmake_steps(monkeypatch):
    """CMake's commands as build() runs them, recorded; a build step writes the library where
    there is none (CMake relinks only what changed)."""
    steps = []

    def run(cmd, **kwargs):
        out = Path(cmd[cmd.index("-B" if "-S" in cmd else "--build") + 1])
        steps.append((cmd, (out / "CMakeCache.txt").exists()))
        if "--build" in cmd and not (out / native.LIBRARY).exists():
            (out / native.LIBRARY).write_bytes(b"built")
        return type("Done", (), {"returncode": 0, "stdout": "", "stderr": ""})()
    monkeypatch.setattr(native.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(native.subprocess, "run", run)
    return steps


def _cmake_cache(folder: Path, python: str, torch_dir: str) -> None:
    (folder / "CMakeFiles").mkdir()
    (folder / "CMakeCache.txt").write_text(f"# This is the CMakeCache file.\n//Path to a library.\n"
                                           f"C10_LIB:FILEPATH={torch_dir}/lib/libc10.so\n"
                                           f"Python_EXECUTABLE:UNINITIALIZED={python}\n")


THIS = native.this_build()


@pytest.mark.parametrize("python,torch_dir,stamp,reconfigured,clean", [
    (sys.executable, THIS["torch_dir"], THIS, False, False),  # the usual rebuild: only what changed
    ("/elsewhere/venv/bin/python", "/elsewhere/torch", None, True, True),  # a folder shared with another venv
    (sys.executable, THIS["torch_dir"], {**THIS, "torch": "2.0.0"}, False, True),  # torch upgraded in place
])
def test_build_reconfigures_a_folder_configured_for_another_python_or_torch(folder, cmake_steps, python,
                                                                            torch_dir, stamp, reconfigured, clean):
    _cmake_cache(folder, python, torch_dir)
    (folder / native.LIBRARY).write_bytes(b"old")
    if stamp is not None:
        (folder / native.STAMP).write_text(json.dumps(stamp))
    assert native.build() == folder / native.LIBRARY
    configures = [(cmd, had_cache) for cmd, had_cache in cmake_steps if "-S" in cmd]
    assert bool(configures) == reconfigured, cmake_steps
    if reconfigured:  # afresh: CMake's cache (which keeps the other torch's libraries) was removed first
        cmd, had_cache = configures[0]
        assert f"-DPython_EXECUTABLE={sys.executable}" in cmd and not had_cache
        assert not (folder / "CMakeFiles").exists()
    assert ("--clean-first" in cmake_steps[-1][0]) == clean, cmake_steps
    assert native.built_for(folder / native.LIBRARY) == THIS


def test_a_build_that_relinks_nothing_leaves_the_library_up_to_date(folder, cmake_steps):
    """An edit that changes no object (a comment in CMakeLists.txt) makes CMake relink nothing: the
    library must not stay "older than its sources" (load() refused it after every build)."""
    _cmake_cache(folder, sys.executable, THIS["torch_dir"])
    lib = folder / native.LIBRARY
    lib.write_bytes(b"built before the edit")
    os.utime(lib, (0, 0))
    assert not native.up_to_date()
    native.build()
    assert native.up_to_date() and lib.read_bytes() == b"built before the edit"


def test_a_library_built_for_another_torch_is_refused_naming_both(folder, cmake_steps, monkeypatch):
    path = native.build()  # stamps the library with this torch
    monkeypatch.setattr(torch, "__version__", "2.99.0+other")
    with pytest.raises(RuntimeError) as e:
        native.load(path)
    msg = str(e.value)
    assert f"built for torch {THIS['torch']} ({THIS['torch_dir']})" in msg
    assert f"this process runs torch 2.99.0+other ({THIS['torch_dir']})" in msg
    assert "fastflamingo build-native" in msg and not native._state["loaded"]
    assert not native.available() and "2.99.0+other" in native.unavailable_reason()


def test_a_library_built_on_another_cpu_is_refused_and_rebuilt_from_scratch(folder, cmake_steps):
    """A $FASTFLAMINGO_NATIVE_BUILD shared between machines (an NFS home): a library compiled with
    -march=native elsewhere may hold instructions this CPU lacks (the process dies of SIGILL)."""
    _cmake_cache(folder, sys.executable, THIS["torch_dir"])
    (folder / native.LIBRARY).write_bytes(b"built on another machine")
    (folder / native.STAMP).write_text(json.dumps({**THIS, "cpu": "0123456789ab"}))
    with pytest.raises(RuntimeError, match=rf"built on another CPU \(instruction sets 0123456789ab, this "
                                           rf"machine's {THIS['cpu']}.*fastflamingo build-native"):
        native.load()
    assert not native.available() and "another CPU" in native.unavailable_reason()
    native.build()
    assert "--clean-first" in cmake_steps[-1][0], cmake_steps  # its objects hold the other CPU's code too
    assert native.built_for(folder / native.LIBRARY) == THIS


def test_a_hand_built_library_for_another_torch_is_refused(folder):
    """Built with CMake by hand (no stamp): its CMake configuration says which torch it links."""
    _cmake_cache(folder, "/elsewhere/venv/bin/python", "/elsewhere/torch")
    (folder / native.LIBRARY).write_bytes(b"built elsewhere")
    with pytest.raises(RuntimeError, match=r"built for the torch in /elsewhere/torch, but this process runs "
                                           rf"torch {re.escape(THIS['torch'])}.*fastflamingo build-native"):
        native.load()


def test_a_library_that_fails_to_load_is_reported_with_the_loaders_reason(folder):
    lib = folder / native.LIBRARY
    lib.write_bytes(b"not a shared library")  # newer than the sources: up to date, but broken
    with pytest.raises(OSError) as loader:
        ctypes.CDLL(str(lib))
    assert native.up_to_date() and not native.available()
    reason = native.unavailable_reason()
    assert f"{lib} exists but failed to load" in reason and str(loader.value) in reason
    with pytest.raises(RuntimeError, match="failed to load.*fastflamingo build-native"):
        native.load()
    q = torch.randn(1, 1, 4, 16)
    text_time = torch.ones(1, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="failed to load") as e:
        ops.image_causal_attention(q, q, q, text_time=text_time, latents_per_media=4, backend="native")
    assert str(loader.value) in str(e.value)
    with pytest.raises(RuntimeError, match="failed to load"):
        ops.perceiver_attention(q, q, q, q, q, backend="native")


def test_reasons_for_a_missing_or_stale_build(folder, monkeypatch):
    assert not native.available()
    assert native.unavailable_reason() == f"it is not built for this machine ({folder / native.LIBRARY})"
    lib = folder / native.LIBRARY
    lib.write_bytes(b"")
    os.utime(lib, (0, 0))
    monkeypatch.setitem(native._state, "probed", False)
    assert not native.available()
    assert native.unavailable_reason() == f"{lib} is older than its sources (csrc/, CMakeLists.txt)"
    monkeypatch.setenv("FASTFLAMINGO_NATIVE", "0")
    assert native.unavailable_reason() == "FASTFLAMINGO_NATIVE=0 turns it off"
