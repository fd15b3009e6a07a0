"""Write tables of the real TensorRT and cuda-python Python APIs to tests/api_tables/, for tests that hold the fakes
(tests/trt_fakes.py) and the backend to the real API on machines without TensorRT or a GPU.

A development script, not run by CI. It needs network access to PyPI (``pip download``), a C compiler (``cc``) and
binutils (``nm``, ``readelf``). For each table it downloads the binding wheel into a temporary folder and unpacks it.
TensorRT's ``tensorrt.so`` links against libnvinfer, libnvonnxparser and libnvinfer_plugin, which are not on PyPI
as real files: the script compiles stub libraries of those names that define every entry point ``nm -D
--undefined-only`` lists (each returns NULL; importing the bindings never calls them). Each version is then imported
in a Python process of its own (``--dump``), which writes its table as JSON: enums, classes with their members and
pybind11 signatures, functions, attributes. Type names are written as ``tensorrt.X`` (the ``tensorrt`` package
re-exports ``tensorrt_bindings``), and object addresses in default values are dropped, so tables are reproducible.

    python tools/api_tables.py                       # every table
    python tools/api_tables.py tensorrt-11.4         # some of them
"""

from __future__ import annotations

import argparse
import ctypes
import enum
import hashlib
import inspect
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "api_tables"

TENSORRT_WHEELS = {
    "tensorrt-10.3": "tensorrt-cu12-bindings==10.3.0",  # JetPack 6
    "tensorrt-10.16": "tensorrt-cu12-bindings==10.16.1.11",  # the newest 10.x
    "tensorrt-11.4": "tensorrt-cu12-bindings==11.4.0.106",
}
CUDA_WHEELS = {
    "cuda-runtime-12.9": "cuda-bindings==12.9.10",
    "cuda-runtime-13": "cuda-bindings==13.5.0",
}

# The classes whose members a table lists in full; every other class is listed by name only.
TENSORRT_CLASSES = ("Builder", "IBuilderConfig", "INetworkDefinition", "OnnxParser", "Runtime", "ICudaEngine",
                    "IExecutionContext", "IOptimizationProfile", "ITimingCache", "Logger", "IHostMemory", "ILogger",
                    "ParserError", "Dims", "ITensor", "IRuntimeConfig", "ISerializationConfig")

ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
PYTHON_API = re.compile(r"^_?Py")


