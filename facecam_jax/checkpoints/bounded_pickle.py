"""A pickle reader that runs no pickle code and does work bounded by the size of its input.

``pickle.Unpickler`` does linear work per opcode, but what it builds need not be linear: a
list holding the same list twice, nested 40 deep through the memo ("billion laughs"), is a
few hundred bytes, and hashing it as a dict key or walking it as a tree takes 2**40 steps.
This reader interprets the binary opcodes (protocols 2-5) that torch and plain containers
use, and nothing that builds other objects (no INST, OBJ, NEWOBJ, buffers, text protocol 0):

- every opcode counts against ``max_ops``, and the items an opcode moves were each pushed
  by an earlier one, so the total work is linear in the opcodes read;
- the memo is a dict holding at most ``max_memo`` entries: a memo get pushes a reference,
  never a copy, and a large index costs one entry (C pickle grows an array up to it);
- dict keys and set items must be atoms (str, bytes, int, float, bool, None) or flat tuples
  of atoms, so hashing never walks a shared structure;
- only callables that ``find_class`` returned are called (REDUCE), and BUILD on a container
  drops the state (torch's ``_metadata``); on any other object it calls the type's own
  ``__setstate__``, and refuses an object without one.

Nesting depth is not bounded here (it changes after the fact when a shared container is
appended to); whoever walks the result bounds it (``pth.py`` does, visiting each shared
object once).
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, Callable

MAX_OPS = 5_000_000  # torch writes ~32 opcodes per tensor: ~150,000 tensors; Wan 14B has ~1,100
MAX_MEMO = 2_000_000  # ~8 memo entries per tensor: ~250,000 tensors

_ATOMS = (str, bytes, int, float, bool, type(None))
_STOP = pickle.STOP[0]


class PickleTruncated(pickle.UnpicklingError):
    """The stream ended before its STOP opcode."""


class PickleLimitError(pickle.UnpicklingError):
    """The stream asks for more work than the limits allow; the message reads after the stream's name."""


def _hashable(x: Any) -> bool:
    """Whether ``x`` hashes in time linear in its own size: an atom, or a tuple of atoms."""
    if type(x) in _ATOMS:
        return True
    return type(x) is tuple and all(type(i) in _ATOMS for i in x)


