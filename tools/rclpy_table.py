"""Write tests/api_tables/rclpy-<distro>.json: the part of rclpy's Python API that ``ume_edge.ros2`` uses, read
with ``ast`` from rclpy's source at a distro branch (nothing is imported: rclpy cannot be installed here).

    python tools/rclpy_table.py                     # --ref jazzy and --ref humble, from the mirror's git clone
    python tools/rclpy_table.py --ref humble --rclpy /path/to/rclpy.git

For each module in MODULES the table lists its classes (every public method and property, with what they inherit
from other rclpy classes), enums (IntEnum subclasses and their literal values), functions and module attributes,
re-exports followed to where they are defined. Parameters are listed in order, keyword-only ones marked, with
defaults as written; ``*args``/``**kwargs`` are recorded on the overload, not as parameters. The table's format is
the one tests/api_conformance.py reads (tests/api_tables/README.md), with one module table per module under
``modules``. A development script, not run by CI.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

RCLPY = Path("/work/.mirror/ros2+rclpy/repo")
OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "api_tables"
PACKAGE_DIR = "rclpy/rclpy"

# module -> the names of it that the table lists ("*": every public name the module defines or re-exports)
MODULES = {
    "rclpy": ["init", "shutdown", "try_shutdown", "ok", "spin", "spin_once", "create_node"],
    "rclpy.node": ["Node"],
    "rclpy.qos": ["QoSProfile", "HistoryPolicy", "ReliabilityPolicy", "DurabilityPolicy", "LivelinessPolicy",
                  "qos_profile_sensor_data", "qos_profile_system_default"],
    "rclpy.executors": ["Executor", "SingleThreadedExecutor", "MultiThreadedExecutor", "ExternalShutdownException"],
    "rclpy.callback_groups": ["CallbackGroup", "MutuallyExclusiveCallbackGroup", "ReentrantCallbackGroup"],
    "rclpy.publisher": ["Publisher"],
    "rclpy.subscription": ["Subscription"],
    "rclpy.timer": ["Timer"],
    "rclpy.clock": ["Clock"],
    "rclpy.time": ["Time"],
    "rclpy.impl.rcutils_logger": ["RcutilsLogger"],
}
ENUM_BASES = {"Enum", "IntEnum", "IntFlag", "Flag"}


@dataclass
class Module:
    """One parsed rclpy module: its top-level definitions and where its imported names come from."""

    name: str
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)
    assignments: dict[str, ast.expr] = field(default_factory=dict)
    imports: dict[str, tuple[str, str]] = field(default_factory=dict)  # local name -> (module, name there)


class Source:
    """rclpy's Python modules at one git ref, parsed on demand."""

    def __init__(self, repository: Path, ref: str):
        self.repository, self.ref = repository, ref
        self.modules: dict[str, Module] = {}

    def show(self, path: str) -> str:
        return subprocess.run(["git", "-C", str(self.repository), "show", f"{self.ref}:{path}"], check=True,
                              capture_output=True, text=True).stdout

    def module(self, name: str) -> Module:
        if name not in self.modules:
            self.modules[name] = self.parse(name)
        return self.modules[name]

    def parse(self, name: str) -> Module:
        relative = name.replace(".", "/")
        try:
            text = self.show(f"rclpy/{relative}.py")
        except subprocess.CalledProcessError:
            text = self.show(f"rclpy/{relative}/__init__.py")
        module = Module(name)
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef):
                module.functions[node.name] = node
            elif isinstance(node, ast.ClassDef):
                module.classes[node.name] = node
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                module.assignments[node.targets[0].id] = node.value
            elif isinstance(node, ast.ImportFrom):
                origin = absolute_module(name, node)
                for alias in node.names:
                    module.imports[alias.asname or alias.name] = (origin, alias.name)
        return module

    def resolve(self, module_name: str, name: str) -> tuple[Module, str] | None:
        """The rclpy module that defines ``name`` as seen from ``module_name`` (following re-exports)."""
        module = self.module(module_name)
        if name in module.functions or name in module.classes or name in module.assignments:
            return module, name
        origin = module.imports.get(name)
        if origin and origin[0].split(".")[0] == "rclpy" and not origin[0].endswith("implementation_singleton"):
            return self.resolve(*origin)
        return None

    def commit(self) -> str:
        return subprocess.run(["git", "-C", str(self.repository), "rev-parse", f"{self.ref}^{{commit}}"],
                              check=True, capture_output=True, text=True).stdout.strip()

    def package_version(self) -> str:
        found = re.search(r"<version>([^<]+)</version>", self.show("rclpy/package.xml"))
        if not found:
            raise ValueError(f"no <version> in rclpy/package.xml at {self.ref}")
        return found.group(1)


def absolute_module(current: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = current if current == "rclpy" else current.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        package = package.rsplit(".", 1)[0]
    return f"{package}.{node.module}" if node.module else package


def overload(function: ast.FunctionDef, method: bool) -> dict:
    arguments = function.args
    positional = [*arguments.posonlyargs, *arguments.args]
    defaults = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
    parameters = [parameter(argument, default) for argument, default in zip(positional, defaults, strict=True)]
    for index in range(len(arguments.posonlyargs)):
        parameters[index]["positional_only"] = True
    keyword = [parameter(argument, default) | {"keyword_only": True}
               for argument, default in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)]
    entry: dict = {"parameters": (parameters[1:] if method else parameters) + keyword}
    if arguments.vararg:
        entry["var_positional"] = arguments.vararg.arg
    if arguments.kwarg:
        entry["var_keyword"] = arguments.kwarg.arg
    return entry


