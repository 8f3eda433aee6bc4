"""The result tables of eval, bench and demo: one renderer, one definition per column.

A column reads one figure of a system's metrics (evaluate.evaluate's report
rows) and formats it; a table is a list of column names. A new metric is
computed once in evaluate.py and shown by adding its column here and its name
to the tables that want it.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence


def pct(v, suffix: str = "%") -> str:
    return "-" if v is None else f"{100 * v:.1f}{suffix}"


def interval(v) -> str:
    """A 95% interval [lo, hi] of a share as "9.1-22.9%" ("-" for none: no prompts, or an older report)."""
    return "-" if not v else f"{100 * v[0]:.1f}-{100 * v[1]:.1f}%"


def num(v, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def size(n) -> str:
    """Bytes as B / KB / MB / GB (1024-based)."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[str, dict], str]  # (system name, metrics) -> text


def _cost(m: dict) -> dict:
    return m.get("cost") or {}


COLUMNS: Dict[str, Column] = {
    "system": Column("system", lambda n, m: n),
    "method": Column("method", lambda n, m: m.get("method_label", m.get("method", n))),
    "objective": Column("objective", lambda n, m: m.get("objective_label") or "-"),
    "unsafe": Column("unsafe compl.", lambda n, m: pct(m.get("unsafe_compliance"))),
    "unsafe_ci": Column("(95% interval)", lambda n, m: interval(m.get("unsafe_compliance_ci95"))),
    "unsafe_guard": Column("(guard judge)", lambda n, m: pct(m.get("unsafe_compliance_guard"))),
    "unsafe_both": Column("unsafe compliance % (refusal match / guard)",
                          lambda n, m: f"{pct(m.get('unsafe_compliance'), '')} / {pct(m.get('unsafe_compliance_guard'), '')}"),
    "over_refusal": Column("over-refusal", lambda n, m: pct(m.get("over_refusal"))),
    "borderline": Column("borderline", lambda n, m: pct(m.get("over_refusal_borderline"))),
    "over_refusal_both": Column("over-refusal % (benign / borderline)",
                                lambda n, m: f"{pct(m.get('over_refusal'), '')} / {pct(m.get('over_refusal_borderline'), '')}"),
    "agreement": Column("agree w/ dual", lambda n, m: pct(m.get("agreement_with_dual"))),
    "agreement_long": Column("agreement with dual %", lambda n, m: pct(m.get("agreement_with_dual"), "")),
    "kl": Column("KL (nats/tok)", lambda n, m: num(m.get("utility_kl"), "{:.3g}")),
    "kl_long": Column("utility: KL (nats/token)", lambda n, m: num(m.get("utility_kl"))),
    "ppl": Column("ppl", lambda n, m: num(m.get("perplexity"), "{:.3g}")),
    "perplexity": Column("perplexity", lambda n, m: num(m.get("perplexity"), "{:.2f}")),
    "added_params": Column("added params", lambda n, m: f"{_cost(m).get('added_params', 0):,}"),
    "added_bytes": Column("added bytes", lambda n, m: size(_cost(m).get("added_bytes"))),
    "ttft_base": Column("TTFT x base", lambda n, m: num(_cost(m).get("ttft_ratio_base"), "{:.3g}")),
    "ttft_base2": Column("TTFT x base", lambda n, m: num(_cost(m).get("ttft_ratio_base"), "{:.2f}")),
    "ttft_dual": Column("TTFT x dual", lambda n, m: num(_cost(m).get("ttft_ratio_dual"), "{:.2f}")),
    "ttft_ms": Column("time to first token",
                      lambda n, m: "-" if _cost(m).get("ttft_s") is None else f"{1000 * _cost(m)['ttft_s']:.1f} ms"),
    "counts": Column("n harmful/benign/borderline",
                     lambda n, m: f"{m.get('n_harmful', 0)}/{m.get('n_benign', 0)}/{m.get('n_borderline', 0)}"),
}

EVAL = ["system", "unsafe", "unsafe_ci", "unsafe_guard", "over_refusal", "borderline", "agreement", "kl", "ppl", "ttft_base",
        "counts"]
BENCH = ["method", "objective", "unsafe_both", "over_refusal_both", "agreement_long", "kl_long", "perplexity",
         "added_params", "added_bytes", "ttft_base2", "ttft_dual"]


def render(systems: Dict[str, dict], columns: Sequence, order: Sequence[str] = ()) -> str:
    """A Markdown table: one row per system (those in `order` first), one column per name
    (or a Column, for a table whose cells combine figures, as the demo's suites side by side)."""
    names: List[str] = [n for n in order if n in systems] + [n for n in systems if n not in order]
    cols = [COLUMNS[c] if isinstance(c, str) else c for c in columns]
    lines = ["| " + " | ".join(c.header for c in cols) + " |", "|" + " --- |" * len(cols)]
    for name in names:
        lines.append("| " + " | ".join(c.cell(name, systems[name]) for c in cols) + " |")
    return "\n".join(lines)