class BoundedUnpickler:
    """Unpickles ``data`` with ``find_class(module, name)`` and ``persistent_load(pid)`` as pickle's hooks."""

    def __init__(
        self,
        data: bytes,
        find_class: Callable[[str, str], Any],
        persistent_load: Callable[[Any], Any],
        *,
        max_ops: int = MAX_OPS,
        max_memo: int = MAX_MEMO,
    ):
        self._bytes = bytes(data)
        self._data = memoryview(self._bytes)
        self._pos = 0
        self._find_class = find_class
        self._persistent_load = persistent_load
        self._max_ops, self._max_memo = max_ops, max_memo
        self._stack: list = []
        self._metastack: list[list] = []
        self._memo: dict[int, Any] = {}
        self._callables: dict[int, Any] = {}  # id -> what find_class returned (kept alive, so ids stay unique)
        self.ops = 0
        p = pickle
        self._dispatch: dict[int, Callable[[], Any]] = {
            p.PROTO[0]: self._proto,
            p.FRAME[0]: lambda: self._read(8),  # a framing hint; the data is read as it comes
            p.MARK[0]: self._mark,
            p.POP[0]: self._pop,
            p.POP_MARK[0]: self._pop_mark,
            p.DUP[0]: lambda: self._push(self._top()),
            p.NONE[0]: lambda: self._push(None),
            p.NEWTRUE[0]: lambda: self._push(True),
            p.NEWFALSE[0]: lambda: self._push(False),
            p.BININT[0]: lambda: self._push(self._unpack("<i", 4)),
            p.BININT1[0]: lambda: self._push(self._read(1)[0]),
            p.BININT2[0]: lambda: self._push(self._unpack("<H", 2)),
            p.LONG1[0]: lambda: self._push(self._long(self._read(1)[0])),
            p.LONG4[0]: lambda: self._push(self._long(self._length("<i", 4))),
            p.BINFLOAT[0]: lambda: self._push(self._unpack(">d", 8)),
            p.SHORT_BINUNICODE[0]: lambda: self._push(self._text(self._read(1)[0])),
            p.BINUNICODE[0]: lambda: self._push(self._text(self._length("<I", 4))),
            p.BINUNICODE8[0]: lambda: self._push(self._text(self._length("<Q", 8))),
            p.SHORT_BINBYTES[0]: lambda: self._push(bytes(self._read(self._read(1)[0]))),
            p.BINBYTES[0]: lambda: self._push(bytes(self._read(self._length("<I", 4)))),
            p.BINBYTES8[0]: lambda: self._push(bytes(self._read(self._length("<Q", 8)))),
            p.EMPTY_TUPLE[0]: lambda: self._push(()),
            p.TUPLE[0]: lambda: self._push(tuple(self._pop_mark())),
            p.TUPLE1[0]: lambda: self._tuple(1),
            p.TUPLE2[0]: lambda: self._tuple(2),
            p.TUPLE3[0]: lambda: self._tuple(3),
            p.EMPTY_LIST[0]: lambda: self._push([]),
            p.LIST[0]: lambda: self._push(self._pop_mark()),
            p.APPEND[0]: lambda: self._extend(self._popn(1)),
            p.APPENDS[0]: lambda: self._extend(self._pop_mark()),
            p.EMPTY_DICT[0]: lambda: self._push({}),
            p.DICT[0]: lambda: self._push(self._setitems({}, self._pop_mark())),
            p.SETITEM[0]: self._setitem,
            p.SETITEMS[0]: lambda: self._setitems(self._below_mark(), self._pop_mark()),
            p.EMPTY_SET[0]: lambda: self._push(set()),
            p.ADDITEMS[0]: lambda: self._additems(self._below_mark(), self._pop_mark()),
            p.FROZENSET[0]: lambda: self._push(frozenset(self._additems(set(), self._pop_mark()))),
            p.BINPUT[0]: lambda: self._put(self._read(1)[0]),
            p.LONG_BINPUT[0]: lambda: self._put(self._unpack("<I", 4)),
            p.MEMOIZE[0]: lambda: self._put(len(self._memo)),
            p.BINGET[0]: lambda: self._get(self._read(1)[0]),
            p.LONG_BINGET[0]: lambda: self._get(self._unpack("<I", 4)),
            p.GLOBAL[0]: lambda: self._global(self._line(), self._line()),
            p.STACK_GLOBAL[0]: self._stack_global,
            p.BINPERSID[0]: lambda: self._push(self._persistent_load(self._popn(1)[0])),
            p.REDUCE[0]: self._reduce,
            p.BUILD[0]: self._build,
        }

    def load(self) -> Any:
        """The object the pickle describes; PickleTruncated, PickleLimitError or UnpicklingError otherwise."""
        data, dispatch = self._data, self._dispatch
        while True:
            if self._pos >= len(data):
                raise PickleTruncated(f"the pickle ends after {len(data)} bytes, before its STOP opcode")
            op = data[self._pos]
            self._pos += 1
            self.ops += 1
            if self.ops > self._max_ops:
                raise PickleLimitError(f"exceeds {self._max_ops} opcodes")
            if op == _STOP:
                if self._metastack or len(self._stack) != 1:
                    raise pickle.UnpicklingError("the pickle stops with an unbalanced stack")
                return self._stack.pop()
            handler = dispatch.get(op)
            if handler is None:
                raise pickle.UnpicklingError(
                    f"opcode {bytes([op])!r} at byte {self._pos - 1} is not one a checkpoint uses"
                )
            handler()

    # ------------------------------------------------------------ reading

    def _read(self, n: int) -> memoryview:
        end = self._pos + n
        if end > len(self._data):
            raise PickleTruncated(
                f"an opcode at byte {self._pos} needs {n} bytes, but the pickle ends after {len(self._data)}"
            )
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def _unpack(self, fmt: str, n: int):
        return struct.unpack(fmt, self._read(n))[0]

    def _length(self, fmt: str, n: int) -> int:
        length = self._unpack(fmt, n)
        if length < 0:
            raise pickle.UnpicklingError(f"negative length {length} at byte {self._pos - n}")
        return length

    def _long(self, n: int) -> int:
        return int.from_bytes(self._read(n), "little", signed=True)

    def _text(self, n: int) -> str:
        return str(self._read(n), "utf-8", "surrogatepass")

    def _line(self) -> str:
        end = self._bytes.find(b"\n", self._pos)
        if end < 0:
            raise PickleTruncated(f"a GLOBAL name at byte {self._pos} has no end of line before the end")
        return str(self._read(end - self._pos + 1)[:-1], "utf-8")

    # ------------------------------------------------------------ the stack

    def _proto(self):
        proto = self._read(1)[0]
        if proto > pickle.HIGHEST_PROTOCOL:
            raise pickle.UnpicklingError(f"unsupported pickle protocol {proto}")

    def _push(self, x):
        self._stack.append(x)  # looked up when called: an argument that pops a mark has swapped the stack

    def _mark(self):
        self._metastack.append(self._stack)
        self._stack = []

    def _pop_mark(self) -> list:
        if not self._metastack:
            raise pickle.UnpicklingError("a MARK is expected on the stack")
        items, self._stack = self._stack, self._metastack.pop()
        return items

    def _pop(self):
        if self._stack:
            return self._stack.pop()
        if self._metastack:  # pickle's POP discards a mark when the stack above it is empty
            self._pop_mark()
            return None
        raise pickle.UnpicklingError("pop from an empty stack")

    def _popn(self, n: int) -> list:
        if len(self._stack) < n:
            raise pickle.UnpicklingError("the stack holds fewer items than an opcode takes")
        items = self._stack[-n:]
        del self._stack[-n:]
        return items

    def _top(self):
        if not self._stack:
            raise pickle.UnpicklingError("the stack holds fewer items than an opcode takes")
        return self._stack[-1]

    def _below_mark(self):
        """The item under the last mark: the container SETITEMS and ADDITEMS fill."""
        if not self._metastack or not self._metastack[-1]:
            raise pickle.UnpicklingError("no container below the MARK")
        return self._metastack[-1][-1]

    def _tuple(self, n: int):
        self._stack.append(tuple(self._popn(n)))

    # ------------------------------------------------------------ containers

    def _extend(self, items: list):
        target = self._top()
        if not isinstance(target, list):
            raise pickle.UnpicklingError(f"APPEND to a {type(target).__name__}, not a list")
        target.extend(items)

    def _setitem(self):
        items = self._popn(2)
        self._setitems(self._top(), items)

    def _setitems(self, target, items: list):
        if not isinstance(target, dict):
            raise pickle.UnpicklingError(f"SETITEM on a {type(target).__name__}, not a dict")
        if len(items) % 2:
            raise pickle.UnpicklingError("SETITEMS with an odd number of items")
        for i in range(0, len(items), 2):
            if not _hashable(items[i]):
                raise pickle.UnpicklingError(
                    f"a dict key of type {type(items[i]).__name__}; checkpoints key by strings and numbers"
                )
            target[items[i]] = items[i + 1]
        return target

    def _additems(self, target, items: list):
        if not isinstance(target, set):
            raise pickle.UnpicklingError(f"ADDITEMS on a {type(target).__name__}, not a set")
        bad = [type(i).__name__ for i in items if not _hashable(i)]
        if bad:
            raise pickle.UnpicklingError(f"a set item of type {bad[0]}; only strings, numbers and their tuples")
        target.update(items)
        return target

    # ------------------------------------------------------------ memo

    def _put(self, index: int):
        if index not in self._memo and len(self._memo) >= self._max_memo:
            raise PickleLimitError(f"exceeds {self._max_memo} memo entries")
        self._memo[index] = self._top()

    def _get(self, index: int):
        if index not in self._memo:
            raise pickle.UnpicklingError(f"memo entry {index} is read before it is written")
        self._push(self._memo[index])

    # ------------------------------------------------------------ objects

    def _global(self, module: str, name: str):
        obj = self._find_class(module, name)
        self._callables[id(obj)] = obj
        self._push(obj)

    def _stack_global(self):
        module, name = self._popn(2)
        if type(module) is not str or type(name) is not str:
            raise pickle.UnpicklingError("STACK_GLOBAL names that are not strings")
        self._global(module, name)

    def _reduce(self):
        (args,) = self._popn(1)
        func = self._top()
        if self._callables.get(id(func)) is not func or not callable(func):
            raise pickle.UnpicklingError(f"REDUCE calls a {type(func).__name__}, which no GLOBAL named")
        if type(args) is not tuple:
            raise pickle.UnpicklingError(f"REDUCE with {type(args).__name__} arguments, not a tuple")
        self._stack[-1] = func(*args)

    def _build(self):
        (state,) = self._popn(1)
        inst = self._top()
        if isinstance(inst, (dict, list)):
            return  # attributes on a container (torch's OrderedDict._metadata) are not needed
        setstate = getattr(type(inst), "__setstate__", None)
        if setstate is None or isinstance(inst, type):
            raise pickle.UnpicklingError(f"BUILD on a {type(inst).__name__}, which checkpoints never do")
        setstate(inst, state)
