"""Rewrite the generated part of docs/ENGINE_FORMAT.md from ume_edge.engine_dir's records (a development script).

    python tools/engine_format_doc.py
"""

from pathlib import Path

from ume_edge.engine_dir import format_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "ENGINE_FORMAT.md"
BEGIN = ("<!-- generated from ume_edge/engine_dir/schema.py by tools/engine_format_doc.py: edit the records, "
         "not this -->")
END = "<!-- end of generated part -->"


def generated_doc(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n\n{format_reference()}\n{END}{tail}"


if __name__ == "__main__":
    DOC.write_text(generated_doc(DOC.read_text()))
    print(f"wrote {DOC}")
