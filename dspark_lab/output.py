"""What every command returns: a :class:`Report`, plain data that renders as JSON, a text table or HTML.

The CLI prints ``to_json()`` or ``to_text()``; a notebook shows ``_repr_html_()``; a terminal IPython shows the
text. One object, three renderings, so the CLI and the ``%dspark`` magics always say the same thing.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

# Bumped when a field of any --json output or record changes meaning or is removed (adding one does not bump it).
SCHEMA_VERSION = 1


@dataclass
class Report:
    """A command's answer.

    ``data`` is the JSON document (``schema_version`` and ``kind`` are added). ``rows``/``columns`` make the table
    shown as text or HTML; ``lines`` are extra text lines printed after the table (a footer, a hint).
    """

    kind: str
    data: dict[str, Any]
    rows: Sequence[dict[str, Any]] = ()
    columns: Sequence[str] = ()
    title: str = ""
    lines: Sequence[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": self.kind, **self.data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_jsonable)

    def to_text(self) -> str:
        parts = [self.title] if self.title else []
        if self.columns:
            parts.append(text_table(self.rows, self.columns))
        parts.extend(self.lines)
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        parts = [f"<b>{html.escape(self.title)}</b>"] if self.title else []
        if self.columns:
            parts.append(html_table(self.rows, self.columns))
        parts.extend(f"<div>{html.escape(line)}</div>" for line in self.lines)
        return "\n".join(parts)

    def __repr__(self) -> str:
        return self.to_text()


def cell(value: Any) -> str:
    """A table cell: numbers compact, None as '-', lists joined."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    return str(value)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell(row.get(c)))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f'<table class="dspark-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _jsonable(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
