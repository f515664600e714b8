"""The report's HTML: tables (the alarms table sorts and filters in the page itself, no libraries),
cell formatting and the page around the parts."""
from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

from hpcad.errors import ConfigError
from hpcad.threshold.evaluate import top_metrics_of

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig
    from hpcad.threshold.rules import Thresholds


SORTABLE = """<script>
function hpcadTable(id){const t=document.getElementById(id),f=document.getElementById(id+'-filter');
const rows=()=>[...t.tBodies[0].rows];
t.tHead.querySelectorAll('th').forEach((th,i)=>th.onclick=()=>{const asc=th.dataset.dir!=='asc';
t.tHead.querySelectorAll('th').forEach(h=>delete h.dataset.dir);th.dataset.dir=asc?'asc':'desc';
const key=r=>{const v=r.cells[i].dataset.v??r.cells[i].textContent;const n=parseFloat(v);return isNaN(n)||!/^[-+0-9.eE]+$/.test(v)?v:n};
rows().sort((a,b)=>{const x=key(a),y=key(b);const c=(typeof x===typeof y)?(x<y?-1:x>y?1:0):(typeof x==='number'?-1:1);return asc?c:-c})
.forEach(r=>t.tBodies[0].appendChild(r));});
f.oninput=()=>{const q=f.value.toLowerCase();let n=0;rows().forEach(r=>{const s=r.textContent.toLowerCase().includes(q);
r.style.display=s?'':'none';n+=s});document.getElementById(id+'-count').textContent=n;};}
</script>"""


def sortable_table(table_id: str, header: list[str], rows: list[list[tuple[str, str, str | None]]], noun: str,
                   placeholder: str) -> str:
    """A table sorted by clicking a header and filtered by a text box (no libraries: the page stays one
    offline file). Each cell is ``(text, sort value, link or None)``."""
    head = "".join(f"<th title='click to sort'>{html.escape(c)}</th>" for c in header)
    body = []
    for row in rows:
        cells = []
        for text, key, href in row:
            inner = html.escape(text) if not href else f"<a href='{html.escape(href)}'>{html.escape(text)}</a>"
            cells.append(f"<td data-v='{html.escape(key)}'>{inner}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<p>filter: <input id='{table_id}-filter' placeholder='{html.escape(placeholder)}'> "
            f"<span id='{table_id}-count'>{len(rows)}</span> of {len(rows)} {noun} shown; click a header to "
            f"sort.</p><table id='{table_id}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<script>hpcadTable('{table_id}')</script>")


ALARM_COLUMNS = ("node", "start", "end", "rows", "split", "peak_score", "label_classes", "top_metrics", "jobs", "users")


def alarms_table(alarms: list[dict], link, table_id: str = "alarms", zone: str = "UTC") -> str:
    """All alarms as a :func:`sortable_table`, their times in ``zone``; the node cell links to
    ``link(node)`` when that gives a URL. The label classes, jobs and users columns are there where an
    alarm has one, the split where the alarms lie in more than one (a night's are all one, unlabelled
    and often without job context: four empty or repeated columns squeezed the top metrics)."""
    def shown(c: str) -> bool:
        values = {str(a.get(c) or "") for a in alarms} - {""}
        return len(values) > 1 if c == "split" else bool(values)

    cols = [c for c in ALARM_COLUMNS if c not in ("split", "label_classes", "jobs", "users") or shown(c)]
    rows = []
    for a in alarms:
        row = []
        for c in cols:
            v = a.get(c, "")
            if c in ("start", "end"):
                v = in_zone(str(v or ""), zone)
            text = fmt(number(v)) if c in ("rows", "peak_score") else str(v or "")
            if c == "top_metrics":  # names and "times normal" (the errors are in alarms.csv / alarms.json)
                text = v = top_names(top_metrics_of(a))
            row.append((text, str(v or ""), link(v) if c == "node" else None))
        rows.append(row)
    return sortable_table(table_id, cols, rows, "alarms", "node, time, metric, job...")


def fallback_how(fallback: dict) -> str:
    """What a fallback's threshold is: ``5 times each node's normal level``, ``q=0.995 of the signal``."""
    if "times" in fallback:
        return f"{fallback['times']:g} times each node's normal level"
    return f"q={fallback['q']:g} of the signal"


def rule_named(th: Thresholds) -> tuple[str, str]:
    """The threshold rule as the pages name it, and what to say of it: the fallback's where it set
    every node's threshold (no node had labels), else the rule's name and scope."""
    fb = th.details.get("fallback")
    unlabelled = th.details.get("unlabelled_nodes") or 0
    if fb and ((th.scope == "node" and unlabelled == len(th.nodes) > 0) or th.scope == "cluster"):
        return fb["rule"], f"{fallback_how(fb)}; no node has labels: the cost rule's threshold.fallback"
    pooled = "second_half_cost" in (th.details.get("scope_choice") or {})  # auto compared the two scopes
    chosen = ", chosen on the validation rows (threshold.scope=auto)" if pooled else ""
    return th.rule, f"{th.scope} scope{chosen}"


