"""The real TensorRT and cuda-python runtime APIs as tables, and checks of the fakes against them.

The tables (tests/api_tables/*.json, made by tools/api_tables.py from the real binding wheels; README.md there) list
every enum with its values, the members of the classes ume-edge touches with their pybind11 signatures, and the
module's functions and attributes. ``check_object`` compares a fake with one of them::

    trt = FakeTensorRT(FakeCuda())
    assert check_object(trt, load_tensorrt(trt.__version__)) == []                 # the module
    assert check_object(FakeEngine(...), load_tensorrt("10.16"), "ICudaEngine") == []  # an object it hands out
    assert check_object(FakeCuda(), load_cuda("12.9")) == []

A mismatch is one line: a public name the fake defines that the real API lacks, an enum value that differs, a method
whose parameter names match no real overload (names only; ``self`` aside; a fake may leave out trailing parameters
that have defaults), a property the real API makes read-only that the fake lets code assign, or a member of another
kind (a method where the real API has a property, ...). Names starting with ``_`` are the fake's own business, and so
are those passed as ``test_only`` (what tests read from a fake: recorded calls, helpers). The loaded tables are shared:
read them, do not change them.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import types
from pathlib import Path

TABLES = Path(__file__).with_name("api_tables")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- loading

def load_tensorrt(version: str) -> dict:
    """The table of TensorRT ``version`` ("10.16" or a full "10.16.1.11"), by major.minor."""
    major_minor = ".".join(version.split(".")[:2])
    return _load(f"tensorrt-{major_minor}")


def load_cuda(version: str) -> dict:
    """The table of cuda-python's runtime ``version``: "12.9", "12.9.10", "13" or "13.5.0" (13.x has one table)."""
    parts = version.split(".")
    candidates = [f"cuda-runtime-{'.'.join(parts[:2])}", f"cuda-runtime-{parts[0]}"]
    for stem in candidates:
        if (TABLES / f"{stem}.json").exists():
            return _load(stem)
    raise FileNotFoundError(f"no table for cuda-python {version} in {TABLES} (tried {', '.join(candidates)})")


@functools.cache
def _load(stem: str) -> dict:
    path = TABLES / f"{stem}.json"
    if not path.exists():
        known = sorted(p.stem for p in TABLES.glob("*.json"))
        raise FileNotFoundError(f"no API table {path.name} in {TABLES}; there are {known}")
    log.debug("loading API table %s", path)
    return json.loads(path.read_text())


def known_names(table: dict) -> set[str]:
    """Every name the module defines, enum members included (cuda-python's ``cudaSuccess``, ...)."""
    members = {member for values in table["enums"].values() for member in values}
    return members | set(_module_scope(table))


# ---------------------------------------------------------------- checking

def check_object(fake, table: dict, class_name: str | None = None, test_only=()) -> list[str]:
    """Mismatches between ``fake`` and the real module (``class_name`` None) or its class ``class_name``.
    ``fake`` is a class, an instance (its class's and its own attributes count) or a namespace. ``test_only`` names
    what the fake adds for tests to read (recorded calls, helpers): those are not checked."""
    scope = _module_scope(table) if class_name is None else _class_scope(table, class_name)
    real_name = table.get("module", table["package"]) if class_name is None else class_name
    label = _label(fake, class_name)
    mismatches = []
    for name, (value, is_method) in _public_members(fake).items():
        if name in test_only or (name == "__init__" and name not in scope):
            continue
        where = f"{label}.{name}"
        if name not in scope:
            mismatches.append(f"{where}: {_release(table)} has no {real_name}.{name}")
        else:
            mismatches += _check_member(where, value, is_method, scope[name], table)
    log.debug("%s against %s: %d mismatches", label, _release(table), len(mismatches))
    return mismatches


def _release(table: dict) -> str:
    return f"{table['package']} {table['version']}"


def _label(fake, class_name: str | None) -> str:
    if isinstance(fake, types.SimpleNamespace):
        return f"fake {class_name or 'module'}"
    qualified_name = (fake if isinstance(fake, type) else type(fake)).__qualname__
    return qualified_name.rsplit("<locals>.", 1)[-1]


def _module_scope(table: dict) -> dict[str, dict]:
    scope = {name: {"kind": "enum", "members": members} for name, members in table["enums"].items() if "." not in name}
    classes = [*table["classes"], *table.get("other_classes", [])]
    scope.update({name: {"kind": "class", "class": name} for name in classes})
    scope.update({name: {"kind": "function", **entry} for name, entry in table["functions"].items()})
    scope.update({name: {"kind": "attribute", **entry} for name, entry in table["attributes"].items()})
    return scope


def _class_scope(table: dict, class_name: str) -> dict[str, dict]:
    if class_name not in table["classes"]:
        raise KeyError(f"{_release(table)} lists no members of {class_name!r}; it lists {sorted(table['classes'])}")
    scope = {}
    for name, member in table["classes"][class_name]["members"].items():
        scope[name] = {**member, "members": table["enums"][member["enum"]]} if member["kind"] == "enum" else member
    return scope


