"""Record (engine/record.py) behaves like the frozen, slotted dataclasses it replaced."""

from __future__ import annotations

import copy
import pickle

import pytest

from services.search.engine.query.regexsyntax import Concat, Literal
from services.search.engine.record import FrozenInstanceError, Record, field, replace


class Point(Record):
    """Point is a two-field record with a default."""

    x: int
    y: int = 0


class Bag(Record):
    """Bag has a per-instance default and a check after construction."""

    items: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.items) > 3:
            raise ValueError("too many items")


class Labelled(Point):
    """Labelled extends Point with one more field."""

    label: str = ""


def test_construction_by_position_keyword_and_default() -> None:
    assert Point(1) == Point(x=1) == Point(1, 0)
    assert Point(1, y=2).y == 2
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, 2, 3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, z=3)  # type: ignore[call-arg]


def test_default_factory_gives_each_instance_its_own_value_and_post_init_runs() -> None:
    first, second = Bag(), Bag()
    assert first.items == [] and first.items is not second.items
    with pytest.raises(ValueError, match="too many"):
        Bag([1, 2, 3, 4])


def test_fields_are_read_only_and_slotted() -> None:
    point = Point(1, 2)
    with pytest.raises(FrozenInstanceError):
        point.x = 5  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del point.x
    assert not hasattr(point, "__dict__")
    assert isinstance(FrozenInstanceError("x"), AttributeError)


def test_equality_hash_and_repr_are_by_value_and_class() -> None:
    assert Point(1, 2) == Point(1, 2) and hash(Point(1, 2)) == hash(Point(1, 2))
    assert Point(1, 2) != Point(2, 1)
    assert Point(1, 0) != Labelled(1, 0)  # same values, another class
    assert Point(1, 2) != (1, 2)
    assert len({Literal("ab", False), Literal("ab", False), Literal("ab", True)}) == 2
    assert repr(Labelled(1, 2, "p")) == "Labelled(x=1, y=2, label='p')"


def test_inheritance_pickling_copying_and_match() -> None:
    item = Labelled(3, label="z")
    assert (item.x, item.y, item.label) == (3, 0, "z")
    assert Labelled.__match_args__ == ("x", "y", "label")
    tree = Concat((Literal("a", False), Literal("b", True)))
    for value in (item, tree, Bag([1])):
        assert pickle.loads(pickle.dumps(value)) == value
        assert copy.deepcopy(value) == value
    match item:
        case Labelled(x, y, label):
            assert (x, y, label) == (3, 0, "z")
        case _:  # pragma: no cover - the case above matches
            pytest.fail("no match")


def test_replace_copies_with_changes_and_refuses_unknown_fields() -> None:
    original = Labelled(1, 2, label="a")
    moved = replace(original, y=5)
    assert moved == Labelled(1, 5, label="a") and original == Labelled(1, 2, label="a")
    assert type(moved) is Labelled
    with pytest.raises(TypeError, match="no fields"):
        replace(original, z=1)


class Tally(Record, frozen=False):
    """Tally is a mutable record, as a `@dataclass(slots=True)`."""

    count: int
    seen: list[str] = field(default_factory=list)


class NamedTally(Tally, frozen=False):
    """NamedTally extends a mutable record."""

    name: str = ""


def test_mutable_records_assign_compare_by_value_and_are_unhashable() -> None:
    tally = Tally(1)
    tally.count += 1
    tally.seen.append("a")
    assert tally == Tally(2, ["a"]) and tally != Tally(2)
    assert not hasattr(tally, "__dict__")
    with pytest.raises(AttributeError):
        tally.other = 1
    with pytest.raises(TypeError, match="unhashable"):
        hash(tally)
    named = NamedTally(1, name="n")
    named.name = "m"
    assert replace(named, count=5) == NamedTally(5, [], "m")
    assert pickle.loads(pickle.dumps(named)) == named and copy.copy(named) == named


def test_frozen_and_mutable_records_do_not_mix() -> None:
    with pytest.raises(TypeError, match="frozen and a mutable"):

        class Broken(Tally):  # type: ignore[misc]  # frozen by default, over a mutable base
            extra: int = 0

    with pytest.raises(TypeError, match="frozen and a mutable"):

        class AlsoBroken(Point, frozen=False):  # type: ignore[misc]
            extra: int = 0