def in_zone(iso: str, zone: str) -> str:
    """An ISO time with its offset (alarms.csv's, UTC) as ``zone``'s wall clock with that zone's
    offset; anything else (a row number) as it is."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    if zone == "UTC":  # alarms.csv's own zone: every cell as it is
        return iso
    try:
        t = dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return t.astimezone(ZoneInfo(zone)).isoformat() if t.tzinfo is not None else iso


def report_zone(cfg: HpcadConfig, site: str | None = None) -> str:
    """The zone a report shows its times in: ``report.timezone``, else ``site`` (the nightly job's
    ``nightly.timezone``), else ``data.timezone`` (where the exports' naive times came from)."""
    from hpcad.data.timestamps import zone as checked_zone

    name = str(cfg.report.timezone or site or cfg.data.timezone)
    checked_zone(name, "report.timezone" if cfg.report.timezone else "nightly.timezone" if site else "data.timezone")
    return name


def check_report_options(rc) -> None:
    """``report.*`` counts and shares, checked (a negative count or a share above 1 had been taken)."""
    from hpcad.config import check_at_least

    if not int(rc.top_k) >= 1:
        raise ConfigError(f"report.top_k={rc.top_k}: must be >= 1 (the metrics each alarm names)")
    check_at_least("report", rc, {"max_nodes_plotted": 0, "max_nodes_overview": 0, "max_node_pages": 0})
    if not 0 <= float(rc.max_missing_share) <= 1:
        raise ConfigError(f"report.max_missing_share={rc.max_missing_share}: a share in [0, 1]")


def multiple(x: float) -> str:
    """``41x``, ``6.2x``, ``1,234x``; from a million on in powers of ten (``5.9e9x``): a value far
    outside its training range times a large range-excess weight (MSL's channels: 10^4) filled a table
    cell with ``5,920,000,000x``."""
    if x >= 1e6:
        mantissa, exponent = f"{x:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}x"
    return f"{x:,.0f}x" if x >= 10 else f"{x:.2g}x"


def top_names(top: list[dict], k: int | None = None) -> str:
    """``ips_p0_3 (41x), util_p0_3 (12x)``: an alarm's top metrics with how many times their normal
    error they carry (names alone where that is unknown; :func:`multiple`)."""
    return ", ".join(f"{m['metric']} ({multiple(m['x_normal'])})" if "x_normal" in m else m["metric"] for m in top[:k])


def number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def html_table(rows: list[list], header: list[str]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def fmt(v) -> str:
    """A table cell: floats to 3 significant digits, but 1,000 and more in full (a cost of 1,380 rows,
    not 1.38e+03)."""
    if isinstance(v, float):
        return f"{v:,.0f}" if math.isfinite(v) and abs(v) >= 1000 else f"{v:.3g}"
    return "" if v is None else str(v)


STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:12px}"
         "td,th{border:1px solid #ccc;padding:2px 6px}th{cursor:pointer;background:#f4f4f4}"
         "th[data-dir=asc]::after{content:' \\25B2'}th[data-dir=desc]::after{content:' \\25BC'}"
         "img{display:block;margin:6px 0}.warning{background:#fff3cd;border:1px solid #e0b000;padding:6px}")


def page(title: str, parts: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style>{SORTABLE}</head><body>{''.join(parts)}</body></html>\n")


def gap_text(gap: dict, max_share: float) -> str:
    """What a node's telemetry gap is, in words: the rows it did not send, its share of values
    missing, the metrics lost."""
    said = []
    if rows_short(gap, max_share):
        said.append(f"sent {gap['rows']} of its {gap['rows_expected']} rows")
    if gap.get("missing_share", 0.0) > max_share:
        said.append(f"{gap['missing_share']:.0%} of its values missing")
    lost = gap.get("metrics_lost", [])
    if lost:
        said.append(f"{len(lost)} metric(s) reported in training sent no value: {', '.join(lost[:8])}"
                    + (", ..." if len(lost) > 8 else ""))
    return "; ".join(said)


def rows_missing_share(gap: dict) -> float:
    """The share of the rows a node should have sent (``rows_expected``: the nightly job's, from the
    night's length and the node's sampling step) that it did not; 0 where unknown."""
    expected = gap.get("rows_expected")
    return max(0.0, 1.0 - int(gap["rows"]) / int(expected)) if expected else 0.0


def rows_short(gap: dict, max_share: float) -> bool:
    """Whether the node sent fewer than ``1 - max_share`` of the rows it should have."""
    return rows_missing_share(gap) > max_share


def telemetry_gaps(levels: list[dict], max_share: float) -> list[dict]:
    """The scored nodes (``levels``: node, rows, missing_share, metrics_lost, the nightly's
    rows_expected) with more than ``max_share`` of their values or of their rows missing (a collector
    that stopped part-way), or with a metric they reported in training that sent no value (a collector
    that lost it), most missing first: a node cannot alarm on what is not there (its model sees no
    error where it sees no value), so the operator is told (the night's report and log, a run's
    report)."""
    return sorted((lv for lv in levels if lv.get("missing_share", 0.0) > max_share or lv.get("metrics_lost")
                   or rows_short(lv, max_share)),
                  key=lambda lv: (-max(lv.get("missing_share", 0.0), rows_missing_share(lv)),
                                  -len(lv.get("metrics_lost", [])), lv["node"]))
