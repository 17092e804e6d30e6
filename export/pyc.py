"""A bytecode cache beside a model's ``model.py``: would an interpreter run it, and is it that source?

The server's Python backend imports ``V/model.py`` and caches its bytecode in
``V/__pycache__/model.<tag>[.opt-N].pyc``; export never writes one. CPython
uses such a file instead of the source only when its tag and magic number
are the interpreter's and then:

- a timestamp pyc (flags bit 0 clear) when the source's mtime and size equal the ones
  in its header; otherwise it recompiles (a plain ``cp -r`` changes the
  mtime, so a copied repository's cache is inert);
- a checked hash pyc (flags 3) when the source's hash equals its header's;
- an unchecked hash pyc (flags 1) always, whatever the source says;
- anything else (another magic, invalid flags) never.

A cache an interpreter would use must hold exactly what that interpreter
compiles from the listed source: this gate compares code objects, which it
can do for its own Python only. A cache another CPython would use (a
``cpython-312`` pyc that matches the source, or any unchecked one) cannot be
compared here and fails, with the fix: delete the ``__pycache__`` folder
(the server writes its own). An inert one passes, whatever it holds.
"""

from __future__ import annotations

import importlib.util
import marshal
import re
import sys
from pathlib import Path

# Magic numbers of the final releases (Lib/importlib/_bootstrap_external.py of each).
MAGIC = {"cpython-310": 3439, "cpython-311": 3495, "cpython-312": 3531, "cpython-313": 3571}
# Since 3.11 a source hash is SipHash-1-3 keyed by the magic number (3.10: SipHash-2-4).
SIPHASH13 = ("cpython-311", "cpython-312", "cpython-313")
_NAME = re.compile(r"(?P<stem>[A-Za-z_][A-Za-z0-9_]*)\.(?P<tag>[a-z]+-\d+)(?:\.opt-(?P<opt>[12]))?\.pyc")
_OWN_TAG = sys.implementation.cache_tag


def magic_of(tag: str) -> bytes | None:
    if tag == _OWN_TAG:
        return importlib.util.MAGIC_NUMBER
    number = MAGIC.get(tag)
    return None if number is None else number.to_bytes(2, "little") + b"\r\n"


def source_of(rel: str) -> str | None:
    """``V/model.py`` for ``V/__pycache__/model.<tag>[.opt-N].pyc``; None for any other path."""
    parts = Path(rel).parts
    if len(parts) != 3 or parts[1] != "__pycache__":
        return None
    m = _NAME.fullmatch(parts[2])
    return f"{parts[0]}/{m['stem']}.py" if m else None


def pyc_problem(folder: Path, rel: str, listed: dict[str, str]) -> str | None:
    """Why the cache ``rel`` of a model folder must not be there, or None when it is inert or holds
    exactly the listed source's code."""
    source_rel = source_of(rel)
    if source_rel is None or source_rel not in listed:
        return f"{rel}: not written by export (not in the manifest)"
    m = _NAME.fullmatch(Path(rel).name)
    tag, optimize = m["tag"], int(m["opt"] or 0)
    try:
        data = (folder / rel).read_bytes()
        source = folder / source_rel
        st = source.stat()
        source_bytes = source.read_bytes()
    except OSError as exc:
        return f"{rel}: cannot read ({exc.strerror})"
    magic = magic_of(tag)
    if magic is None:
        return (f"{rel}: bytecode for {tag}, an interpreter this gate does not know: it cannot tell whether "
                f"it would run instead of {source_rel}; delete {Path(rel).parent}")
    if len(data) < 16 or data[:4] != magic:
        return None  # another magic number: that interpreter ignores the file and compiles the source
    flags = int.from_bytes(data[4:8], "little")
    if flags in (0, 0b10):  # bit 0 clear: a timestamp pyc (bit 1 matters for hash pycs only)
        used = (int.from_bytes(data[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
                and int.from_bytes(data[12:16], "little") == st.st_size & 0xFFFFFFFF)
        how = "its header matches the source's mtime and size"
    elif flags == 0b11:
        used = _hash_matches(tag, magic, data[8:16], source_bytes)
        how = "its hash matches the source"
        if used is None:
            return (f"{rel}: a checked-hash pyc for {tag}, whose source hash this gate cannot compute; "
                    f"delete {Path(rel).parent}")
    elif flags == 0b01:
        used, how = True, "an unchecked-hash pyc runs whatever the source says"
    else:
        return None  # invalid flags: the import ignores the file and compiles the source
    if not used:
        return None
    if tag != _OWN_TAG:
        return (f"{rel}: Python {tag} would run this cache instead of {source_rel} ({how}), and this gate "
                f"(Python {_OWN_TAG}) cannot compare it with the source; delete {Path(rel).parent}")
    try:
        code = marshal.loads(data[16:])
        same = code == compile(source_bytes, str(source), "exec", dont_inherit=True, optimize=optimize)
    except (ValueError, EOFError, TypeError, SyntaxError):
        same = False
    if same:
        return None
    return f"{rel}: a cached module would run instead of {source_rel} ({how}) and it is other code"


def _hash_matches(tag: str, magic: bytes, stored: bytes, source: bytes) -> bool | None:
    import _imp

    if tag != _OWN_TAG and not (tag in SIPHASH13 and _OWN_TAG in SIPHASH13):
        return None
    return _imp.source_hash(int.from_bytes(magic, "little"), source) == stored
