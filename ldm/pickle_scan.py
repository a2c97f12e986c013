"""Reading a PyTorch checkpoint's pickle without running it, before torch.load does.

torch.load(weights_only=True) refuses globals outside its allow-list, but its message depends on how the
pickle names the global (for some it advises loading with ``weights_only=False``), and it prints the object
it refuses to call, so a 200-byte pickle describing a list of 2**40 items makes it hang. :func:`scan_pickle`
follows the pickle's stack with pickletools, building nothing: a global torch would refuse gets our
refusal naming it, a call of anything but a named global is refused, and the scan's work is bounded.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
import zlib
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING  # Python 2 names, mapped as torch's loader maps them
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, BinaryIO

SHOWN_CHARS = 200  # the most characters of a file's content (names, torch's messages) any message quotes
MAX_PICKLE_OPS = 10_000_000  # ~30 per tensor (~40k for SD2's ~1300 tensors): 300k tensors with optimizer state
MAX_PICKLE_VALUE = 64 << 20  # bytes of one pickled value: tensor data is never inside the pickle
MAX_PICKLE_BYTES = 256 << 20  # a checkpoint's data.pkl holds ~100 bytes per tensor
LEGACY_PICKLES = 5  # torch's pre-zip format: magic number, protocol, system info, the object, storage keys
REFUSAL = ("refusing to load: the file contains pickled Python objects that need code to unpickle ({what}), "
           "which could run arbitrary code. Re-save only its tensors (a state dict) or convert it to "
           ".safetensors with a trusted tool.")


class PickleRefused(ValueError):
    """A pickle the scan refuses; the message follows the file name."""


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` (a name read from a file) cut to ``limit`` characters."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Refused(Exception):
    """A pickle :func:`_scan_pickle` refuses; the message follows the file name."""


class _Malformed(Exception):
    """A pickle the scan cannot follow; torch.load will say what is wrong with it."""


class _Global:
    """A stack entry made by GLOBAL / STACK_GLOBAL: a named class or function."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_TEXT_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}
_CALLS = {"REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3}  # how deep in the stack the called object sits
_NOT_A_CALL = ("not a PyTorch checkpoint (its pickle calls an object that is not a named class or function "
               "({name}); torch.save never writes that)")


def scan_pickle(path: Path, is_zip: bool) -> None:
    """PickleRefused if the pickle(s) of ``path`` name a global that torch's weights-only loader does not
    allow, call anything that is not a named global, exceed the scan's limits or cannot be read. Nothing is
    executed. A pickle the scan cannot follow passes: torch.load then says what is wrong with it."""
    budget, allowed = [MAX_PICKLE_OPS], _allowed_globals()
    try:
        with closing(_pickle_streams(path, is_zip)) as streams:
            for stream in streams:
                _scan_one(stream, allowed, budget)
    except _Malformed:
        return  # torch.load stops at the same instruction and says what is wrong
    except _Refused as refused:
        raise PickleRefused(str(refused)) from None
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, OSError, EOFError) as err:
        raise PickleRefused(f"not a PyTorch checkpoint (cannot read it: {type(err).__name__}: "
                            f"{clip(str(err))})") from None


def _pickle_streams(path: Path, is_zip: bool) -> Iterator[BinaryIO]:
    """The pickles torch.load reads from ``path``, one stream each: ``data.pkl`` of a zip checkpoint, or
    up to ``LEGACY_PICKLES`` consecutive pickles of a legacy one."""
    if not is_zip:
        with open(path, "rb") as file:
            size = path.stat().st_size
            for _ in range(LEGACY_PICKLES):
                if file.tell() >= size:
                    return
                yield _BoundedReader(file, size - file.tell())
        return
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.filename.rsplit("/", 1)[-1] == "data.pkl":
                with archive.open(info) as member:
                    data = member.read(MAX_PICKLE_BYTES + 1)  # read at once: pickletools reads byte by byte
                if len(data) > MAX_PICKLE_BYTES:
                    raise _Refused(f"not a PyTorch checkpoint (its pickle {info.filename} is larger than "
                                   f"{MAX_PICKLE_BYTES >> 20} MiB)")
                yield io.BytesIO(data)


