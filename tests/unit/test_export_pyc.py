"""The pyc rule: a bytecode cache beside model.py passes when no interpreter would run it, or when it
holds exactly what the listed source compiles to; for another Python it cannot be compared and fails."""

from __future__ import annotations

import importlib.util
import os
import py_compile
import sys

import pytest

from export.manifest import verify_manifest, write_manifest
from export.pyc import MAGIC, pyc_problem

WEIGHTS = "ab" * 32
TAG = sys.implementation.cache_tag
OTHER = "cpython-312" if TAG != "cpython-312" else "cpython-313"


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.py").write_text("X = 1\n")
    (folder / "config.pbtxt").write_text("name: 'm'\n")
    write_manifest(folder, 1, WEIGHTS)
    return folder


def _cache(folder, tag=TAG, suffix=""):
    path = folder / "1" / "__pycache__" / f"model.{tag}{suffix}.pyc"
    path.parent.mkdir(exist_ok=True)
    return path


def _compile(folder, code: str, mode=py_compile.PycInvalidationMode.TIMESTAMP, **kw):
    """``code`` compiled into model.py's cache, its header made from model.py (mtime, size, hash)."""
    source = folder / "1" / "model.py"
    cache = _cache(folder, **kw)
    other = folder.parent / "other.py"
    other.write_text(code)
    st = source.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    py_compile.compile(str(other), cfile=str(cache), doraise=True, invalidation_mode=mode)
    data = bytearray(cache.read_bytes())
    if mode == py_compile.PycInvalidationMode.TIMESTAMP:
        data[12:16] = (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    else:
        data[8:16] = importlib.util.source_hash(source.read_bytes())
    cache.write_bytes(bytes(data))
    return cache


def _problems(folder):
    from export.manifest import read_manifest

    return verify_manifest(folder, read_manifest(folder, 1))


def test_the_cache_an_import_writes_passes_and_a_copy_with_a_new_mtime_is_inert(folder):
    py_compile.compile(str(folder / "1" / "model.py"), cfile=str(_cache(folder)), doraise=True)
    assert _problems(folder) == []
    st = (folder / "1" / "model.py").stat()
    os.utime(folder / "1" / "model.py", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 10))  # what cp -r does
    assert _problems(folder) == []


def test_a_timestamp_cache_of_other_code_fails_only_when_its_header_matches_the_source(folder):
    cache = _compile(folder, "X = 2\n")
    assert _problems(folder) == [f"1/__pycache__/{cache.name}: a cached module would run instead of 1/model.py "
                                 "(its header matches the source's mtime and size) and it is other code"]
    st = (folder / "1" / "model.py").stat()
    os.utime(folder / "1" / "model.py", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 10))
    assert _problems(folder) == []  # inert: Python recompiles model.py and never runs it


def _new_source(folder, text: str) -> None:
    """model.py changes and the manifest lists it anew; the caches stay as they were (unlisted)."""
    caches = {p: p.read_bytes() for p in (folder / "1" / "__pycache__").glob("*.pyc")}
    for p in caches:
        p.unlink()
    (folder / "1" / "model.py").write_text(text)
    write_manifest(folder, 1, WEIGHTS)
    for p, data in caches.items():
        p.write_bytes(data)


def test_hash_caches_checked_by_their_hash_and_unchecked_ones_by_their_code(folder):
    checked, unchecked = py_compile.PycInvalidationMode.CHECKED_HASH, py_compile.PycInvalidationMode.UNCHECKED_HASH
    _compile(folder, "X = 1\n", checked)  # model.py's own code
    assert _problems(folder) == []
    cache = _compile(folder, "X = 2\n", checked)  # other code under model.py's hash: it would run
    assert _problems(folder)[0].startswith(f"1/__pycache__/{cache.name}: a cached module would run instead of "
                                           "1/model.py (its hash matches the source)")
    _new_source(folder, "X = 3\n")  # the hash no longer matches: Python recompiles, the cache is inert
    assert _problems(folder) == []
    _compile(folder, "X = 3\n", unchecked)
    assert _problems(folder) == []
    cache = _compile(folder, "X = 4\n", unchecked)
    assert _problems(folder)[0].startswith(f"1/__pycache__/{cache.name}: a cached module would run instead of "
                                           "1/model.py (an unchecked-hash pyc runs whatever the source says)")


def test_an_optimised_cache_is_compared_with_the_optimised_source(folder):
    (folder / "1" / "model.py").write_text("assert False\nX = 1\n")
    write_manifest(folder, 1, WEIGHTS)
    py_compile.compile(str(folder / "1" / "model.py"), cfile=str(_cache(folder, suffix=".opt-1")), doraise=True,
                       optimize=1)
    assert _problems(folder) == []


def _foreign(folder, tag, flags=0, *, matches=True, magic=None):
    source = folder / "1" / "model.py"
    st = source.stat()
    number = MAGIC.get(tag, 9999)
    head = magic or number.to_bytes(2, "little") + b"\r\n"
    head += flags.to_bytes(4, "little")
    if flags & 1:
        import _imp

        key = int.from_bytes(head[:4], "little")
        digest = _imp.source_hash(key, source.read_bytes() if matches else b"other")
        head += digest
    else:
        head += (int(st.st_mtime) + (0 if matches else 7)).to_bytes(4, "little") + st.st_size.to_bytes(4, "little")
    cache = _cache(folder, tag)
    cache.write_bytes(head + b"bytecode of another Python")
    return cache


def test_caches_of_another_python_pass_when_inert_and_fail_when_it_would_run_them(folder):
    cache = _foreign(folder, OTHER, matches=False)
    assert _problems(folder) == []  # Python 3.12 would recompile: inert
    _foreign(folder, OTHER, magic=importlib.util.MAGIC_NUMBER if TAG != OTHER else b"\x00\x00\r\n")
    assert _problems(folder) == []  # not that Python's magic number: it ignores the file
    _foreign(folder, OTHER, flags=3, matches=False)
    assert _problems(folder) == []
    for flags in (0, 3, 1):
        _foreign(folder, OTHER, flags=flags)
        ((problem),) = _problems(folder)
        assert problem.startswith(f"1/__pycache__/{cache.name}: Python {OTHER} would run this cache instead of "
                                  "1/model.py") and problem.endswith("delete 1/__pycache__"), problem


def test_a_cache_of_an_unknown_interpreter_or_of_an_unlisted_source_fails(folder):
    unknown = _foreign(folder, "cpython-399")
    assert pyc_problem(folder, f"1/__pycache__/{unknown.name}", {"1/model.py": ""}).startswith(
        f"1/__pycache__/{unknown.name}: bytecode for cpython-399, an interpreter this gate does not know")
    unknown.unlink()
    planted = _cache(folder).with_name(f"onnxruntime.{TAG}.pyc")
    py_compile.compile(str(folder / "1" / "model.py"), cfile=str(planted), doraise=True)
    assert _problems(folder) == [f"1/__pycache__/{planted.name}: not written by export (not in the manifest)"]
