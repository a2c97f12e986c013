"""Unpickling numpy data from files other people made, without handing the pickle numpy's own functions.

Two kinds of input files are pickles: the object arrays inside LoFTR's MegaDepth ``.npz`` index files
(``image_paths``, ``pair_infos``) and the original LeftRefill ``image_dict.pkl`` / ``train_pairs.pkl``.
Unpickling a global is how a pickle runs code, and even numpy's array rebuilders are unsafe on crafted
input (a dtype whose state claims it holds no objects makes numpy read raw bytes as object pointers;
``_reconstruct`` with a huge shape allocates gigabytes from a tiny file). So :func:`safe_load` lets a pickle
name only these globals, each of which is a stand-in written here, never numpy's function:

* ``numpy.dtype``: only the codes ``O8`` (object), ``b1``, ``i1``-``i8``, ``u1``-``u8``, ``f2``-``f8``
  and ``U<n>`` (unicode); of the dtype's state only the byte order (``<``, ``>``, ``|``, ``=``) is used.
* ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` (numpy 1 and 2
  spellings), with ``numpy.ndarray`` allowed only as its first argument: an array whose state is checked
  (shape; an object array's item list, or exactly shape x itemsize bytes of data) before it is built.
* ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar``: numeric (``b``, ``i``, ``u``,
  ``f``) or unicode scalars from exactly itemsize bytes; they become Python numbers / strings.
* ``_codecs.encode(text, "latin1")`` and ``bytes()`` (``builtins`` or ``__builtin__``): how protocols 0-2
  spell bytes and empty bytes (e.g. the data of an empty array); no other codec, no other argument.

Plain containers, numbers and strings have their own opcodes and need no global. The bytes the stand-ins
create are limited to a small multiple of the bytes read, so a pickle cannot multiply shared data.
After loading, the result is walked (at most ``MAX_DEPTH`` levels; cycles are refused) and every array
stand-in is replaced by a real ``np.ndarray``. The memo lets a pickle refer to one list many times, so a
300-byte file can describe a list nested 40 levels deep with 2**40 leaves; the walk counts the items the
data would hold written out (shared parts once per reference) and refuses more than ``ITEMS_PER_BYTE_READ``
per byte read, so whatever a caller does with the result afterwards (printing it included) stays
proportional to the file. Every failure raises :class:`SafePickleError` with a message of bounded length
(:func:`short_repr`); callers add the file name.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

from ldm.pickle_scan import SHOWN_CHARS, clip  # the same bound as checkpoint messages

MAX_DEPTH = 100  # LoFTR's pair_infos nest 4 levels, the LeftRefill pickles 3
MAX_DIMS = 32
MAX_UNICODE_CHARS = 1 << 20
BYTES_PER_BYTE_READ = 4  # protocol 2 holds array data as text: the decoded bytes plus the array copy
BYTES_SLACK = 1 << 20
ITEMS_PER_BYTE_READ = 2  # every item of unshared data costs at least one opcode byte; shared data is the excess
ITEMS_SLACK = 1 << 16
BYTE_ORDERS = ("<", ">", "|", "=")
NUMERIC_CODES = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_LEAVES = (str, bytes, int, float, type(None))  # bool is an int


class SafePickleError(ValueError):
    """A pickle that :func:`safe_load` refuses or cannot read; the caller names the file."""


def safe_load(file: BinaryIO, *, allow_arrays: bool = True) -> Any:
    """Unpickle ``file`` (a binary stream positioned at the pickle) with the stand-ins of the module
    docstring. Returns plain Python containers, numbers and strings, and (``allow_arrays``) numpy arrays,
    also inside containers and object arrays. Raises SafePickleError for anything else, for a corrupt
    stream, for cyclic or too deeply nested data and when the data would outgrow the file."""
    reader = _CountingReader(file)
    try:
        loaded = _SafeUnpickler(reader).load()
        return _Materialiser(allow_arrays, reader.count).walk(loaded, 0)
    except SafePickleError:
        raise
    except RecursionError:
        raise SafePickleError(f"nested deeper than Python allows (at most {MAX_DEPTH} levels are read)") from None
    except Exception as err:  # noqa: BLE001  (a corrupt pickle fails in many ways; all mean "bad file")
        raise SafePickleError(f"not a readable pickle ({type(err).__name__}: {clip(str(err))})") from None


# ----------------------------------------------------------------------------------------- the unpickler


class _CountingReader:
    """``file`` with a count of the bytes read, which bounds the bytes the stand-ins may create."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.count = 0  # bytes read so far
        self.created = 0  # bytes the stand-ins have created so far

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.count += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data = self.file.readline(size)
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        size = self.file.readinto(buffer)
        self.count += size or 0
        return size

    def charge(self, size: int, what: str) -> None:
        """Account for ``size`` new bytes; SafePickleError once they exceed the multiple of the input."""
        self.created += size
        allowed = BYTES_PER_BYTE_READ * self.count + BYTES_SLACK
        if self.created > allowed:
            raise SafePickleError(f"{what}: the pickle would create {self.created} bytes of data from "
                                  f"{self.count} bytes read; refusing to amplify shared data")