class _BoundedReader:
    """A binary stream of ``size`` bytes for pickletools: reads never ask for more than the stream holds,
    and one pickled value may be at most ``MAX_PICKLE_VALUE`` bytes."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self.file, self.left = file, size

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (short at the end of the stream); _Refused for a value over the limit."""
        if n > MAX_PICKLE_VALUE:
            raise _Refused(f"not a PyTorch checkpoint (its pickle holds a value of {n} bytes)")
        data = self.file.read(min(n, self.left) if n >= 0 else min(self.left, MAX_PICKLE_VALUE))
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        """One line of a text instruction (GLOBAL's module and name, protocol 0 values)."""
        data = self.file.readline(min(self.left, MAX_PICKLE_VALUE))
        self.left -= len(data)
        return data


def _scan_one(stream: BinaryIO, allowed: set[str] | None, budget: list[int]) -> None:
    """Follow one pickle's stack without building anything: each entry is a :class:`_Global`, a short
    text (a later STACK_GLOBAL's module or name) or None for anything else; ``marks`` holds the stack
    heights at the MARKs still open, as pickle's own unpickler keeps them."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            budget[0] -= 1
            if budget[0] < 0:
                raise _Refused(f"not a PyTorch checkpoint (its pickle has more than {MAX_PICKLE_OPS} "
                               f"instructions)")
            _step(opcode, arg, stack, marks, memo, allowed)
    except (ValueError, IndexError):  # an unknown instruction, a truncated argument, an empty stack, no mark
        raise _Malformed from None


def _step(opcode: pickletools.OpcodeInfo, arg: Any, stack: list, marks: list[int], memo: dict,
          allowed: set[str] | None) -> None:
    """Apply one instruction to the stack (pickletools' stack_before / stack_after); _Refused for a global
    torch does not allow and for a call of anything but a global."""
    name = opcode.name
    if name in _MEMO_PUTS:
        memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
    elif name in _MEMO_GETS:
        stack.append(memo.get(arg))
    elif name == "MARK":
        marks.append(len(stack))
    elif name == "POP" and marks and marks[-1] == len(stack):
        marks.pop()
    elif name.startswith("EXT"):
        raise _Refused(REFUSAL.format(what=f"a global from copyreg's extension registry, code {arg}"))
    else:
        if name in _CALLS and not isinstance(stack[-_CALLS[name]], _Global):
            raise _Refused(_NOT_A_CALL.format(name=name))
        popped = _pop(opcode.stack_before, stack, marks)
        if name == "OBJ" and not (popped and isinstance(popped[0], _Global)):
            raise _Refused(_NOT_A_CALL.format(name=name))
        if name == "STACK_GLOBAL":  # module and name come from the stack, normally two texts just pushed
            arg = " ".join(popped) if all(isinstance(part, str) for part in popped) else None
        if name in ("GLOBAL", "STACK_GLOBAL", "INST"):
            stack.append(_checked_global(arg, allowed))
        elif name in _TEXT_OPS:
            stack.append(clip(arg if isinstance(arg, str) else arg.decode("latin1")))
        else:
            stack.extend([None] * len(opcode.stack_after))


def _pop(before: list, stack: list, marks: list[int]) -> list:
    """Take an instruction's operands off ``stack``: everything above the last mark (returned) and the
    entries below it, or the ``before`` entries (returned). _Malformed if the stack holds too few."""
    if pickletools.markobject in before:
        start = marks.pop()  # IndexError: no mark
        below = before.index(pickletools.markobject)  # e.g. the list APPENDS extends
    else:
        start, below = len(stack) - len(before), 0
    if start - below < (marks[-1] if marks else 0):
        raise _Malformed  # pickle would take entries from below the open mark
    taken = stack[start:]
    del stack[start - below:]
    return taken


def _checked_global(arg: str | None, allowed: set[str] | None) -> _Global:
    """The global ``"module name"`` if torch's weights-only loader allows it, else _Refused naming it."""
    if arg is None:
        raise _Refused(REFUSAL.format(what="a global whose name the pickle computes"))
    module, _, attr = arg.partition(" ")
    module, attr = NAME_MAPPING.get((module, attr), (IMPORT_MAPPING.get(module, module), attr))
    name = clip(f"{module}.{attr}")
    if allowed is not None and name not in allowed:
        raise _Refused(REFUSAL.format(what=f"the global {name}"))
    return _Global(name)


def _allowed_globals() -> set[str] | None:
    """Names of the globals torch.load(weights_only=True) accepts: its own list and those a program added
    with torch.serialization.add_safe_globals; read at each load, as a program may add some at any time.
    None if this torch keeps the list elsewhere: then torch alone refuses globals (and its message is
    parsed by :func:`_load_failure`)."""
    from torch import _weights_only_unpickler as unpickler  # private, but the only statement of the list

    try:
        return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except AttributeError:
        return None
