"""Plot the long-context evidence: passkey accuracy by length x depth (a heat map) and the
validation NLL by position bucket (one line per evaluation; the newest one's shuffled-block
control dashed), as one SVG.

Reads ``eval.json`` of ``python -m train.eval`` or a run's ``metrics.jsonl`` (its ``kind: eval``
lines from the ``eval.*`` validation hook; the newest one gives the heat map):

    python bench/plot_eval.py RUN_DIR/eval.json [--out eval.svg]
    python bench/plot_eval.py RUN_DIR/metrics.jsonl --out RUN_DIR/long_context.svg

Hand-written SVG (matplotlib is not a dependency).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

PASSKEY = re.compile(r"^eval/passkey/([^/]+)/d([0-9.]+)$")
BUCKET = "val/nll_bucket/"
CONTROL = "val/nll_bucket_control/"


def read_evaluations(path: Path) -> list[tuple[int | str, dict[str, float]]]:
    """[(step or label, metrics)] from an eval.json or a metrics.jsonl."""
    if path.suffix == ".json":
        report = json.loads(path.read_text())
        return [(report.get("checkpoint", path.name), report["metrics"])]
    out = []
    with open(path) as fh:
        for line in fh:
            r = json.loads(line)
            if r.get("kind") == "eval":
                out.append((r["step"], {k: v for k, v in r.items() if "/" in k}))
    if not out:
        raise ValueError(f"{path}: no 'kind: eval' lines (set eval.passkey_lengths / eval.nll_buckets)")
    return out


def _size(name: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20}.get(name[-1], 1)
    return int(name[:-1] if mult > 1 else name) * mult


def _color(acc: float) -> str:
    """0 -> light red, 1 -> green."""
    r, g = int(230 - 190 * acc), int(90 + 110 * acc)
    return f"rgb({r},{g},80)"


def svg(evaluations: list[tuple[int | str, dict[str, float]]]) -> str:
    W, H, pad = 900, 420, 60
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             'font-family="sans-serif" font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>']
    label, last = evaluations[-1]
    # heat map: passkey accuracy, lengths down, depths across
    cells = {(m.group(1), float(m.group(2))): v for k, v in last.items() if (m := PASSKEY.match(k))}
    lengths = sorted({n for n, _ in cells}, key=_size)
    depths = sorted({d for _, d in cells})
    x0, y0, cw, ch = pad + 20, pad, 60, 36
    parts.append(f'<text x="{x0}" y="{y0 - 24}">passkey exact match ({label})</text>')
    for j, d in enumerate(depths):
        parts.append(f'<text x="{x0 + j * cw + cw / 2}" y="{y0 - 6}" text-anchor="middle">{d:g}</text>')
    for i, n in enumerate(lengths):
        parts.append(f'<text x="{x0 - 6}" y="{y0 + i * ch + ch / 2 + 4}" text-anchor="end">{n}</text>')
        for j, d in enumerate(depths):
            v = cells.get((n, d))
            if v is None:
                continue
            parts.append(f'<rect x="{x0 + j * cw}" y="{y0 + i * ch}" width="{cw - 2}" height="{ch - 2}" '
                         f'fill="{_color(v)}"/>')
            parts.append(f'<text x="{x0 + j * cw + cw / 2}" y="{y0 + i * ch + ch / 2 + 4}" '
                         f'text-anchor="middle">{v:.2f}</text>')
    if lengths:
        parts.append(f'<text x="{x0 + len(depths) * cw / 2}" y="{y0 + len(lengths) * ch + 18}" '
                     'text-anchor="middle">depth of the key</text>')
    # NLL by position bucket: one polyline per evaluation
    buckets = [k[len(BUCKET):] for k in last if k.startswith(BUCKET)]
    series = [(lab, [m.get(BUCKET + b) for b in buckets]) for lab, m in evaluations]
    vals = [v for _, ys in series for v in ys if v is not None]
    vals += [last[CONTROL + b] for b in buckets if CONTROL + b in last]
    if buckets and vals:
        px0, px1, py0, py1 = 480, W - 40, pad, H - pad
        lo, hi = min(vals), max(vals)
        sx = lambda i: px0 + (i + 0.5) / len(buckets) * (px1 - px0)
        sy = lambda v: py1 - (v - lo) / max(hi - lo, 1e-9) * (py1 - py0 - 20)
        parts += [f'<text x="{px0}" y="{py0 - 24}">validation NLL by position in document</text>',
                  f'<line x1="{px0}" y1="{py1}" x2="{px1}" y2="{py1}" stroke="black"/>',
                  f'<line x1="{px0}" y1="{py0}" x2="{px0}" y2="{py1}" stroke="black"/>',
                  f'<text x="{px0 - 4}" y="{sy(hi) + 4}" text-anchor="end">{hi:.2f}</text>',
                  f'<text x="{px0 - 4}" y="{sy(lo) + 4}" text-anchor="end">{lo:.2f}</text>']
        for i, b in enumerate(buckets):
            parts.append(f'<text x="{sx(i)}" y="{py1 + 16}" text-anchor="middle">{b}</text>')
        colors = ["#bbbbbb", "#8fb3d9", "#2b7bba", "#d62728"]
        for k, (lab, ys) in enumerate(series):
            pts = " ".join(f"{sx(i):.1f},{sy(v):.1f}" for i, v in enumerate(ys) if v is not None)
            color = colors[-1] if k == len(series) - 1 else colors[k % 3]
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{pts}"/>')
        parts.append(f'<text x="{px1}" y="{py0 - 8}" text-anchor="end" fill="{colors[-1]}">'
                     f'newest: {label}</text>')
        control = [last.get(CONTROL + b) for b in buckets]
        if any(v is not None for v in control):   # the shuffled-block control, dashed
            pts = " ".join(f"{sx(i):.1f},{sy(v):.1f}" for i, v in enumerate(control) if v is not None)
            parts.append(f'<polyline fill="none" stroke="{colors[-1]}" stroke-dasharray="5 4" '
                         f'stroke-width="1.4" points="{pts}"/>')
            parts.append(f'<text x="{px1}" y="{py0 + 8}" text-anchor="end" fill="{colors[-1]}">'
                         'dashed: shuffled-block control</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="eval.json or metrics.jsonl")
    ap.add_argument("--out", type=Path, default=None, help="SVG path (default: next to the source)")
    a = ap.parse_args(argv)
    try:
        evaluations = read_evaluations(a.source)
    except (OSError, ValueError, KeyError) as err:
        print(f"plot_eval: {err}", file=sys.stderr)
        return 2
    out = a.out or a.source.with_name("long_context.svg")
    out.write_text(svg(evaluations))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