# ---------------------------------------------------------------------------------------------------------------
# Parent process: download, unpack, stub, run the dump, add provenance.

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tables", nargs="*", help=f"table names (default: all): {', '.join(all_wheels())}")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder the JSON tables go to")
    parser.add_argument("--dump", nargs=3, metavar=("KIND", "SITE", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dump:
        dump(*args.dump)
        return
    unknown = set(args.tables) - set(all_wheels())
    if unknown:
        parser.error(f"unknown tables {sorted(unknown)}; choose from {list(all_wheels())}")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="api-tables-") as work:
        for name, requirement in all_wheels().items():
            if not args.tables or name in args.tables:
                write_table(name, requirement, Path(work) / name, args.out / f"{name}.json")


def all_wheels() -> dict[str, str]:
    return {**TENSORRT_WHEELS, **CUDA_WHEELS}


def write_table(name: str, requirement: str, work: Path, destination: Path) -> None:
    kind = "tensorrt" if name in TENSORRT_WHEELS else "cuda"
    print(f"{name}: downloading {requirement}", flush=True)
    wheels = download(requirement, work / "wheels", with_dependencies=kind == "cuda")
    site = work / "site"
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    if kind == "tensorrt":
        build_stub_libraries(site / "tensorrt_bindings" / "tensorrt.so", work / "stub.c")
    print(f"{name}: importing the bindings", flush=True)
    raw = work / "table.json"
    subprocess.run([sys.executable, "-I", __file__, "--dump", kind, str(site), str(raw)], check=True)
    table = json.loads(raw.read_text())
    table["wheels"] = [{"file": wheel.name, "sha256": sha256(wheel)} for wheel in wheels]
    destination.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{name}: wrote {destination} ({destination.stat().st_size // 1024} KiB)", flush=True)


def download(requirement: str, folder: Path, with_dependencies: bool) -> list[Path]:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(folder)]
    subprocess.run(command + ([] if with_dependencies else ["--no-deps"]) + [requirement], check=True)
    return sorted(folder.glob("*.whl"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_stub_libraries(extension: Path, source: Path) -> None:
    """Compile, beside ``extension``, a stub of every library it needs that cannot be loaded here, each defining
    every entry point ``extension`` imports that nothing loaded already provides."""
    symbols = unresolved_entry_points(extension)
    source.write_text("".join(f"void *{symbol}(void) {{ return 0; }}\n" for symbol in symbols))
    print(f"  stub entry points: {', '.join(symbols)}", flush=True)
    for library in missing_libraries(extension):
        print(f"  stub library {library}", flush=True)
        subprocess.run(["cc", "-shared", "-fPIC", f"-Wl,-soname,{library}", "-o", str(extension.parent / library),
                        str(source)], check=True)


def unresolved_entry_points(extension: Path) -> list[str]:
    listing = subprocess.run(["nm", "-D", "--undefined-only", str(extension)], check=True, capture_output=True,
                             text=True).stdout
    this_process = ctypes.CDLL(None)
    symbols = [line.split()[1] for line in listing.splitlines() if line.split()[0] == "U"]
    return sorted(s for s in symbols if "@" not in s and not PYTHON_API.match(s) and not hasattr(this_process, s))


def missing_libraries(extension: Path) -> list[str]:
    dynamic = subprocess.run(["readelf", "-d", str(extension)], check=True, capture_output=True, text=True).stdout
    return [library for library in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
            if not loadable(library)]


def loadable(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Child process: import one version and describe it.

def dump(kind: str, site: str, destination: str) -> None:
    sys.path.insert(0, site)
    if kind == "tensorrt":
        import tensorrt_bindings

        table = describe_tensorrt(tensorrt_bindings)
    else:
        table = describe_cuda(import_cuda_runtime())
    Path(destination).write_text(json.dumps(table))


def import_cuda_runtime():
    try:
        from cuda.bindings import runtime
    except ImportError:  # cuda-python before 12.8
        from cuda import cudart as runtime
    return runtime


def clean(text: str) -> str:
    """``text`` without the bindings' module path and object addresses."""
    return ADDRESS.sub("", text.replace("tensorrt_bindings.tensorrt.", "tensorrt.").replace("tensorrt_bindings.",
                                                                                              "tensorrt."))


def is_enum(obj) -> bool:
    return isinstance(obj, type) and (issubclass(obj, enum.Enum) or isinstance(getattr(obj, "__members__", None),
                                                                               dict))


def enum_members(cls) -> dict[str, int]:
    return {name: int(member) for name, member in cls.__members__.items()}


def public_names(obj) -> list[str]:
    return sorted(name for name in dir(obj) if not name.startswith("_"))


# ------------------------------------------------------------------ TensorRT (pybind11)

def describe_tensorrt(trt) -> dict:
    table = {"package": "tensorrt", "version": trt.__version__, "enums": {}, "classes": {}, "other_classes": [],
             "functions": {}, "attributes": {"__version__": describe_value(trt.__version__)}}
    for name in public_names(trt):
        obj = getattr(trt, name)
        if inspect.ismodule(obj):
            continue
        if is_enum(obj):
            table["enums"][name] = enum_members(obj)
        elif isinstance(obj, type):
            table["enums"].update(nested_enums(obj, name))
            if name in TENSORRT_CLASSES:
                table["classes"][name] = describe_class(obj)
            else:
                table["other_classes"].append(name)
        elif inspect.isroutine(obj):
            table["functions"][name] = describe_callable(obj, name)
        else:
            table["attributes"][name] = describe_value(obj)
    return table


def nested_enums(cls, prefix: str) -> dict[str, dict[str, int]]:
    return {f"{prefix}.{name}": enum_members(getattr(cls, name)) for name in public_names(cls)
            if is_enum(inspect.getattr_static(cls, name))}


def describe_class(cls) -> dict:
    members = {name: describe_member(cls, name) for name in public_names(cls)}
    constructors = pybind11_signatures(cls.__init__, "__init__")
    if constructors:  # a class TensorRT only hands out has no constructor of its own
        members["__init__"] = {"kind": "method", **describe_overloads(constructors, method=True)}
    return {"bases": [clean(f"{base.__module__}.{base.__qualname__}") for base in cls.__bases__], "members": members}


def describe_member(cls, name: str) -> dict:
    attr = inspect.getattr_static(cls, name)
    if isinstance(attr, property):
        return describe_property(attr)
    if isinstance(attr, (staticmethod, classmethod)):
        return {"kind": "static method", **describe_callable(attr.__func__, name)}
    if is_enum(attr):
        return {"kind": "enum", "enum": attr.__qualname__}
    if isinstance(attr, type):
        return {"kind": "class", "class": attr.__qualname__}
    if callable(attr):
        return {"kind": "method", **describe_callable(attr, name, method=True)}
    return {"kind": "attribute", **describe_value(attr)}


def describe_property(prop: property) -> dict:
    described = {"kind": "property", "writable": prop.fset is not None}
    returned = re.match(r"^\(.*\) -> (.+)$", (prop.fget.__doc__ or "").strip()) if prop.fget else None
    if returned:
        described["type"] = clean(returned.group(1))
    return described


def describe_value(value) -> dict:
    if is_enum(type(value)):
        return {"type": clean(type(value).__qualname__), "value": int(value), "member": value.name}
    if isinstance(value, (bool, int, float, str)):
        return {"type": type(value).__name__, "value": value}
    return {"type": clean(type(value).__qualname__)}


def describe_callable(function, name: str, method: bool = False) -> dict:
    """Signatures (every pybind11 overload, or Python's own signature) and their parameters, without ``self``."""
    signatures = pybind11_signatures(function, name)
    if signatures:
        return describe_overloads(signatures, method)
    return python_signature(function, name, method)


def describe_overloads(signatures: list[str], method: bool) -> dict:
    return {"signatures": signatures, "overloads": [parse_signature(s, method) for s in signatures]}


def python_signature(function, name: str, method: bool = False) -> dict:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return {"signatures": [], "overloads": []}
    parameters = [describe_parameter(p) for p in signature.parameters.values()]
    return {"signatures": [clean(f"{name}{signature}")], "overloads": [{"parameters": parameters[int(method):]}]}


def pybind11_signatures(function, name: str) -> list[str]:
    lines = (getattr(function, "__doc__", None) or "").splitlines()
    overloads = [line.split(". ", 1)[1] for line in lines if re.match(rf"^\d+\. {re.escape(name)}\(", line)]
    if overloads:
        return [clean(line) for line in overloads]
    return [clean(lines[0])] if lines and lines[0].startswith(f"{name}(") else []


def parse_signature(signature: str, method: bool) -> dict:
    """``name(a: int, b: str = 'x') -> bool`` as {"parameters": [{name, type, default}], "returns": "bool"}."""
    inner, returns = split_parameters(signature)
    parameters = [parse_parameter(text) for text in split_top_level(inner)]
    if method and parameters and parameters[0]["name"] == "self":
        parameters = parameters[1:]
    parsed = {"parameters": parameters}
    if returns:
        parsed["returns"] = returns
    return parsed


def split_parameters(signature: str) -> tuple[str, str]:
    start, depth = signature.index("("), 0
    for position in range(start, len(signature)):
        depth += {"(": 1, ")": -1}.get(signature[position], 0)
        if depth == 0:
            returns = signature[position + 1:].strip()
            return signature[start + 1:position], returns.removeprefix("->").strip()
    raise ValueError(f"unbalanced parentheses in {signature!r}")


def split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for character in text:
        depth += {"(": 1, "[": 1, "{": 1, "<": 1, ")": -1, "]": -1, "}": -1, ">": -1}.get(character, 0)
        if character == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += character
    return [part for part in [*parts, current.strip()] if part]


def parse_parameter(text: str) -> dict:
    head, _, default = text.partition(" = ")
    name, _, annotation = head.partition(": ")
    parameter = {"name": name.strip()}
    if annotation:
        parameter["type"] = annotation.strip()
    if default:
        parameter["default"] = default.strip()
    return parameter


def describe_parameter(parameter: inspect.Parameter) -> dict:
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
    described = {"name": prefix + parameter.name}
    if parameter.default is not inspect.Parameter.empty:
        described["default"] = clean(repr(parameter.default))
    return described


# ------------------------------------------------------------------ cuda-python runtime (Cython)

def describe_cuda(runtime) -> dict:
    import cuda.bindings

    table = {"package": "cuda-bindings", "module": runtime.__name__, "version": cuda.bindings.__version__,
             "enums": {}, "classes": {}, "functions": {}, "attributes": {}}
    for name in public_names(runtime):
        obj = getattr(runtime, name)
        if inspect.ismodule(obj):
            continue
        if is_enum(obj):
            table["enums"][name] = enum_members(obj)
        elif isinstance(obj, type):
            table["classes"][name] = {"members": {member: describe_cython_member(obj, member)
                                                  for member in public_names(obj)}}
        elif inspect.isroutine(obj):
            table["functions"][name] = describe_cuda_function(obj, name)
        else:
            table["attributes"][name] = describe_value(obj)
    return table


def describe_cython_member(cls, name: str) -> dict:
    attr = inspect.getattr_static(cls, name)
    if inspect.isgetsetdescriptor(attr) or inspect.ismemberdescriptor(attr) or isinstance(attr, property):
        return {"kind": "property"}
    if callable(attr):
        return {"kind": "method"}
    return {"kind": "attribute", **describe_value(attr)}


def describe_cuda_function(function, name: str) -> dict:
    """Parameter names (Python's signature), the C-typed signature line and the "Returns" section of the docstring:
    cuda-python returns ``(cudaError_t, *values)``, one tuple item per entry there."""
    described = python_signature(function, name)
    doc = inspect.getdoc(function) or ""
    first_line = doc.splitlines()[0] if doc else ""
    if first_line.startswith(f"{name}("):
        described["c_signature"] = first_line
    returns = numpydoc_returns(doc)
    if returns:
        described["returns"] = returns
        described["return_count"] = len(returns)
    return described


def numpydoc_returns(doc: str) -> list[dict]:
    section = re.search(r"^( *)Returns\n\1-+\n(.*?)(?=^\1\S[^\n]*\n\1-+\n|\Z)", doc, re.S | re.M)
    if not section:
        return []
    indent, entries = len(section.group(1)), []
    for line in (line[indent:] for line in section.group(2).splitlines()):
        if line and not line[0].isspace():
            name, _, kind = line.partition(" : ")
            entries.append({"name": name.strip(), "type": kind.strip()} if kind else {"type": name.strip()})
            entries[-1]["text"] = ""
        elif entries and line.strip():
            entries[-1]["text"] = f"{entries[-1]['text']} {line.strip()}".strip()
    return entries


if __name__ == "__main__":
    main()
