"""The SVG chart of `make bench` (scripts/bench/run.py): two panels, req/s and proxy CPU µs per
request, a group of bars per connection count and a bar per target, each bar the median over
the rounds and each round's value a dot on it (spread left to right in round order), so that
the round-to-round spread shows. Written by hand: Python's standard library only.

    python3 scripts/bench/chart.py results.json out.svg   # results as run.py collects them
"""

import json
import math
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import escape

# One colour per target, in the order of the rounds; others get grey.
COLOURS = {
    "direct": "#9e9e9e",
    "nginx": "#2e7d32",
    "haproxy": "#1565c0",
    "bearerd": "#e65100",
    "bearerd-dpop": "#ad1457",
    "bearerd-routes50": "#6a1b9a",
}
PANELS = (("rps", "req/s (median bar, one dot per round)", "{:,.0f}"),
          ("cpu_us", "proxy CPU µs per request (median bar, one dot per round)", "{:.2f}"))

WIDTH = 980
PANEL_H = 300
TOP = 56  # title and legend
LEFT, RIGHT = 78, 20
PLOT_TOP_PAD, PLOT_BOTTOM_PAD = 26, 34


def nice_ticks(top, n=5):
    """Round tick values from 0 to at least top."""
    if top <= 0:
        return [0, 1]
    raw = top / n
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    count = math.ceil(top / step)
    return [i * step for i in range(count + 1)]


def tick_label(value):
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def write_chart(results, path, title="bearerd bench"):
    """results: dicts with round, connections, target, rps, cpu_us (None for direct)."""
    order = list(COLOURS)
    targets = sorted({x["target"] for x in results},
                     key=lambda t: (order.index(t) if t in order else len(order), t))
    connections = sorted({x["connections"] for x in results})
    rounds = sorted({x["round"] for x in results})
    height = TOP + PANEL_H * len(PANELS) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>',
           f'<text x="{LEFT}" y="20" font-size="15" font-weight="bold">{escape(title)}</text>']
    # Legend.
    x = LEFT
    for t in targets:
        out.append(f'<rect x="{x}" y="32" width="12" height="12" '
                   f'fill="{COLOURS.get(t, "#757575")}"/>')
        out.append(f'<text x="{x + 16}" y="42">{escape(t)}</text>')
        x += 22 + 7.2 * len(t)
    out.append(f'<circle cx="{x + 6}" cy="38" r="3.5" fill="#ffffff" stroke="#000000"/>'
               f'<text x="{x + 14}" y="42">one round ({len(rounds)})</text>')

    plot_w = WIDTH - LEFT - RIGHT
    group_w = plot_w / max(len(connections), 1)
    bar_w = min(48.0, group_w * 0.8 / max(len(targets), 1))
    for index, (key, label, value_fmt) in enumerate(PANELS):
        top = TOP + index * PANEL_H + PLOT_TOP_PAD
        bottom = TOP + (index + 1) * PANEL_H - PLOT_BOTTOM_PAD
        values = [x[key] for x in results if x.get(key) is not None]
        ticks = nice_ticks(max(values, default=0) * 1.05)
        y_max = ticks[-1]

        def y(v, top=top, bottom=bottom, y_max=y_max):
            return bottom - (bottom - top) * v / y_max

        out.append(f'<text x="{LEFT}" y="{top - 8}" font-weight="bold">{escape(label)}</text>')
        for tick in ticks:
            ty = y(tick)
            out.append(f'<line x1="{LEFT}" y1="{ty:.1f}" x2="{WIDTH - RIGHT}" y2="{ty:.1f}" '
                       f'stroke="#e0e0e0"/>')
            out.append(f'<text x="{LEFT - 6}" y="{ty + 4:.1f}" text-anchor="end">'
                       f'{tick_label(tick)}</text>')
        out.append(f'<line x1="{LEFT}" y1="{bottom}" x2="{WIDTH - RIGHT}" y2="{bottom}" '
                   f'stroke="#000000"/>')
        for g, c in enumerate(connections):
            gx = LEFT + g * group_w
            out.append(f'<text x="{gx + group_w / 2:.1f}" y="{bottom + 18}" '
                       f'text-anchor="middle">{c} connection{"" if c == 1 else "s"}</text>')
            bars_x = gx + (group_w - bar_w * len(targets)) / 2
            for i, t in enumerate(targets):
                points = sorted((x["round"], x[key]) for x in results
                                if x["connections"] == c and x["target"] == t
                                and x.get(key) is not None)
                if not points:
                    continue
                colour = COLOURS.get(t, "#757575")
                bx = bars_x + i * bar_w
                med = statistics.median(v for _, v in points)
                spread = (f"; rounds {min(v for _, v in points):{value_fmt[2:-1]}}"
                          f"–{max(v for _, v in points):{value_fmt[2:-1]}}")
                out.append(
                    f'<rect x="{bx + 2:.1f}" y="{y(med):.1f}" width="{bar_w - 4:.1f}" '
                    f'height="{bottom - y(med):.1f}" fill="{colour}" fill-opacity="0.55">'
                    f'<title>{escape(t)} at {c}: median {value_fmt.format(med)}'
                    f'{escape(spread)}</title></rect>')
                for k, (r, v) in enumerate(points):
                    dx = bx + bar_w / 2 if len(points) == 1 else \
                        bx + 6 + (bar_w - 12) * k / (len(points) - 1)
                    out.append(
                        f'<circle cx="{dx:.1f}" cy="{y(v):.1f}" r="3.5" fill="#ffffff" '
                        f'stroke="{colour}" stroke-width="1.5"><title>{escape(t)} at {c}, '
                        f'round {r}: {value_fmt.format(v)}</title></circle>')
    out.append("</svg>")
    text = "\n".join(out) + "\n"
    ET.fromstring(text)  # well-formed, or an exception here rather than a broken file
    Path(path).write_text(text)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    write_chart(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
