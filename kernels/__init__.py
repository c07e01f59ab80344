"""fastflamingo's Triton kernels, installed as ``fastflamingo.kernels``.

PyPI has an unrelated package named ``kernels`` (Hugging Face's kernel hub, which transformers and
bitsandbytes import when present). Where this repository's root is on ``sys.path`` (``python -m
pytest`` or a script run from the root), ``import kernels`` finds this folder first. Imported
under that name, this file hands the import to the next ``kernels`` on the path; where there is
none, the module is left empty, as a folder without ``__init__.py`` would be (no file, no version,
no submodules: transformers then reports the hub package as absent). fastflamingo's kernels are
never importable as ``kernels``.
"""
if __name__ == "kernels":
    import importlib.util
    import os
    import sys
    from importlib.machinery import PathFinder

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = PathFinder.find_spec("kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
    else:
        __file__ = None
        __path__ = []
        del importlib, os, sys, PathFinder, _root, _spec