def _public_members(fake) -> dict[str, tuple[object, bool]]:
    """name -> (value, whether it is a method taking ``self``) for the fake's public names and its ``__init__``."""
    if isinstance(fake, (types.SimpleNamespace, types.ModuleType)):
        return {name: (value, False) for name, value in vars(fake).items() if not name.startswith("_")}
    cls = fake if isinstance(fake, type) else type(fake)
    members = {}
    for klass in reversed(cls.__mro__[:-1]):  # object's members are nobody's API
        for name, value in vars(klass).items():
            if not name.startswith("_") or name == "__init__":
                members[name] = (value, inspect.isfunction(value))
    if not isinstance(fake, type):
        members.update({name: (value, False) for name, value in vars(fake).items() if not name.startswith("_")})
    return members


def _check_member(where: str, value, is_method: bool, real: dict, table: dict) -> list[str]:
    kind = real["kind"]
    if kind == "enum":
        return _check_enum(where, value, real["members"])
    if kind == "class":
        return _check_class(where, value, is_method, real["class"], table)
    if kind in ("function", "method", "static method"):
        return _check_callable(where, value, is_method, real, table)
    if kind == "property":
        return _check_property(where, value, real)
    return _check_attribute(where, value, real)


def _check_enum(where: str, fake, real_members: dict[str, int]) -> list[str]:
    members = getattr(fake, "__members__", None)
    if not isinstance(fake, type) or members is None:
        return [f"{where}: an enum in the real API, {_kind_of(fake)} in the fake"]
    mismatches = []
    for name, member in members.items():
        value = getattr(member, "value", member)
        if name not in real_members:
            mismatches.append(f"{where}.{name}: the real enum has no such member (it has {sorted(real_members)})")
        elif value != real_members[name]:
            mismatches.append(f"{where}.{name} is {value!r}; the real value is {real_members[name]}")
    return mismatches


def _check_class(where: str, fake, is_method: bool, class_name: str, table: dict) -> list[str]:
    detailed = class_name in table["classes"]
    if isinstance(fake, type):
        return check_object(fake, table, class_name) if detailed else []
    if not callable(fake):
        return [f"{where}: a class in the real API, {_kind_of(fake)} in the fake"]
    constructor = table["classes"][class_name]["members"].get("__init__") if detailed else None
    return _check_callable(where, fake, is_method, constructor, table) if constructor else []


def _check_callable(where: str, fake, is_method: bool, real: dict, table: dict) -> list[str]:
    if isinstance(fake, (staticmethod, classmethod)):
        fake, is_method = fake.__func__, isinstance(fake, classmethod)
    if isinstance(fake, property) or not callable(fake):
        return [f"{where}: a method in the real API, {_kind_of(fake)} in the fake"]
    names, open_ended = _parameter_names(fake, is_method)
    if any(_parameters_fit(names, open_ended, overload["parameters"]) for overload in real["overloads"]):
        return []
    fake_call = f"({', '.join(names)}{', ...' if open_ended else ''})"
    real_calls = " or ".join(f"({', '.join(p['name'] for p in o['parameters'])})" for o in real["overloads"])
    return [f"{where}{fake_call}: {_release(table)} takes {real_calls}"]


def _parameter_names(function, is_method: bool) -> tuple[list[str], bool]:
    """The fake's named parameters, and whether it takes ``*args`` or ``**kwargs`` (accepting whatever follows)."""
    parameters = list(inspect.signature(function).parameters.values())[int(is_method):]
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in parameters if p.kind not in variadic], any(p.kind in variadic for p in parameters)


def _parameters_fit(names: list[str], open_ended: bool, real_parameters: list[dict]) -> bool:
    real_names = [p["name"] for p in real_parameters]
    if names != real_names[:len(names)]:
        return False
    return open_ended or all("default" in p for p in real_parameters[len(names):])


def _check_property(where: str, fake, real: dict) -> list[str]:
    if isinstance(fake, property):
        if fake.fset is not None and real.get("writable") is False:
            return [f"{where}: read-only in the real API, the fake's property has a setter"]
        return []
    if callable(fake) and not isinstance(fake, type):
        return [f"{where}: a property in the real API, a method in the fake"]
    if real.get("writable") is False:
        return [f"{where}: read-only in the real API, a plain attribute code can assign in the fake"]
    return []


def _check_attribute(where: str, fake, real: dict) -> list[str]:
    real_value = real.get("value")
    if isinstance(real_value, int) and not isinstance(real_value, bool):
        value = getattr(fake, "value", fake)
        if value != real_value:
            return [f"{where} is {value!r}; the real value is {real_value}"]
    return []


def _kind_of(value) -> str:
    if isinstance(value, property):
        return "a property"
    if isinstance(value, type):
        return "a class"
    return "a method" if callable(value) else f"a {type(value).__name__}"
