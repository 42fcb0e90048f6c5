"""Run reports: one table of every finished stage of one or more runs, and a size/perplexity Pareto plot.

    compress report artifacts/smollm2-demo artifacts/smollm2-int8 --format md

reads `<run>/NN-name/manifest.json` (manifest.py's schema; a folder without one is an unfinished stage and
is skipped), and gives per stage: format, parameters, disk size, bits per weight, measured (and predicted)
peak memory, perplexity per eval set with its change against that run's 00-base, encoder agreement with the
base (Spearman) per eval set, KL divergence to the base and top-1 agreement with it (causal LMs) per eval set,
eval and decode tokens/s, stage seconds. Perplexities are compared only when
their eval protocols (dataset fingerprint, split, seq_len, tokens...) are equal, as the manifest records
them (evaluate.same_protocol: the model's dtype and device may differ); otherwise the change is left blank.
`pareto_plot` draws disk size (or weights memory) against the first eval set's perplexity (or KL to the base),
one point per stage, a marker per run, and the frontier of stages no other stage beats on both axes.

Not supported: lm-eval task scores (listed in JSON only), comparing runs evaluated under different
protocols (their points are left out of the plot, and say so).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from compress.errors import CompressError
from compress.evaluate import same_protocol
from compress.memory import fmt_bytes

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CompressError(f"{path} is not valid JSON ({e}); delete that stage folder to redo the stage") from None


def _run_manifests(run_dir: Path) -> list[dict]:
    if not run_dir.is_dir():
        raise CompressError(f"run folder not found: {run_dir}")
    found = []
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        mf = folder / "manifest.json"
        if not mf.is_file():
            continue  # unfinished (or not a stage folder): the manifest is written last
        m = _load(mf)
        if m.get("complete") is False:
            continue
        found.append(m | {"folder": m.get("folder") or folder.name})
    return sorted(found, key=lambda m: (m.get("index", 0), m["folder"]))


def collect(run_dirs) -> list[dict]:
    """One flat, JSON-able dict per finished stage of every run, in run then stage order."""
    rows = []
    for run_dir in map(Path, run_dirs):
        manifests = _run_manifests(run_dir)
        if not manifests:
            raise CompressError(f"no finished stage (NN-name/manifest.json) in {run_dir}; run `compress run` first")
        base = next((m for m in manifests if m.get("stage") == "base" or m.get("index") == 0), None)
        base_ppl = _perplexities(base) if base else {}
        for m in manifests:
            ppl = _perplexities(m)
            change = {}
            for spec, (value, protocol) in ppl.items():
                if spec in base_ppl and same_protocol(base_ppl[spec][1], protocol) and base_ppl[spec][0]:
                    change[spec] = 100.0 * (value - base_ppl[spec][0]) / base_ppl[spec][0]
            size, mem, speed = m.get("size") or {}, m.get("memory") or {}, m.get("speed") or {}
            rows.append({
                "run": run_dir.resolve().name,
                "index": m.get("index"),
                "stage": m.get("stage"),
                "name": m.get("name"),
                "folder": m["folder"],
                "format": m.get("format"),
                "params": size.get("params"),
                "disk_bytes": size.get("disk_bytes"),
                "bits_per_weight": size.get("bits_per_weight"),
                "weights_bytes": mem.get("weights_bytes"),
                "measured_peak_bytes": mem.get("measured_peak_bytes"),
                "predicted_peak_bytes": mem.get("predicted_peak_bytes"),
                "memory_method": mem.get("method"),
                "memory_device": mem.get("device"),
                "eval_peak_bytes": mem.get("eval_measured_peak_bytes"),
                "perplexity": {spec: v for spec, (v, _) in ppl.items()},
                "perplexity_protocol": {spec: p for spec, (_, p) in ppl.items()},
                "perplexity_change_pct": change,
                "agreement": _agreements(m),
                "kl": _per_source(m, "kl"),
                "top1": _per_source(m, "top1"),
                "eval_tokens_per_s": speed.get("eval_tokens_per_s"),
                "eval_speed_vs_base": _ratio(speed, base, "eval_tokens_per_s"),
                "decode_tokens_per_s": speed.get("decode_tokens_per_s"),
                "seconds": m.get("seconds"),
            })
    return rows


def _ratio(speed: dict, base: dict | None, key: str) -> float | None:
    """speed[key] / the run's base model's, when both were measured on the same device."""
    if not base:
        return None
    ref = (base.get("speed") or {})
    if not speed.get(key) or not ref.get(key):
        return None
    if (speed.get("protocol") or {}).get("device") != (ref.get("protocol") or {}).get("device"):
        return None
    return speed[key] / ref[key]


def _perplexities(manifest: dict) -> dict:
    """spec -> (value, protocol) from manifest['accuracy']['perplexity'] (absent: no eval)."""
    ppl = ((manifest.get("accuracy") or {}).get("perplexity")) or {}
    out = {}
    for spec, entry in ppl.items():
        if isinstance(entry, dict) and entry.get("value") is not None:
            out[spec] = (float(entry["value"]), entry.get("protocol"))
        elif isinstance(entry, (int, float)):
            out[spec] = (float(entry), None)
    return out


def _per_source(manifest: dict, key: str) -> dict:
    """spec -> a number stored beside a perplexity (kl, top1) in manifest['accuracy']['perplexity']."""
    ppl = ((manifest.get("accuracy") or {}).get("perplexity")) or {}
    return {spec: float(e[key]) for spec, e in ppl.items() if isinstance(e, dict) and e.get(key) is not None}


def _agreements(manifest: dict) -> dict:
    """spec -> Spearman agreement with the base (bare encoders) from manifest['accuracy']['agreement']."""
    agree = ((manifest.get("accuracy") or {}).get("agreement")) or {}
    return {spec: float(e["spearman"]) for spec, e in agree.items()
            if isinstance(e, dict) and e.get("spearman") is not None}


def eval_sets(rows: list[dict], key: str = "perplexity") -> list[str]:
    """Eval set specs of `key` (perplexity or agreement) in first-seen order (the base's order first)."""
    specs = []
    for r in rows:
        for spec in r.get(key) or {}:
            if spec not in specs:
                specs.append(spec)
    return specs


def _num(x, fmt="{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _params(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _ppl_cell(r: dict, spec: str) -> str:
    if spec not in r["perplexity"]:
        return "-"
    v = r["perplexity"][spec]
    change = r["perplexity_change_pct"].get(spec)
    if change is None or r["stage"] == "base":
        return f"{v:.2f}"
    return f"{v:.2f} ({change:+.1f}%)"


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, cells) shared by the markdown and HTML renderings."""
    specs, agree = eval_sets(rows), eval_sets(rows, "agreement")
    kl = [s for s in specs if any(s in (r.get("kl") or {}) for r in rows)]
    head = ["run", "stage", "format", "params", "disk", "bits/weight", "peak memory", "predicted",
            *[f"ppl {s}" for s in specs], *[f"KL / top-1 {s}" for s in kl], *[f"agreement {s}" for s in agree],
            "eval tok/s", "decode tok/s", "seconds"]
    cells = []
    for r in rows:
        method = {"rss-growth": " (RSS growth)", "cuda-max-allocated": " (CUDA)"}.get(r["memory_method"], "")
        cells.append([
            r["run"], r["folder"], r["format"] or "-", _params(r["params"]), fmt_bytes(r["disk_bytes"]),
            _num(r["bits_per_weight"], "{:.2f}"),
            fmt_bytes(r["measured_peak_bytes"]) + (method if r["measured_peak_bytes"] is not None else ""),
            fmt_bytes(r["predicted_peak_bytes"]),
            *[_ppl_cell(r, s) for s in specs],
            *[_kl_cell(r, s) for s in kl],
            *[_num((r.get("agreement") or {}).get(s), "{:.3f}") for s in agree],
            _speed_cell(r), _num(r["decode_tokens_per_s"], "{:,.1f}"), _num(r["seconds"], "{:,.1f}"),
        ])
    return head, cells


def _kl_cell(r: dict, spec: str) -> str:
    """KL(base || stage) per token and the share of tokens whose top prediction agrees with the base's."""
    kl, top1 = (r.get("kl") or {}).get(spec), (r.get("top1") or {}).get(spec)
    return "-" if kl is None else f"{kl:.4f} / {100 * top1:.1f}%"


def _speed_cell(r: dict) -> str:
    """Eval tokens/s, and how it compares with the base model's (x0.40 = 2.5 times slower)."""
    cell = _num(r["eval_tokens_per_s"])
    ratio = r.get("eval_speed_vs_base")
    return cell if ratio is None or r["stage"] == "base" else f"{cell} (x{ratio:.2f})"


def to_text(rows: list[dict], statuses: dict[str, str] | None = None) -> str:
    """The table as fixed-width text for a terminal; one run: no run column; `statuses`: folder -> status."""
    head, cells = table(rows)
    if len({r["run"] for r in rows}) == 1:
        head, cells = head[1:], [c[1:] for c in cells]
    if statuses:
        head = [head[0], "status", *head[1:]]
        cells = [[c[0], statuses.get(r["folder"], ""), *c[1:]] for r, c in zip(rows, cells)]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *cells)]
    line = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, cells)])


