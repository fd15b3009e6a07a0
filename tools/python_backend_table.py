"""Write a table of the real ``triton_python_backend_utils`` API (Triton's Python backend) to tests/api_tables/, for
tests that hold the fake of it (tests/fake_pb_utils.py) to the real module on machines without tritonserver.

A development script, not run by CI. The module a Python-backend model imports is made of two halves, and the table
is read from the real source of both:

- the C++ half, the pybind11 module ``c_python_backend_utils`` in python_backend's ``src/pb_stub.cc`` (read with
  ``git show`` from a clone of triton-inference-server/python_backend, at the release branch of the tritonserver the
  nvidia-pytriton wheel ships). The ``py::class_``/``py::enum_`` chains are parsed: ``.def``, ``.def_static``,
  ``.def_property_readonly(_static)``, constructors with their ``py::arg`` names and defaults, module functions,
  ``.value``/``.export_values()``. Parameters without ``py::arg`` get pybind11's names (``arg0``, ``arg1``; such
  parameters cannot be passed by keyword), counted from the C++ declaration in python_backend's headers. Enum values
  come from the C++ enums (``TRITONSERVER_Error_Code`` from triton-inference-server/core's ``tritonserver.h``). The
  stub copies only some of these names into ``triton_python_backend_utils`` (``py::setattr`` in ``StubSetup``): those
  are the module's; the other classes are listed under ``unexported_classes`` (a model gets their objects from calls
  such as ``MetricFamily.Metric``), the other enums under ``c_python_backend_utils.<Name>``.
- the Python half, ``triton_python_backend_utils.py``, as the nvidia-pytriton wheel installs it: its functions, classes
  and module-level names, read with ``ast``.

Finally it looks for each C++-half name in the wheel's Python stub binary (``strings``-like), and for the names that a
newer python_backend (``--newer``) adds, to tell which release the stub was built from.

    python tools/python_backend_table.py                                  # r24.10, the wheel's tritonserver 2.51
    python tools/python_backend_table.py --ref r24.10 --newer HEAD --python-backend DIR --core DIR
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "api_tables"
MIRRORS = Path("/work/.mirror")
PYTHON_BACKEND = MIRRORS / "triton-inference-server+python_backend" / "repo"
CORE = MIRRORS / "triton-inference-server+core" / "repo"
WHEEL_ROOT = Path(sysconfig.get_paths()["purelib"]) / "pytriton" / "tritonserver"
PYTHON_HALF = WHEEL_ROOT / "backends" / "python" / "triton_python_backend_utils.py"
STUB = WHEEL_ROOT / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
    "triton_python_backend_stub"
C_MODULE = "c_python_backend_utils"
MODULE = "triton_python_backend_utils"

problems: list[str] = []  # what could not be parsed; printed at the end


def problem(text: str) -> None:
    problems.append(text)


# ---------------------------------------------------------------------------------------------------------------
# C++ text: comments, strings, brackets


def strip_comments(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] in "\"'":
            end = string_end(text, i)
            out.append(text[i:end])
            i = end
        elif text.startswith("//", i):
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def string_end(text: str, start: int) -> int:
    quote, i = text[start], start + 1
    while text[i] != quote:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def closing(text: str, start: int) -> int:
    """The index just past the bracket that closes the one at ``start`` (strings skipped)."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack, i = [], start
    while i < len(text):
        char = text[i]
        if char in "\"'":
            i = string_end(text, i)
            continue
        if char in pairs:
            stack.append(pairs[char])
        elif char in ")]}":
            if stack.pop() != char:
                raise ValueError(f"unbalanced {char!r} at {i}")
            if not stack:
                return i + 1
        i += 1
    raise ValueError(f"no closing bracket for {text[start]!r} at {start}")


