"""Text forms of a built table (``results.model.Table``): Markdown, CSV, LaTeX, and its cell -> origin rows.

Every row ends with ``refs``: numbers ``[1]`` point at the records a reproduced row came from, letters ``[a]`` at
the publication of a reported row; the footnotes under the table resolve them (record path relative to the
records root, and its id). Numbers are printed with the column's digits; a cell with several trials reads
``mean ± std`` (sample std) and the ``n`` column says how many trials.
"""

from __future__ import annotations

import csv
import io
import string

from results.model import Cell, Row, Table


def _letters(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = string.ascii_lowercase[r] + s
    return s


def resolve_refs(t: Table) -> tuple[list[str], list[str]]:
    """Per row its refs text (``[1,2]`` / ``[a]``) and the footnote lines of the table, numbered in row order."""
    record_no: dict[tuple[str, str], int] = {}
    source_no: dict[str, str] = {}
    refs, notes = [], []
    for row in t.rows:
        tags = []
        for c in row.cells:
            if c.source:
                if c.source not in source_no:
                    source_no[c.source] = _letters(len(source_no))
                    notes.append(f"[{source_no[c.source]}] {c.source}")
                tags.append(source_no[c.source])
            for rid, path in zip(c.record_ids, c.records):
                if (rid, path) not in record_no:
                    record_no[(rid, path)] = len(record_no) + 1
                    notes.append(f"[{record_no[(rid, path)]}] {path} (id {rid})")
                tags.append(str(record_no[(rid, path)]))
        tags = sorted(set(tags), key=lambda x: (x.isdigit(), int(x) if x.isdigit() else 0, x))
        refs.append("[" + ",".join(tags) + "]" if tags else "")
    letters = [n for n in notes if not n[1].isdigit()]
    numbers = [n for n in notes if n[1].isdigit()]
    return refs, letters + numbers


def fmt_cell(c: Cell, digits: int) -> str:
    if c.mean is None:
        return "–"
    text = f"{c.mean:.{digits}f}"
    if c.std is not None:
        text += f" ± {c.std:.{digits}f}"
    return text


def fmt_n(row: Row) -> str:
    if row.reported:
        return ""
    ns = sorted({c.n for c in row.cells if c.n})
    return "/".join(str(n) for n in ns)


def field_text(row: Row, name: str) -> str:
    """An identity column's text; ``data`` other than ``real`` carries the † of the toy legend."""
    value = row.fields.get(name, "")
    return value + " †" if name == "data" and value and value != "real" else value


def _header(t: Table) -> list[str]:
    return [*t.fields, "n", *(c.label for c in t.columns), *t.trailing, "refs"]


def _values(t: Table, row: Row, ref: str) -> list[str]:
    return [field_text(row, f) for f in t.fields] + [fmt_n(row)] \
        + [fmt_cell(c, col.digits) for c, col in zip(row.cells, t.columns)] \
        + [row.fields.get(f, "") for f in t.trailing] + [ref]


def _md_escape(s: str) -> str:
    return s.replace("|", r"\|")


def render_markdown(t: Table, level: int = 3, footnotes: bool = True) -> str:
    """The table as GitHub Markdown, with its notes and (unless ``footnotes=False``) its refs resolved."""
    refs, notes = resolve_refs(t)
    header = _header(t)
    numbers = range(len(t.fields), len(t.fields) + 1 + len(t.columns))  # n and the number columns: right-aligned
    lines = [f"{'#' * level} {t.title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in numbers else "---" for i in range(len(header))) + "|"]
    if not t.rows:
        lines = lines[:2] + ["(no numbers yet)"]
    for row, ref in zip(t.rows, refs):
        lines.append("| " + " | ".join(_md_escape(v) for v in _values(t, row, ref)) + " |")
    lines.append("")
    lines += [f"{n}" + "  " for n in t.notes]
    if footnotes and notes:
        lines += ([""] if t.notes else []) + [n + "  " for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def render_csv(t: Table) -> str:
    """One line per row: identity columns (the protocol columns in full), then per number column its mean, std and
    n, then record ids / source."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*t.fields, *t.trailing, *(x for c in t.columns for x in (c.label, f"{c.label} std", f"{c.label} n")),
                "record_ids", "source"])
    for row in t.rows:
        nums = []
        for c, col in zip(row.cells, t.columns):
            nums += [_num(c.mean, col.digits + 3), _num(c.std, col.digits + 3), str(c.n) if c.n else ""]
        ids = sorted({i for c in row.cells for i in c.record_ids})
        sources = sorted({c.source for c in row.cells if c.source})
        w.writerow([row.fields.get(f, "") for f in t.fields] + [row.full.get(f, row.fields.get(f, ""))
                                                                 for f in t.trailing]
                   + nums + [" ".join(ids), " / ".join(sources)])
    return buf.getvalue()


def _num(x: float | None, digits: int) -> str:
    return "" if x is None else f"{round(x, digits):.{digits}f}".rstrip("0").rstrip(".")


_TEX = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "†": r"$^\dagger$", "±": r"$\pm$",
        "–": "--", "`": "", "→": r"$\to$", "<": r"\textless{}", ">": r"\textgreater{}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in s.replace("->", "→"))


def _latex_groups(t: Table) -> list[str]:
    """The header line of the column groups (``Column.group``: CO2's classification | detection | segmentation)
    with a rule under each group; nothing when no column has a group."""
    if not any(c.group for c in t.columns):
        return []
    first = len(t.fields) + 2  # 1-based position of the first number column (after the fields and n)
    spans: list[tuple[str, int, int]] = []  # (group, first column, last column)
    for i, c in enumerate(t.columns):
        if spans and spans[-1][0] == c.group:
            spans[-1] = (c.group, spans[-1][1], first + i)
        else:
            spans.append((c.group, first + i, first + i))
    cells = [""] * (first - 1)
    for group, a, b in spans:
        cells += [rf"\multicolumn{{{b - a + 1}}}{{c}}{{{tex_escape(group)}}}"] if group else [""] * (b - a + 1)
    cells += [""] * (len(t.trailing) + 1)
    rules = " ".join(rf"\cmidrule(lr){{{a}-{b}}}" for group, a, b in spans if group)
    return [" & ".join(cells) + r" \\", rules]


def render_latex(t: Table) -> str:
    """A booktabs ``table`` environment; notes and footnotes below it in small print."""
    refs, notes = resolve_refs(t)
    header = [tex_escape(f) for f in t.fields] + ["$n$"] + [c.latex for c in t.columns] \
        + [tex_escape(f) for f in t.trailing] + ["refs"]
    align = "l" * len(t.fields) + "r" + "r" * len(t.columns) + "l" * len(t.trailing) + "l"
    lines = ["% generated by python -m results.tables from run records; do not edit", r"\begin{table}[t]",
             r"\centering", rf"\caption{{{tex_escape(t.title)}}}", rf"\label{{tab:{t.key}}}",
             r"\small", rf"\begin{{tabular}}{{{align}}}", r"\toprule", *_latex_groups(t),
             " & ".join(header) + r" \\", r"\midrule"]
    previous = None
    for row, ref in zip(t.rows, refs):
        if previous is not None and previous != row.method:
            lines.append(r"\addlinespace")
        previous = row.method
        lines.append(" & ".join(tex_escape(v) for v in _values(t, row, ref)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    extra = t.notes + notes
    if extra:
        lines.append(r"\par\vspace{2pt}\footnotesize")
        lines += [tex_escape(n) + r"\\" for n in extra]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def sources_rows(t: Table) -> list[dict]:
    """Every non-empty cell of ``t`` -> where it came from (records or publication)."""
    out = []
    for row in t.rows:
        label = " | ".join(row.fields.get(f, "") for f in (*t.fields, *t.trailing))
        for c, col in zip(row.cells, t.columns):
            if c.mean is None:
                continue
            out.append({"table": t.key, "row": label, "column": col.label, "value": _num(c.mean, col.digits + 3),
                        "std": _num(c.std, col.digits + 3), "n": c.n or "",
                        "origin": "reported" if row.reported else "record", "record_ids": " ".join(c.record_ids),
                        "records": " ".join(c.records), "source": c.source})
    return out