def to_markdown(rows: list[dict]) -> str:
    head, cells = table(rows)
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, c)) + " |" for c in cells]
    lines.append("")
    lines.append("Perplexity change is against the run's 00-base under the same eval protocol; peak memory is the "
                 "stage's measured peak (RSS growth over the loaded input model on CPU, max allocated on CUDA).")
    return "\n".join(lines) + "\n"


def to_html(rows: list[dict], image: str | None = None) -> str:
    """A standalone HTML page with the table (and the Pareto plot when `image` names a PNG next to it)."""
    head, cells = table(rows)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in cells)
    img = f'<p><img src="{html.escape(image)}" alt="Pareto plot"></p>' if image else ""
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>compress report</title>"
            "<style>table{border-collapse:collapse;font-family:sans-serif;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(-n+3){text-align:left}</style>"
            f"</head><body>\n<table>\n<tr>{th}</tr>\n{trs}\n</table>\n{img}\n</body></html>\n")


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, sort_keys=False) + "\n"


def render(rows: list[dict], fmt: str = "md", image: str | None = None) -> str:
    if fmt == "md":
        return to_markdown(rows)
    if fmt == "html":
        return to_html(rows, image)
    if fmt == "json":
        return to_json(rows)
    raise CompressError(f"unknown report format {fmt!r}; use md, html or json")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both x and y (lower is better), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_y = [], math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def pareto_plot(rows: list[dict], out_png, metric: str = "disk_bytes", eval_set: str | None = None,
                y: str = "perplexity") -> Path:
    """Scatter of `metric` (disk_bytes or weights_bytes) against `y` (perplexity, or kl: KL divergence to the
    base) on `eval_set` (default: the first one), one labelled point per stage, a marker per run, the Pareto
    frontier as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metric not in ("disk_bytes", "weights_bytes"):
        raise CompressError(f"pareto metric must be disk_bytes or weights_bytes, not {metric!r}")
    if y not in ("perplexity", "kl"):
        raise CompressError(f"pareto y must be perplexity or kl, not {y!r}")
    specs = eval_sets(rows)
    if not specs:
        raise CompressError("no stage has a perplexity: add an `eval: {perplexity: [...]}` block to the pipeline")
    spec = eval_set or specs[0]
    # only points measured under one protocol are comparable: the first row's (normally 00-base's)
    ref = next(r["perplexity_protocol"][spec] for r in rows if spec in r["perplexity"])
    value = (lambda r: r["perplexity"].get(spec)) if y == "perplexity" else (lambda r: (r.get("kl") or {}).get(spec))
    pts = [r for r in rows if value(r) is not None and r.get(metric)
           and same_protocol(r["perplexity_protocol"][spec], ref)]
    skipped = sum(1 for r in rows if spec in r["perplexity"] and r not in pts)
    if not pts:
        raise CompressError(f"no stage has both {metric} and a {y} on {spec}")
    xy = [(r[metric] / 2**20, value(r)) for r in pts]
    runs = list(dict.fromkeys(r["run"] for r in pts))
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for k, run in enumerate(runs):
        sel = [i for i, r in enumerate(pts) if r["run"] == run]
        ax.scatter([xy[i][0] for i in sel], [xy[i][1] for i in sel], marker=MARKERS[k % len(MARKERS)], s=48,
                   label=run, zorder=3)
    for (px, py), r in zip(xy, pts):
        label = r["folder"] if len(runs) == 1 else f"{r['run']}/{r['folder']}"
        ax.annotate(label, (px, py), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front(xy)
    fx, fy = [xy[i][0] for i in front], [xy[i][1] for i in front]
    ax.step(fx, fy, where="post", color="tab:red", linewidth=1.2, alpha=0.8, label="Pareto frontier", zorder=2)
    xs = [x for x, _ in xy]
    if max(xs) / max(min(xs), 1e-9) >= 8:
        ax.set_xscale("log")
    ax.set_xlabel(("disk size" if metric == "disk_bytes" else "weights memory") + " (MiB)")
    ax.set_ylabel(f"{'perplexity' if y == 'perplexity' else 'KL divergence to the base'} on {spec} (lower is better)")
    title = f"size vs {'perplexity' if y == 'perplexity' else 'KL to the base'}"
    if skipped:
        title += f" ({skipped} stage(s) under another eval protocol left out)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def report(run_dirs, fmt: str = "md", out_dir=None, metric: str = "disk_bytes") -> str:
    """The report text for `run_dirs`; with `out_dir`, also write report.<fmt> and pareto.png there (the plot
    is skipped, with a line saying why, when no stage was evaluated)."""
    rows = collect(run_dirs)
    if out_dir is None:
        return render(rows, fmt)
    out_dir = Path(out_dir)
    png = out_dir / "pareto.png"
    note = ""
    try:
        pareto_plot(rows, png, metric=metric)
        image = png.name
    except CompressError as e:
        image, note = None, f"no Pareto plot: {e}"
    text = render(rows, fmt, image)
    if note and fmt == "md":
        text += f"\n{note}\n"
    elif image and fmt == "md":
        text += f"\n![Pareto plot]({image})\n"
    (out_dir / f"report.{fmt}").write_text(text)
    return text


def write(run_dir, fmt: str = "md") -> Path:
    """Write report.md (or .html/.json) and pareto.png into a run folder; returns the report's path."""
    report([run_dir], fmt, out_dir=run_dir)
    return Path(run_dir) / f"report.{fmt}"
