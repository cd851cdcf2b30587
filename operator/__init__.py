"""mmalign.operator: the kopf operator (thin handlers over pure builders and status functions)."""

if __name__ == "operator":
    # This folder is meant to be imported only as `mmalign.operator` (pyproject package-dir mapping).
    # When Python runs with the repository root on sys.path (`python -c`/`python -m` from here), a bare
    # `import operator` would find this folder before the standard library. Run the standard library's
    # module in our place so nothing is shadowed. Only frozen/builtin modules are used here, because
    # anything heavier imports `operator` itself.
    import os as _os
    import sys as _sys
    from importlib.machinery import SourceFileLoader as _Loader

    _Loader("operator", _os.path.join(_os.path.dirname(_os.__file__), "operator.py")).exec_module(
        _sys.modules["operator"]
    )
