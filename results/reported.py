"""Numbers the papers published (``results/reported.csv``), read and validated.

One row per number: ``method, variant, epochs, task, protocol, metric, value, source, note``. Only numbers checked
against a named source go in; a row without a ``source`` is rejected, so a guess cannot slip into a table. ``task``
and ``metric`` use the names of the run records (``linear``/``top1``, ``semisup_1pct``/``top5``,
``voc_det``/``bbox/AP50``, ``voc07_svm``/``cls/mAP``, ``voc_seg``/``sem_seg/mIoU``, ...), so reported and reproduced
numbers meet in one table. ``variant`` (optional, may be empty) tells two published rows of one method apart and is
printed beside the method (``MoCo v1 (CO2's impl.)`` and ``MoCo v1 (reported by MoCo)`` in CO2's VOC table).

    python -m results.reported            # validate results/reported.csv and print it
    python -m results.reported my.csv     # validate another file
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from ctbench.errors import UserError, cli_main

REPORTED_CSV = Path(__file__).resolve().parent / "reported.csv"
COLUMNS = ("method", "variant", "epochs", "task", "protocol", "metric", "value", "source", "note")
OPTIONAL = ("variant", "note")  # may be left out of a file: read as empty
REQUIRED = ("method", "task", "metric", "value", "source")
KEY = ("method", "variant", "epochs", "task", "metric")


def validate_reported(df: pd.DataFrame, origin: str = "reported numbers") -> pd.DataFrame:
    """Check the reported-number table; return it with typed columns. Raises :class:`UserError` naming the row.

    Rules: the columns above (``variant`` and ``note`` optional); ``method``, ``task``, ``metric``, ``source``
    non-empty; ``value`` a finite number; ``epochs`` empty or a positive integer; no two rows for the same (method,
    variant, epochs, task, metric).
    """
    missing = [c for c in COLUMNS if c not in df.columns and c not in OPTIONAL]
    if missing:
        raise UserError(f"{origin}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown:
        raise UserError(f"{origin}: unknown column(s) {', '.join(map(str, unknown))}; expected {', '.join(COLUMNS)}")
    df = df.copy()
    for c in OPTIONAL:
        if c not in df.columns:
            df[c] = ""
    rows = []
    for i, row in enumerate(df.to_dict("records")):
        where = f"{origin}, row {i + 2}"  # +2: header line, 1-based
        clean = {c: _text(row.get(c)) for c in ("method", "variant", "task", "protocol", "metric", "source", "note")}
        for c in REQUIRED:
            if c != "value" and not clean[c]:
                raise UserError(f"{where}: empty '{c}' ({clean['method'] or '?'} {clean['task']} {clean['metric']}); "
                                "every reported number needs a method, task, metric and a named source")
        value = _number(row.get("value"))
        if value is None:
            raise UserError(f"{where}: value {row.get('value')!r} is not a finite number")
        epochs = row.get("epochs")
        if _text(epochs):
            e = _number(epochs)
            if e is None or e <= 0 or e != int(e):
                raise UserError(f"{where}: epochs {epochs!r} must be empty or a positive integer")
            epochs = int(e)
        else:
            epochs = None
        rows.append({**clean, "epochs": epochs, "value": value})
    out = pd.DataFrame(rows, columns=list(COLUMNS))
    out["epochs"] = out["epochs"].astype("Int64")
    dup = out.duplicated(subset=list(KEY), keep=False)
    if dup.any():
        r = out[dup].iloc[0]
        variant = f" ({r['variant']})" if r["variant"] else ""
        raise UserError(f"{origin}: two rows for {r['method']}{variant} {r['epochs']} ep {r['task']} {r['metric']}; "
                        "keep one (the primary source), or tell them apart by 'variant'")
    return out


def load_reported(path: str | Path = REPORTED_CSV) -> pd.DataFrame:
    """Read and validate a reported-numbers CSV."""
    p = Path(path)
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"no reported-numbers file at {p}") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not a readable CSV ({str(e).splitlines()[0]})") from e
    return validate_reported(df, origin=str(p))


def _text(x: object) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return str(x).strip()


def _number(x: object) -> float | None:
    try:
        v = float(_text(x))
    except ValueError:
        return None
    return v if math.isfinite(v) else None


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m results.reported", description="Validate a reported-numbers CSV.")
    p.add_argument("csv", nargs="?", type=Path, default=REPORTED_CSV, help="default: results/reported.csv")
    args = p.parse_args(argv)
    df = load_reported(args.csv)
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
        print(df.drop(columns=["protocol", "note"]).to_string(index=False))
    print(f"{len(df)} reported numbers, each with a source: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