def split_top(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside brackets, template arguments and strings."""
    parts, depth, angle, start, i = [], 0, 0, 0, 0
    while i < len(text):
        char = text[i]
        if char in "\"'":
            i = string_end(text, i)
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and char == "<" and i and (text[i - 1].isalnum() or text[i - 1] == "_"):
            angle += 1
        elif depth == 0 and char == ">" and angle and text[i - 1] != "-":
            angle -= 1
        elif depth == 0 and angle == 0 and char == separator:
            parts.append(text[start:i].strip())
            start = i + 1
        i += 1
    tail = text[start:].strip()
    return parts + [tail] if tail else parts


def c_string(literal: str) -> str | None:
    literal = literal.strip()
    return json.loads(literal) if re.fullmatch(r'"(?:[^"\\]|\\.)*"', literal) else None


def template_args(expression: str) -> list[str]:
    """``py::init<A, B>()`` -> ``["A", "B"]``."""
    start = expression.index("<") + 1
    end = expression.rindex(">")
    return split_top(expression[start:end], ",")


def clean_type(cpp_type: str) -> str:
    cpp_type = re.sub(r"\bconst\b", "", cpp_type).replace("&", "").replace("*", "")
    return " ".join(cpp_type.split())


# ---------------------------------------------------------------------------------------------------------------
# C++ declarations: enums and member functions in the headers


def enums_in(text: str) -> dict[str, dict[str, int]]:
    """Every ``enum Name {...}``, ``enum class Name {...}`` and ``typedef enum name {...} Name;``: name -> values."""
    found = {}
    text = strip_comments(text)
    for match in re.finditer(r"\b(typedef\s+)?enum\s+(?:class\s+)?(\w+)?\s*(?::\s*[\w:]+\s*)?\{", text):
        body_end = closing(text, match.end() - 1)
        body = text[match.end():body_end - 1]
        name = match.group(2)
        if match.group(1):
            name = re.match(r"\s*(\w+)", text[body_end:]).group(1)
        values, value = {}, -1
        for item in split_top(body, ","):
            if "=" in item:
                key, expression = (part.strip() for part in item.split("=", 1))
                value = evaluate_int(expression, values)
            else:
                key, value = item.strip(), value + 1
            if key.startswith("#"):
                problem(f"enum {name}: preprocessor line in its body, {key!r}")
                continue
            values[key] = value
        found[name] = values
    return found


def evaluate_int(expression: str, known: dict[str, int]) -> int:
    if expression in known:
        return known[expression]
    return int(expression, 0)


@dataclass
class Declaration:
    parameters: list[str]  # C++ types, one per parameter
    static: bool


def class_bodies(headers: dict[str, str]) -> dict[str, str]:
    bodies = {}
    for text in headers.values():
        text = strip_comments(text)
        for match in re.finditer(r"\b(?:class|struct)\s+(\w+)\s*(?:final\s*)?(?::[^{;()]*)?\{", text):
            bodies.setdefault(match.group(1), text[match.end():closing(text, match.end() - 1) - 1])
    return bodies


def outside_classes(text: str) -> str:
    """``text`` without the bodies of its classes and structs (what is left is declared at namespace level)."""
    while match := re.search(r"\b(?:class|struct)\s+\w+\s*(?:final\s*)?(?::[^{;()]*)?\{", text):
        text = text[:match.start()] + text[closing(text, match.end() - 1):]
    return text


def declaration(bodies: dict[str, str], cls: str, method: str) -> Declaration | None:
    """The first declaration of ``cls::method`` in its class body (the stub's, where ``#ifdef``s differ)."""
    body = bodies.get(cls)
    if body is None:
        return None
    for match in re.finditer(rf"(?<![\w.>~]){re.escape(method)}\s*\(", body):
        statement_start = max(body.rfind(mark, 0, match.start()) for mark in (";", "}", "{", "public:", "private:",
                                                                               "protected:", "#endif", "#else"))
        prefix = body[statement_start:match.start()]
        if "=" in prefix or "return" in prefix or not prefix.strip():
            continue  # a call, or a constructor
        end = closing(body, match.end() - 1)
        return Declaration(parameter_types(body[match.end():end - 1]), bool(re.search(r"\bstatic\b", prefix)))
    return None


def parameter_types(text: str) -> list[str]:
    parameters = []
    for parameter in split_top(text, ","):
        parameter = parameter.split("=", 1)[0].strip()
        if parameter in ("", "void"):
            continue
        parameters.append(re.sub(r"\s*\b\w+$", "", parameter) if re.search(r"[\w>&*]\s+\w+$", parameter)
                          else parameter)
    return parameters


# ---------------------------------------------------------------------------------------------------------------
# the pybind11 module


@dataclass
class Binding:
    """The parsed ``c_python_backend_utils``."""

    classes: dict[str, dict] = field(default_factory=dict)  # Python name -> {"members": {...}}
    enums: dict[str, dict[str, int]] = field(default_factory=dict)
    functions: dict[str, dict] = field(default_factory=dict)
    attributes: dict[str, dict] = field(default_factory=dict)
    exceptions: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)  # C++ variable -> Python class name
    cpp_classes: dict[str, str] = field(default_factory=dict)  # C++ type -> Python class name
    enumerators: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # C++ name -> (enum, member, value)


class Parser:
    def __init__(self, source: str, headers: dict[str, str], cpp_enums: dict[str, dict[str, int]]):
        self.source = strip_comments(source)
        self.bodies = class_bodies(headers)
        self.header_text = "\n".join(outside_classes(strip_comments(text)) for text in headers.values())
        self.cpp_enums = cpp_enums
        self.binding = Binding()

    # ---- statements

    def parse(self) -> Binding:
        match = re.search(rf"PYBIND11_EMBEDDED_MODULE\(\s*{C_MODULE}\s*,\s*(\w+)\s*\)\s*\{{", self.source)
        body = self.source[match.end():closing(self.source, match.end() - 1) - 1]
        self.module_var = match.group(1)
        for statement in split_top(body, ";"):
            self.statement(" ".join(statement.split()))
        return self.binding

    def statement(self, text: str) -> None:
        head = re.match(r"py::class_<([^,>]+)[^(]*?>\s*(\w+)?\s*\(\s*(\w+)\s*,\s*(\"\w+\")\s*\)", text)
        if head:
            name = c_string(head.group(4))
            self.binding.classes[name] = {"members": {}}
            self.binding.cpp_classes[head.group(1).strip()] = name
            if head.group(2):
                self.binding.variables[head.group(2)] = name
            self.chain(name, text[head.end():])
            return
        head = re.match(r"py::enum_<([^>]+)>\s*\(\s*(\w+)\s*,\s*(\"\w+\")\s*\)", text)
        if head:
            self.enum(head.group(1), head.group(2), c_string(head.group(3)), text[head.end():])
            return
        head = re.match(r"(\w+)((?:\.def\w*\(.*)$)", text)
        if head and head.group(1) in self.binding.variables:
            self.chain(self.binding.variables[head.group(1)], head.group(2))
            return
        if head and head.group(1) == self.module_var:
            self.chain(None, head.group(2))
            return
        head = re.match(rf'{self.module_var}\.attr\("(\w+)"\)\.attr\("(\w+)"\)\s*=\s*(.+)$', text)
        if head:
            self.binding.classes[head.group(1)]["members"][head.group(2)] = self.enumerator_attribute(head.group(3))
            return
        head = re.match(r'py::register_exception<[^>]+>\(\s*\w+\s*,\s*("\w+")\s*\)$', text)
        if head:
            self.binding.exceptions.append(c_string(head.group(1)))
            return
        problem(f"statement not parsed: {text[:160]}")

    def chain(self, cls: str | None, text: str) -> None:
        """``.def(...).def_static(...)...`` on class ``cls`` (None: the module)."""
        i = 0
        while call := re.match(r"\s*\.(\w+)\s*\(", text[i:]):
            end = closing(text, i + call.end() - 1)
            self.call(cls, call.group(1), split_top(text[i + call.end():end - 1], ","))
            i = end
        if text[i:].strip():
            problem(f"after the chain of {cls or C_MODULE}, not part of it (ignored): {text[i:].strip()[:160]}")

    def call(self, cls: str | None, method: str, args: list[str]) -> None:
        target = self.binding.functions if cls is None else self.binding.classes[cls]["members"]
        if method == "def" and args[0].startswith("py::init"):
            target["__init__"] = self.callable_entry("method", self.constructor_parameters(cls, args[0]), args[1:])
        elif method in ("def", "def_static"):
            kind = "function" if cls is None else "method" if method == "def" else "static method"
            name = c_string(args[0])
            parameters = self.function_parameters(args[1], bound=method == "def" and cls is not None)
            entry = self.callable_entry(kind, parameters, args[2:])
            if cls is None:
                entry.pop("kind")
            target[name] = entry
        elif method == "def_property_readonly_static":
            target[c_string(args[0])] = {**self.lambda_return_attribute(args[1]), "read_only": True}
        elif method in ("def_property_readonly", "def_property"):
            target[c_string(args[0])] = {"kind": "property", "writable": method == "def_property"}
        else:
            problem(f"{cls}.{method}(...) not understood: {', '.join(args)[:160]}")

    def enum(self, cpp_type: str, owner: str, name: str, text: str) -> None:
        owner_class = self.binding.variables.get(owner)
        qualified = f"{owner_class}.{name}" if owner_class else f"{C_MODULE}.{name}"
        values = self.cpp_enums.get(cpp_type.split("::")[-1].strip())
        if values is None:
            problem(f"enum {qualified}: no C++ enum {cpp_type} in the headers")
            values = {}
        members, exported = {}, False
        for call in re.finditer(r"\.(\w+)\s*\(", text):
            if call.group(1) == "export_values":
                exported = True
                continue
            args = split_top(text[call.end():closing(text, call.end() - 1) - 1], ",")
            enumerator = args[1].split("::")[-1]
            members[c_string(args[0])] = values[enumerator]
            self.binding.enumerators[enumerator] = (name, c_string(args[0]), values[enumerator])
        self.binding.enums[qualified] = members
        scope = self.binding.attributes if owner_class is None else self.binding.classes[owner_class]["members"]
        if owner_class:
            scope[name] = {"kind": "enum", "enum": qualified}
        if exported:
            for member, value in members.items():
                scope.setdefault(member, {}).update(self.attribute(name, member, value, owner_class is not None))

    @staticmethod
    def attribute(enum: str, member: str, value: int, in_class: bool) -> dict:
        entry = {"type": enum, "member": member, "value": value}
        return {"kind": "attribute", **entry} if in_class else entry

    def enumerator_attribute(self, expression: str) -> dict:
        enumerator = expression.strip().split("::")[-1]
        if enumerator not in self.binding.enumerators:
            problem(f"value {expression!r} is no enumerator of a bound enum")
            return {"kind": "attribute"}
        return self.attribute(*self.binding.enumerators[enumerator], in_class=True)

    def lambda_return_attribute(self, expression: str) -> dict:
        returned = re.search(r"return\s+([\w:]+)\s*;", expression)
        if not returned:
            problem(f"static property {expression[:100]}: no return value found")
            return {"kind": "attribute"}
        return self.enumerator_attribute(returned.group(1))

    # ---- parameters

    def callable_entry(self, kind: str, types: list[str] | None, extras: list[str]) -> dict:
        named = [self.py_arg(extra) for extra in extras if extra.startswith("py::arg")]
        if types is not None and named and len(named) != len(types):
            problem(f"{len(named)} py::arg for {len(types)} parameters: {extras}")
        if named:
            if types is not None:
                for parameter, cpp_type in zip(named, types, strict=False):
                    parameter["type"] = clean_type(cpp_type)
            parameters = named
        elif types is None:
            parameters = []
        else:
            parameters = [{"name": f"arg{index}", "type": clean_type(t), "positional_only": True}
                          for index, t in enumerate(types)]
        return {"kind": kind, "overloads": [{"parameters": parameters}]}

    def py_arg(self, text: str) -> dict:
        match = re.match(r'py::arg\(\s*("\w+")\s*\)(\.none\((true|false)\))?\s*(?:=\s*(.+))?$', text)
        if not match:
            problem(f"argument not understood: {text}")
            return {"name": "?"}
        parameter: dict[str, object] = {"name": c_string(match.group(1))}
        if match.group(3):
            parameter["accepts_none"] = match.group(3) == "true"
        if match.group(4) is not None:
            parameter["default"] = self.default(match.group(4).strip())
        return parameter

    def default(self, expression: str) -> str:
        literal = c_string(expression)
        if literal is not None:
            return repr(literal)
        if re.fullmatch(r"-?\d+", expression):
            return expression
        if expression in ("true", "false"):
            return str(expression == "true")
        if expression in ("py::none()", "nullptr") or re.fullmatch(r"static_cast<.+>\(nullptr\)", expression):
            return "None"
        if expression == "py::list()":
            return "[]"
        enumerator = expression.split("::")[-1]
        if enumerator in self.binding.enumerators:
            enum, member, value = self.binding.enumerators[enumerator]
            return f"<{enum}.{member}: {value}>"
        return expression  # a C++ object (PreferredMemory(...), InferenceTrace()): as written

    def constructor_parameters(self, cls: str, expression: str) -> list[str] | None:
        if expression.startswith("py::init<"):
            return template_args(expression)
        inner = expression[expression.index("(") + 1:expression.rindex(")")].strip()
        return self.function_parameters(inner, bound=False)

    def function_parameters(self, expression: str, bound: bool) -> list[str] | None:
        """The C++ parameter types a Python call passes (``self`` aside) to ``expression``: a lambda, a member or
        static function pointer, or a ``py::overload_cast``. ``bound``: ``.def`` on a class, whose first argument of
        a lambda or static function is ``self``."""
        if expression.startswith("["):
            parameters_start = expression.index("(")
            types = parameter_types(expression[parameters_start + 1:closing(expression, parameters_start) - 1])
            return types[1:] if bound else types
        if expression.startswith("py::overload_cast<"):
            return template_args(expression.split("(", 1)[0])
        pointer = re.fullmatch(r"&(?:(\w+)::)?(\w+)", expression)
        if not pointer:
            problem(f"function not understood: {expression[:100]}")
            return None
        cls, name = pointer.groups()
        found = declaration(self.bodies, cls, name) if cls else self.free_function(name)
        if found is None:
            problem(f"no declaration of {expression[1:]} in the headers")
            return None
        static = found.static or cls is None
        return found.parameters[1:] if bound and static else found.parameters

    def free_function(self, name: str) -> Declaration | None:
        """The declaration of a namespace-level function (the headers' first, else pb_stub.cc's)."""
        for text in (self.header_text, self.source):
            match = re.search(rf"^[\w:<>\s&*]+\b{name}\s*\(", text, re.MULTILINE)
            if match:
                end = closing(text, match.end() - 1)
                return Declaration(parameter_types(text[match.end():end - 1]), True)
        return None


def exported_names(source: str) -> dict[str, str]:
    """``triton_python_backend_utils`` name -> ``c_python_backend_utils`` name, as ``Stub::StubSetup`` copies them."""
    source = " ".join(strip_comments(source).split())
    pattern = rf'py::setattr\(\s*python_backend_utils\s*,\s*"(\w+)"\s*,\s*{C_MODULE}\.attr\("(\w+)"\)\s*\)'
    return dict(re.findall(pattern, source))


def stub_functions(source: str) -> dict[str, dict]:
    """Functions the stub defines on ``triton_python_backend_utils`` itself (``get_model_dir``)."""
    text = strip_comments(source)
    functions = {}
    for match in re.finditer(r'python_backend_utils\.def\(\s*"(\w+)"\s*,\s*\[', text):
        parameters_start = text.index("(", match.end())
        types = parameter_types(text[parameters_start + 1:closing(text, parameters_start) - 1])
        functions[match.group(1)] = {"overloads": [{"parameters": [
            {"name": f"arg{i}", "type": clean_type(t), "positional_only": True} for i, t in enumerate(types)]}]}
    return functions


# ---------------------------------------------------------------------------------------------------------------
# the Python half


def python_half(path: Path) -> dict:
    tree = ast.parse(path.read_text())
    functions, classes, attributes = {}, {}, {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            functions[node.name] = {"overloads": [{"parameters": python_parameters(node.args)}]}
        elif isinstance(node, ast.ClassDef):
            members = {item.name: {"kind": "method", "overloads": [{"parameters": python_parameters(item.args)[1:]}]}
                       for item in node.body if isinstance(item, ast.FunctionDef)}
            classes[node.name] = {"members": members}
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            entry = {"type": type(value.value).__name__, "value": value.value} if isinstance(value, ast.Constant) \
                else {"type": type(value).__name__.lower()}  # ast.Dict -> "dict"
            attributes[node.targets[0].id] = entry
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                attributes[alias.asname or alias.name] = {"type": "module", "value": alias.name}
    return {"functions": functions, "classes": classes, "attributes": attributes}


def python_parameters(arguments: ast.arguments) -> list[dict]:
    positional = [*arguments.posonlyargs, *arguments.args]
    defaults = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
    parameters = []
    for argument, default in zip(positional, defaults, strict=True):
        parameter: dict[str, object] = {"name": argument.arg}
        if default is not None:
            parameter["default"] = ast.unparse(default)
        parameters.append(parameter)
    return parameters


# ---------------------------------------------------------------------------------------------------------------
# the table


def git_show(repository: Path, ref: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(repository), "show", f"{ref}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def git_commit(repository: Path, ref: str) -> str:
    return subprocess.run(["git", "-C", str(repository), "rev-parse", f"{ref}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()


def headers(repository: Path, ref: str) -> dict[str, str]:
    listing = subprocess.run(["git", "-C", str(repository), "ls-tree", "--name-only", ref, "src/"], check=True,
                             capture_output=True, text=True).stdout.split()
    return {path: git_show(repository, ref, path) for path in listing if path.endswith(".h")}


def parse_binding(python_backend: Path, ref: str, core: Path) -> tuple[Binding, str]:
    header_texts = headers(python_backend, ref)
    cpp_enums = enums_in(git_show(core, ref, "include/triton/core/tritonserver.h"))
    for text in header_texts.values():
        cpp_enums.update(enums_in(text))
    source = git_show(python_backend, ref, "src/pb_stub.cc")
    already = len(problems)
    binding = Parser(source, header_texts, cpp_enums).parse()
    problems[already:] = [f"{ref}: {text}" for text in problems[already:]]
    return binding, source


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def binding_names(binding: Binding) -> set[str]:
    names = set(binding.classes) | set(binding.functions) | set(binding.attributes) | set(binding.exceptions)
    for cls, entry in binding.classes.items():
        names |= {f"{cls}.{member}" for member in entry["members"]}
    return names


def in_binary(data: bytes, qualified: str) -> bool:
    return qualified.rsplit(".", 1)[-1].encode() + b"\0" in data


def build_table(python_backend: Path, core: Path, ref: str, newer: str | None, python_file: Path,
                stub: Path) -> dict:
    binding, source = parse_binding(python_backend, ref, core)
    exported = exported_names(source)
    python = python_half(python_file)
    classes = {name: binding.classes[c_name] for name, c_name in exported.items() if c_name in binding.classes}
    classes.update(python["classes"])
    functions = {**python["functions"], **stub_functions(source)}
    functions.update({name: binding.functions[c_name] for name, c_name in exported.items()
                      if c_name in binding.functions})
    attributes = {**python["attributes"]}
    attributes.update({name: binding.attributes[c_name] for name, c_name in exported.items()
                       if c_name in binding.attributes})
    unknown = set(exported.values()) - set(binding.classes) - set(binding.functions) - set(binding.attributes) - \
        set(binding.exceptions)
    for name in sorted(unknown):
        problem(f"StubSetup copies {C_MODULE}.{name}, which the module does not define")
    data = stub.read_bytes()
    stub_check = {"file": str(stub.relative_to(WHEEL_ROOT.parent.parent)), "sha256": sha256(stub),
                  "names_not_in_binary": sorted(n for n in binding_names(binding) if not in_binary(data, n))}
    if newer:
        newer_binding, _ = parse_binding(python_backend, newer, core)
        added = sorted(binding_names(newer_binding) - binding_names(binding))
        stub_check[f"names_{newer}_adds"] = {name: in_binary(data, name) for name in added}
    return {
        "package": "python_backend",
        "module": MODULE,
        "version": ref,
        "sources": {
            "c_python_backend_utils": {"repository": "triton-inference-server/python_backend", "ref": ref,
                                       "commit": git_commit(python_backend, ref), "file": "src/pb_stub.cc"},
            "TRITONSERVER_Error_Code": {"repository": "triton-inference-server/core", "ref": ref,
                                        "commit": git_commit(core, ref),
                                        "file": "include/triton/core/tritonserver.h"},
            "python_half": {"file": str(python_file.relative_to(WHEEL_ROOT.parent.parent)),
                            "sha256": sha256(python_file)},
            "stub_binary": stub_check,
        },
        "classes": classes,
        "unexported_classes": {name: entry for name, entry in binding.classes.items()
                               if name not in exported.values()},
        "other_classes": sorted(name for name, c_name in exported.items() if c_name in binding.exceptions),
        "enums": binding.enums,
        "functions": functions,
        "attributes": attributes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="r24.10", help="python_backend and core release branch (default: r24.10, "
                                                        "the branch of the wheel's tritonserver 2.51)")
    parser.add_argument("--newer", default="HEAD", help="a newer ref whose added names are looked for in the stub "
                                                        "binary ('' for none)")
    parser.add_argument("--python-backend", type=Path, default=PYTHON_BACKEND, help="git clone of python_backend")
    parser.add_argument("--core", type=Path, default=CORE, help="git clone of triton-inference-server/core")
    parser.add_argument("--python-file", type=Path, default=PYTHON_HALF, help="the installed Python half")
    parser.add_argument("--stub", type=Path, default=STUB, help="the installed Python-backend stub binary")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder the JSON table goes to")
    args = parser.parse_args()
    table = build_table(args.python_backend, args.core, args.ref, args.newer or None, args.python_file, args.stub)
    destination = args.out / f"python-backend-{args.ref}.json"
    destination.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {destination}")
    for line in problems:
        print(f"not parsed: {line}")
    missing = table["sources"]["stub_binary"]["names_not_in_binary"]
    print(f"names not found in the stub binary: {missing or 'none'}")


if __name__ == "__main__":
    main()
