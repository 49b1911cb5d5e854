#!/usr/bin/env python3
"""Draws bench/run.sh's results as one SVG (no dependencies): throughput and p99 latency
of Lockstep beside the raw limit, per backend and number of callers.

Usage: bench/plot.py RESULTS.csv OUT.svg
RESULTS.csv columns: backend,callers,lockstep_rate,raw_rate,lockstep_p99_ms,raw_p99_ms
"""
import csv
import sys

SERIES = [
    ("sqlite", "lockstep_rate", "lockstep_p99_ms", "SQLite: Lockstep", "#1f77b4"),
    ("sqlite", "raw_rate", "raw_p99_ms", "SQLite: raw", "#9ecae1"),
    ("postgres", "lockstep_rate", "lockstep_p99_ms", "PostgreSQL: Lockstep", "#d62728"),
    ("postgres", "raw_rate", "raw_p99_ms", "PostgreSQL: raw (pgbench)", "#fc9272"),
]


def nice_max(v):
    if v <= 0:
        return 1
    step = 10 ** (len(str(int(v))) - 1)
    return ((int(v) // step) + 1) * step


def panel(rows, callers, x0, title, col_index, unit):
    w, h, left, bottom, top = 430, 300, 60, 40, 30
    values = {}
    for backend, rate, p99, _, _ in SERIES:
        col = (rate, p99)[col_index]
        for c in callers:
            r = rows.get((backend, c))
            values[(backend, col, c)] = float(r[col]) if r and r.get(col) not in (None, "") else 0.0
    vmax = nice_max(max(values.values() or [1]))
    out = [f'<g transform="translate({x0},0)">',
           f'<text x="{left + (w - left) / 2}" y="18" text-anchor="middle" font-weight="bold">{title}</text>']
    plot_h = h - bottom - top
    for i in range(5):
        v = vmax * i / 4
        y = top + plot_h - plot_h * i / 4
        out.append(f'<line x1="{left}" x2="{w}" y1="{y}" y2="{y}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end" font-size="11">{v:g}</text>')
    out.append(f'<text x="14" y="{top + plot_h / 2}" font-size="11" transform="rotate(-90 14 {top + plot_h / 2})" '
               f'text-anchor="middle">{unit}</text>')
    group_w = (w - left) / len(callers)
    bar_w = group_w * 0.8 / len(SERIES)
    for gi, c in enumerate(callers):
        gx = left + gi * group_w + group_w * 0.1
        for si, (backend, rate, p99, _, color) in enumerate(SERIES):
            v = values[(backend, (rate, p99)[col_index], c)]
            bh = plot_h * v / vmax
            x = gx + si * bar_w
            out.append(f'<rect x="{x:.1f}" y="{top + plot_h - bh:.1f}" width="{bar_w - 2:.1f}" height="{bh:.1f}" '
                       f'fill="{color}"><title>{v:g}</title></rect>')
        out.append(f'<text x="{left + gi * group_w + group_w / 2}" y="{h - bottom + 16}" text-anchor="middle" '
                   f'font-size="12">{c} caller{"s" if c != 1 else ""}</text>')
    out.append(f'<line x1="{left}" x2="{w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#333"/>')
    out.append('</g>')
    return out


def main():
    src, dst = sys.argv[1], sys.argv[2]
    rows = {}
    callers = []
    with open(src) as f:
        for r in csv.DictReader(f):
            c = int(r["callers"])
            rows[(r["backend"], c)] = r
            if c not in callers:
                callers.append(c)
    callers.sort()
    width, height = 900, 340
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    svg += panel(rows, callers, 0, "AuthorizeAndCommit throughput", 0, "calls/s")
    svg += panel(rows, callers, 450, "p99 latency", 1, "ms")
    for i, (_, _, _, label, color) in enumerate(SERIES):
        x = 70 + i * 205
        svg.append(f'<rect x="{x}" y="{height - 18}" width="12" height="12" fill="{color}"/>')
        svg.append(f'<text x="{x + 16}" y="{height - 8}">{label}</text>')
    svg.append('</svg>')
    with open(dst, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
