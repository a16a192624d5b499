"""record: frozen, slotted value classes that cost next to nothing to define.

`@dataclass(frozen=True, slots=True)` compiles six methods per class when its module is
imported: about 0.7 ms a class on this machine, and the search path defined about fifty of
them, a fifth of `kotadb index search`'s start-up. A `Record` subclass behaves the same way
for everything the engine uses -

* construction by position or keyword, with defaults (`field(default_factory=...)` too) and
  an optional `__post_init__`;
* read-only attributes (assigning or deleting raises `FrozenInstanceError`) and `__slots__`;
* equality and hashing by value (only with an instance of the same class), a dataclass-like
  `repr`, `__match_args__`, pickling and copying -

from generic methods, and compiles its `__init__` only when the class is first constructed
(so a class the run never builds costs nothing). mypy types a Record as a frozen dataclass
(PEP 681), so constructors and read-only fields are checked as before. Unlike a dataclass, a
Record is unknown to `dataclasses.fields` and `dataclasses.replace` (`replace` here does the
latter); classes that need the former stay dataclasses.

`class Tally(Record, frozen=False)` is the mutable form, for `@dataclass(slots=True)`: fields
can be assigned, equality is still by value and, as for such a dataclass, instances are
unhashable. A class and its bases are all frozen or all mutable. Importing `dataclasses`
costs ~10 ms by itself (it loads `inspect`), which `kotadb index search` no longer pays.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any, ClassVar, TypeVar, cast, dataclass_transform

T = TypeVar("T")


class FrozenInstanceError(AttributeError):
    """FrozenInstanceError is raised when a Record's field is assigned or deleted."""


class _Factory:
    """_Factory marks a field default that is made afresh for every instance."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], T]) -> T:
    """field declares a Record field whose default is `default_factory()` for each instance."""
    return cast(T, _Factory(default_factory))


def _values(fields: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """_values returns a function giving an instance's field values as a tuple."""
    if not fields:
        return lambda _: ()
    if len(fields) == 1:
        only = attrgetter(fields[0])
        return lambda item: (only(item),)
    return cast(Callable[[Any], tuple[Any, ...]], attrgetter(*fields))


def _lazy_init(self: Any, *args: Any, **kwargs: Any) -> None:
    """_lazy_init compiles the class's real `__init__` on first construction, then runs it."""
    cls = type(self)
    if "__init__" in cls.__dict__ and cls.__dict__["__init__"] is not _lazy_init:
        cls.__dict__["__init__"](self, *args, **kwargs)  # pragma: no cover - a race between threads
        return
    fields: tuple[str, ...] = cls.__record_fields__
    defaults: dict[str, object] = cls.__record_defaults__
    params, body = ["self"], []
    scope: dict[str, object] = {"_set": object.__setattr__, "_MISSING": _MISSING}
    for name in fields:
        default = defaults.get(name, _MISSING)
        if isinstance(default, _Factory):
            scope[f"_make_{name}"] = default.make
            params.append(f"{name}=_MISSING")
            body.append(f"  if {name} is _MISSING: {name} = _make_{name}()")
        elif default is not _MISSING:
            scope[f"_default_{name}"] = default
            params.append(f"{name}=_default_{name}")
        else:
            params.append(name)
        body.append(f"  _set(self, {name!r}, {name})")
    if hasattr(cls, "__post_init__"):
        body.append("  self.__post_init__()")
    source = f"def __init__({', '.join(params)}):\n" + "\n".join(body or ["  pass"]) + "\n"
    exec(source, scope)
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"  # type: ignore[attr-defined]
    type.__setattr__(cls, "__init__", init)
    init(self, *args, **kwargs)  # type: ignore[operator]


_MISSING: Any = object()


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
class RecordMeta(type):
    """RecordMeta builds Record classes: slots and field lists from the annotations, no code compiled."""

    def __new__(
        mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], *, frozen: bool = True
    ) -> RecordMeta:
        inherited: tuple[str, ...] = ()
        defaults: dict[str, object] = {}
        for base in bases:
            if getattr(base, "__record_frozen__", None) not in (None, frozen):
                raise TypeError(f"{name}: a frozen and a mutable Record cannot inherit from each other")
        for base in reversed(bases):
            inherited += tuple(f for f in getattr(base, "__record_fields__", ()) if f not in inherited)
            defaults.update(getattr(base, "__record_defaults__", {}))
        annotations: dict[str, str] = namespace.get("__annotations__", {})
        own = tuple(n for n, hint in annotations.items() if not str(hint).startswith("ClassVar"))
        for item in own:
            if item in namespace:
                defaults[item] = namespace.pop(item)
        namespace["__slots__"] = tuple(n for n in own if n not in inherited)
        fields = inherited + tuple(n for n in own if n not in inherited)
        namespace["__record_fields__"] = fields
        namespace["__record_defaults__"] = defaults
        namespace["__record_values__"] = staticmethod(_values(fields))
        namespace["__match_args__"] = fields
        namespace.setdefault("__init__", _lazy_init)
        namespace["__record_frozen__"] = frozen if bases else None  # Record itself is either
        if not frozen:
            namespace.setdefault("__setattr__", object.__setattr__)
            namespace.setdefault("__delattr__", object.__delattr__)
            namespace.setdefault("__hash__", None)  # as a mutable dataclass with eq: unhashable
        elif "__eq__" in namespace and "__hash__" not in namespace:
            namespace["__hash__"] = Record.__hash__  # as a frozen dataclass keeps a hash
        return super().__new__(mcls, name, bases, namespace)


class Record(metaclass=RecordMeta):
    """Record is the base of frozen value classes; see the module docstring."""

    __slots__ = ()
    __record_fields__: ClassVar[tuple[str, ...]]
    __record_defaults__: ClassVar[dict[str, object]]
    __record_frozen__: ClassVar[bool]

    @staticmethod
    def __record_values__(item: Any) -> tuple[Any, ...]:
        """Record.__record_values__ is replaced per class by a getter of the field values."""
        raise NotImplementedError  # pragma: no cover - every subclass gets its own

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return bool(self.__record_values__(self) == self.__record_values__(other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.__record_values__(self))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__record_fields__)
        return f"{type(self).__qualname__}({fields})"

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return (type(self), self.__record_values__(self))


R = TypeVar("R", bound=Record)


def replace(item: R, **changes: Any) -> R:
    """replace is `dataclasses.replace` for a Record: a copy of `item` with `changes` applied."""
    unknown = set(changes) - set(item.__record_fields__)
    if unknown:
        raise TypeError(f"{type(item).__qualname__} has no fields {sorted(unknown)}")
    values = dict(zip(item.__record_fields__, item.__record_values__(item), strict=True))
    values.update(changes)
    return type(item)(**values)