def parameter(argument: ast.arg, default: ast.expr | None) -> dict:
    entry: dict[str, object] = {"name": argument.arg}
    if argument.annotation is not None:
        entry["type"] = ast.unparse(argument.annotation)
    if default is not None:
        entry["default"] = ast.unparse(default)
    return entry


def decorator_names(function: ast.FunctionDef) -> list[str]:
    return [ast.unparse(decorator) for decorator in function.decorator_list]


def is_enum(source: Source, module: Module, cls: ast.ClassDef) -> bool:
    for base in cls.bases:
        name = ast.unparse(base)
        if name in ENUM_BASES:
            return True
        found = source.resolve(module.name, name)
        if found and found[1] in found[0].classes and is_enum(source, found[0], found[0].classes[found[1]]):
            return True
    return False


def enum_members(source: Source, module: Module, cls: ast.ClassDef) -> dict[str, int]:
    members = {}
    for node in cls.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, int)):
            members[node.targets[0].id] = node.value.value
    return members


def class_members(source: Source, module: Module, cls: ast.ClassDef) -> dict[str, dict]:
    """Public members of ``cls``, those of its rclpy base classes first (a subclass's own win)."""
    members: dict[str, dict] = {}
    for base in cls.bases:
        found = source.resolve(module.name, ast.unparse(base).split("[")[0])
        if found and found[1] in found[0].classes:
            inherited = class_members(source, found[0], found[0].classes[found[1]])
            members.update({name: entry for name, entry in inherited.items() if name != "__init__"})
    own = own_members(cls)
    if "__init__" not in own and "__new__" in own:
        own["__init__"] = own["__new__"]
    own.pop("__new__", None)
    members.update(own)
    return members


def own_members(cls: ast.ClassDef) -> dict[str, dict]:
    members: dict[str, dict] = {}
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and (not node.name.startswith("_") or node.name in ("__init__",
                                                                                               "__new__")):
            decorators = decorator_names(node)
            if "property" in decorators:
                members[node.name] = {"kind": "property", "writable": False}
            elif any(d.endswith(".setter") for d in decorators):
                members[node.name]["writable"] = True
            elif "staticmethod" in decorators:
                members[node.name] = {"kind": "static method", "overloads": [overload(node, method=False)]}
            else:
                members[node.name] = {"kind": "method", "overloads": [overload(node, method=True)]}
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and not node.targets[0].id.startswith("_"):
            members[node.targets[0].id] = {"kind": "attribute", **value_entry(node.value)}
    return members


def value_entry(value: ast.expr) -> dict:
    if isinstance(value, ast.Constant):
        return {"type": type(value.value).__name__, "value": value.value}
    if isinstance(value, ast.Call):
        return {"type": ast.unparse(value.func)}
    return {"type": "alias", "value": ast.unparse(value)}


def module_table(source: Source, module_name: str, names: list[str]) -> dict:
    table: dict = {"module": module_name, "enums": {}, "classes": {}, "other_classes": [], "functions": {},
                   "attributes": {}}
    for name in names:
        found = source.resolve(module_name, name)
        if found is None:
            raise LookupError(f"{module_name}.{name} is not defined at {source.ref}")
        where, local = found
        if local in where.functions:
            table["functions"][name] = {"overloads": [overload(where.functions[local], method=False)],
                                        "defined_in": where.name}
        elif local in where.classes:
            add_class(source, table, name, where, where.classes[local])
        else:
            table["attributes"][name] = {**value_entry(where.assignments[local]), "defined_in": where.name}
    return table


def add_class(source: Source, table: dict, name: str, where: Module, cls: ast.ClassDef) -> None:
    if is_enum(source, where, cls):
        table["enums"][name] = enum_members(source, where, cls)
    elif any(ast.unparse(base) in ("Exception", "RuntimeError") for base in cls.bases):
        table["other_classes"].append(name)
    else:
        table["classes"][name] = {"members": class_members(source, where, cls), "defined_in": where.name}


def build_table(repository: Path, ref: str) -> dict:
    source = Source(repository, ref)
    return {
        "package": "rclpy",
        "version": f"{source.package_version()} ({ref})",
        "distro": ref,
        "sources": {"repository": "ros2/rclpy", "ref": ref, "commit": source.commit(), "directory": PACKAGE_DIR},
        "modules": {name: module_table(source, name, names) for name, names in MODULES.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", action="append", help="distro branch of rclpy (repeatable; default: jazzy and "
                                                       "humble)")
    parser.add_argument("--rclpy", type=Path, default=RCLPY, help="git clone of ros2/rclpy")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder the JSON tables go to")
    args = parser.parse_args()
    for ref in args.ref or ["jazzy", "humble"]:
        table = build_table(args.rclpy, ref)
        destination = args.out / f"rclpy-{ref}.json"
        destination.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote {destination} (rclpy {table['version']}, commit {table['sources']['commit']})")


if __name__ == "__main__":
    main()