class _SafeUnpickler(pickle.Unpickler):
    """Resolves the few allowed globals to this unpickler's own stand-ins, refuses every other one."""

    def __init__(self, reader: _CountingReader) -> None:
        super().__init__(reader)
        dtype, reconstruct, scalar = _DtypeStandIn(), _ReconstructStandIn(reader), _ScalarStandIn()
        self.allowed: dict[tuple[str, str], Any] = {
            ("numpy", "dtype"): dtype, ("numpy", "ndarray"): NDARRAY,
            ("_codecs", "encode"): _Latin1EncodeStandIn(reader),
            ("builtins", "bytes"): EMPTY_BYTES, ("__builtin__", "bytes"): EMPTY_BYTES}
        for module in _NUMPY_MODULES:
            self.allowed[(module, "_reconstruct")] = reconstruct
            self.allowed[(module, "scalar")] = scalar

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise SafePickleError(f"refused to load the global {clip(f'{module}.{name}')}: these pickles "
                                  f"may only name numpy's dtype, array and scalar rebuilders (and the spelling "
                                  f"of bytes)") from None


# ------------------------------------------------------------------------------------------- stand-ins


class _StandIn:
    """Base of the objects a pickle can reach by name: no ``__dict__``, and pickle's BUILD opcode cannot
    give them state (it would otherwise set attributes on objects shared by every load)."""

    __slots__ = ()
    WHAT = "a numpy function"

    def __setstate__(self, state: Any) -> None:
        raise SafePickleError(f"refused to set state on {self.WHAT}")


class _NdarrayMarker(_StandIn):
    __slots__ = ()
    WHAT = "the numpy.ndarray class (allowed only as the first argument of _reconstruct)"


NDARRAY = _NdarrayMarker()


class _DtypeStandIn(_StandIn):
    """``numpy.dtype(code, align, copy)`` for the simple codes only."""

    __slots__ = ()

    def __call__(self, code: Any, align: Any = False, copy: Any = True) -> DtypeProxy:
        return DtypeProxy(simple_dtype(code))


def simple_dtype(code: Any) -> np.dtype:
    """The native-order dtype of ``code``: 'O8', 'b1', 'i1'-'i8', 'u1'-'u8', 'f2'-'f8' or 'U<n>' (n >= 1
    characters); SafePickleError for any other code."""
    if code == "O8":
        return np.dtype(object)
    if code in NUMERIC_CODES:
        return np.dtype(code)
    digits = code[1:] if isinstance(code, str) else ""
    if (isinstance(code, str) and code[:1] == "U" and 0 < len(digits) <= 8 and digits.isascii()
            and digits.isdigit() and 0 < int(digits) <= MAX_UNICODE_CHARS):
        return np.dtype(code)
    raise SafePickleError(f"refused dtype {short_repr(code, 40)}: only O8, b1, i1-i8, u1-u8, f2-f8 and U<n> are "
                          f"allowed")


class DtypeProxy:
    """A dtype being unpickled: the checked base dtype and the byte order from its state."""

    __slots__ = ("base", "order", "has_state")
    WHAT = "a numpy dtype"

    def __init__(self, base: np.dtype) -> None:
        self.base, self.order, self.has_state = base, "=", False

    def __setstate__(self, state: Any) -> None:
        """numpy's dtype state (version, byte order, subarray, names, fields, elsize, alignment, flags[,
        metadata]): the byte order is kept; a subarray, names or fields (structured dtypes) are refused;
        elsize, alignment and flags are ignored, as the code alone defines the dtype here."""
        if self.has_state:
            raise SafePickleError("a dtype's state is set twice")
        if not isinstance(state, tuple) or len(state) < 5 or state[0] not in (3, 4):
            raise SafePickleError(f"unexpected dtype state {short_repr(state, 80)}")
        if state[1] not in BYTE_ORDERS:
            raise SafePickleError(f"unexpected dtype byte order {short_repr(state[1], 20)}")
        if any(part is not None for part in state[2:5]):
            raise SafePickleError("refused a structured or subarray dtype")
        self.order, self.has_state = state[1], True

    @property
    def dtype(self) -> np.dtype:
        """The real dtype; the byte order matters only for numbers and strings wider than one byte."""
        if self.base.hasobject or self.order in "|=":
            return self.base
        return self.base.newbyteorder(self.order)


class _ScalarStandIn(_StandIn):
    """``scalar(dtype, data)``: a number (or string) from exactly itemsize bytes -> the Python value."""

    __slots__ = ()

    def __call__(self, dtype: Any, data: Any = None) -> int | float | str:
        if not isinstance(dtype, DtypeProxy) or dtype.base.kind not in "biufU":
            raise SafePickleError("refused a numpy scalar that is not a number or a string")
        real = dtype.dtype
        if not isinstance(data, bytes) or len(data) != real.itemsize:
            raise SafePickleError(f"a {real} scalar needs exactly {real.itemsize} bytes of data")
        return np.frombuffer(data, dtype=real)[0].item()


class _Latin1EncodeStandIn(_StandIn):
    """``_codecs.encode(text, "latin1")``, as pickle protocols 0-2 spell bytes; no other codec."""

    __slots__ = ("reader",)

    def __init__(self, reader: _CountingReader) -> None:
        self.reader = reader

    def __call__(self, text: Any, encoding: Any = "utf-8") -> bytes:
        if not isinstance(text, str) or encoding != "latin1":
            raise SafePickleError(f"_codecs.encode({type(text).__name__}, {short_repr(encoding, 20)}) is not allowed")
        self.reader.charge(len(text), "_codecs.encode")
        return text.encode("latin1")


class _EmptyBytesStandIn(_StandIn):
    """``bytes()`` with no argument, as protocols 0-2 spell ``b""``."""

    __slots__ = ()

    def __call__(self, *args: Any) -> bytes:
        if args:
            raise SafePickleError("bytes() may only be called without arguments")
        return b""


EMPTY_BYTES = _EmptyBytesStandIn()


class _ReconstructStandIn(_StandIn):
    """``_reconstruct(ndarray, (0,), b'b')`` -> an empty :class:`ArrayProxy` awaiting its state."""

    __slots__ = ("reader",)

    def __init__(self, reader: _CountingReader) -> None:
        self.reader = reader

    def __call__(self, cls: Any, shape: Any = None, typecode: Any = None) -> ArrayProxy:
        if cls is not NDARRAY:
            raise SafePickleError("_reconstruct may only rebuild numpy.ndarray")
        return ArrayProxy(self.reader)


class ArrayProxy:
    """An array being unpickled. ``__setstate__`` checks numpy's state; numeric arrays are built at once,
    object arrays after their items have been walked (they may be arrays themselves)."""

    __slots__ = ("reader", "shape", "dtype", "fortran", "items", "array")
    WHAT = "a numpy array"

    def __init__(self, reader: _CountingReader) -> None:
        self.reader = reader
        self.shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self.fortran = False
        self.items: list | None = None  # object arrays: the items in C order, as numpy pickles them
        self.array: np.ndarray | None = None  # numeric and unicode arrays

    def __setstate__(self, state: Any) -> None:
        """``(version, shape, dtype, is_fortran, data)``: shape a tuple of non-negative ints; ``data`` a
        list of prod(shape) items for object arrays, else bytes of exactly prod(shape) * itemsize."""
        if self.shape is not None:
            raise SafePickleError("an array's state is set twice")
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise SafePickleError(f"unexpected array state (expected (1, shape, dtype, is_fortran, data)): "
                                  f"{type(state).__name__} of length {len(state) if isinstance(state, tuple) else '-'}")
        _, shape, dtype, fortran, data = state
        shape = _checked_shape(shape)
        if not isinstance(dtype, DtypeProxy):
            raise SafePickleError(f"an array's dtype is a {type(dtype).__name__}, not a numpy dtype")
        if fortran not in (True, False):
            raise SafePickleError(f"an array's is_fortran flag is {short_repr(fortran, 20)}, not a bool")
        self.shape, self.dtype, self.fortran = shape, dtype.dtype, bool(fortran)
        count = math.prod(shape)
        if self.dtype.hasobject:
            if not isinstance(data, list) or len(data) != count:
                raise SafePickleError(f"an object array of shape {shape} needs a list of {count} items, "
                                      f"got {_describe_data(data)}")
            self.items = data
            return
        size = count * self.dtype.itemsize
        if not isinstance(data, bytes) or len(data) != size:
            raise SafePickleError(f"a {self.dtype} array of shape {shape} needs {size} bytes of data, "
                                  f"got {_describe_data(data)}")
        self.reader.charge(size, "array data")
        order = "F" if self.fortran else "C"
        self.array = np.frombuffer(data, dtype=self.dtype, count=count).copy().reshape(shape, order=order)

    def build(self, walk: Callable[[Any], Any]) -> np.ndarray:
        """The real array; ``walk`` converts each item of an object array."""
        if self.shape is None:
            raise SafePickleError("an array was never given its state")
        if self.array is not None:
            return self.array
        out = np.empty(len(self.items), dtype=object)
        for index, item in enumerate(self.items):
            out[index] = walk(item)  # one element at a time: a tuple item must stay one object
        out = out.reshape(self.shape)
        return np.asfortranarray(out) if self.fortran else out


def _checked_shape(shape: Any) -> tuple[int, ...]:
    if (not isinstance(shape, tuple) or len(shape) > MAX_DIMS
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**63 for n in shape)):
        raise SafePickleError(f"an array's shape must be a tuple of at most {MAX_DIMS} non-negative ints, "
                              f"got {short_repr(shape, 80)}")
    return shape


def _describe_data(data: Any) -> str:
    """Type and length of an array's data, never its (possibly huge) content."""
    length = f" of length {len(data)}" if isinstance(data, (bytes, list)) else ""
    return f"a {type(data).__name__}{length}"


# --------------------------------------------------------------------------------------------- the walk


class _Materialiser:
    """Replaces array stand-ins by real arrays throughout a loaded pickle and refuses anything else that
    is not a plain container or value. Shared objects are converted once (so the walk itself stays linear),
    but every reference to them counts: ``items`` is the size the data would have written out, ``reached``
    the deepest level it reaches; both are limited. An object met again while it is being converted is a
    cycle and is refused."""

    def __init__(self, allow_arrays: bool, bytes_read: int) -> None:
        self.allow_arrays = allow_arrays
        self.max_items = ITEMS_PER_BYTE_READ * bytes_read + ITEMS_SLACK
        self.bytes_read = bytes_read
        self.items = 0  # items met so far, shared ones counted once per reference
        self.reached = 0  # deepest level met so far
        self.done: dict[int, tuple[Any, int, int]] = {}  # id -> (converted, items in it, levels below it)
        self.active: set[int] = set()

    def walk(self, obj: Any, depth: int) -> Any:
        """``obj`` converted; ``depth`` is its nesting level (0 for the whole pickle)."""
        if isinstance(obj, _LEAVES):
            self.add_items(1)
            return obj
        key = id(obj)  # the loaded graph stays alive during the walk, so ids are not reused
        if key in self.done:
            result, items, below = self.done[key]
            self.reach(depth + below)
            self.add_items(items)
            return result
        if key in self.active:
            what = getattr(obj, "WHAT", f"a {type(obj).__name__}")
            raise SafePickleError(f"the pickle holds {what} that contains itself (a cycle)")
        self.reach(depth)
        outer_reached, items_before = self.reached, self.items
        self.reached = depth  # from here on: the deepest level inside ``obj``
        self.add_items(1)
        self.active.add(key)
        result = self.convert(obj, lambda item: self.walk(item, depth + 1))
        self.active.discard(key)
        self.done[key] = (result, self.items - items_before, self.reached - depth)
        self.reached = max(self.reached, outer_reached)
        return result

    def reach(self, depth: int) -> None:
        """A container at level ``depth``; SafePickleError from ``MAX_DEPTH`` on."""
        if depth >= MAX_DEPTH:
            raise SafePickleError(f"the pickle is nested deeper than {MAX_DEPTH} levels")
        self.reached = max(self.reached, depth)

    def add_items(self, items: int) -> None:
        """``items`` more items of the written-out data; SafePickleError past the limit."""
        self.items += items
        if self.items > self.max_items:
            raise SafePickleError(f"the pickle refers to the same lists, dicts or arrays so often that written "
                                  f"out it would hold more than {self.max_items} items (from {self.bytes_read} "
                                  f"bytes read); refusing to amplify shared data")

    def convert(self, obj: Any, walk: Callable[[Any], Any]) -> Any:
        """One container or array with ``walk`` applied to its items; SafePickleError for anything else."""
        if isinstance(obj, (list, tuple, set, frozenset)):
            return type(obj)(walk(item) for item in obj)
        if isinstance(obj, dict):
            return {walk(k): walk(v) for k, v in obj.items()}
        if isinstance(obj, ArrayProxy):
            if not self.allow_arrays:
                raise SafePickleError("the pickle holds a numpy array, which is not expected here")
            return obj.build(walk)
        what = getattr(obj, "WHAT", f"a {type(obj).__name__}")
        raise SafePickleError(f"the pickle holds {what}, which is not plain data")


# ------------------------------------------------------------------------------------------- messages


def short_repr(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, in time and memory bounded by ``limit`` whatever
    ``value`` is: containers show their first items, a few levels deep, and huge ints their size (Python
    refuses to print ints of more than 4300 digits). For messages that quote data read from a file."""
    return clip(_bounded_repr(value, levels=3, budget=limit), limit)


def _bounded_repr(value: Any, levels: int, budget: int) -> str:
    """At most about ``budget`` characters of ``value``'s repr; ``levels`` more container levels shown."""
    if isinstance(value, (str, bytes)):
        shown = repr(value[:budget])
        return shown if len(value) <= budget else shown + "..."
    if isinstance(value, int) and value.bit_length() > 256:
        return f"<int of {value.bit_length()} bits>"
    if isinstance(value, (int, float, complex, type(None), np.integer, np.floating, np.bool_)):
        return repr(value)
    if isinstance(value, np.ndarray):
        return f"<numpy array of shape {value.shape} and dtype {value.dtype}>"
    for kind, brackets in ((list, "[]"), (tuple, "()"), (dict, "{}"), (set, "{}"), (frozenset, "{}")):
        if isinstance(value, kind):
            return brackets[0] + _bounded_items(value, levels, budget) + brackets[1]
    return f"<{type(value).__name__}>"


def _bounded_items(container: Any, levels: int, budget: int) -> str:
    """The items of a container, comma separated, until ``budget`` characters are used."""
    if levels <= 0:
        return "..." if container else ""
    items = iter(container.items()) if isinstance(container, dict) else iter(container)
    parts, used = [], 0
    for item in items:
        if used >= budget:
            parts.append("...")
            break
        if isinstance(container, dict):
            key = _bounded_repr(item[0], levels - 1, budget - used)
            text = f"{key}: {_bounded_repr(item[1], levels - 1, max(budget - used - len(key), 0))}"
        else:
            text = _bounded_repr(item, levels - 1, budget - used)
        parts.append(text)
        used += len(text) + 2
    return ", ".join(parts) + ("," if isinstance(container, tuple) and len(parts) == 1 else "")
