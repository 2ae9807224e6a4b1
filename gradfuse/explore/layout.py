"""A layered (Sugiyama-style) layout of a directed graph, computed in Python for the page.

Written here rather than taken from a JavaScript library: dagre overflows its stack past ~3,000
nodes and elkjs past ~6,000 (ARCHITECTURE.md); this has no recursion and costs
O(sweeps * (nodes + dummies + edges)), so it neither hangs nor overflows on a training step.

1. back edges (against the given order, which is the IR's topological order) are reversed, so
   any input lays out, cycles included (a layer's forward and backward collapsed into one box);
2. layers by longest path from the sources; a source (a parameter) moves down next to its
   first user;
3. edges spanning several layers get dummy points (up to a budget: three per node), which route
   them as polylines;
4. order within layers: barycenter sweeps down and up;
5. x: packed in order, pulled towards the neighbours' mean, overlaps pushed apart.
"""

from __future__ import annotations

from dataclasses import dataclass

GAP_X, GAP_Y = 18, 46
MAX_DUMMIES = 20000
SWEEPS = 4


@dataclass
class Placed:
    x: list[float]  # centre of each node
    y: list[float]
    edges: list[list[tuple[float, float]]]  # per input edge: the points from source to target
    width: float
    height: float


def layered_layout(sizes: list[tuple[float, float]], edges: list[tuple[int, int]]) -> Placed:
    """Coordinates for nodes ``0..n-1`` of ``sizes`` (width, height), given in a topological-ish
    order, and polylines for ``edges`` (source, target)."""
    n = len(sizes)
    succ: list[list[int]] = [[] for _ in range(n)]
    pred: list[list[int]] = [[] for _ in range(n)]
    dag = []
    for u, v in edges:
        if u == v:
            continue
        a, b = (u, v) if u < v else (v, u)  # reversed back edge: drawn the same, laid out as forward
        dag.append((a, b))
    for a, b in dict.fromkeys(dag):
        succ[a].append(b)
        pred[b].append(a)

    layer = [0] * n
    for v in range(n):  # nodes come in order: every predecessor has a smaller index
        if pred[v]:
            layer[v] = max(layer[u] for u in pred[v]) + 1
    for v in reversed(range(n)):  # sources sit just above their nearest user
        if not pred[v] and succ[v]:
            layer[v] = max(layer[v], min(layer[w] for w in succ[v]) - 1)

    # dummy nodes along long edges: node ids n.. ; chains[(a, b)] = the ids between them
    width = [s[0] for s in sizes]
    height = [s[1] for s in sizes]
    lay_of = list(layer)
    chains: dict[tuple[int, int], list[int]] = {}
    nbr_up: list[list[int]] = [[] for _ in range(n)]
    nbr_down: list[list[int]] = [[] for _ in range(n)]
    budget = min(MAX_DUMMIES, 3 * n + 60)  # past it, long edges are drawn straight: sweeps stay O(nodes)
    for a, b in dict.fromkeys(dag):
        span = layer[b] - layer[a]
        chain = []
        if 1 < span <= budget:
            budget -= span - 1
            for k in range(1, span):
                chain.append(len(lay_of))
                lay_of.append(layer[a] + k)
                width.append(2.0)
                height.append(0.0)
                nbr_up.append([])
                nbr_down.append([])
        chains[(a, b)] = chain
        path = [a, *chain, b]
        for p, q in zip(path, path[1:], strict=False):
            nbr_down[p].append(q)
            nbr_up[q].append(p)

    total = len(lay_of)
    layers: list[list[int]] = [[] for _ in range(max(lay_of, default=0) + 1)]
    for v in range(total):
        layers[lay_of[v]].append(v)
    pos = [0.0] * total
    for row in layers:
        for i, v in enumerate(row):
            pos[v] = i

    pos_of = pos.__getitem__

    def sweep(rows, nbrs):
        for row in rows:
            keyed = []
            for v in row:
                ns = nbrs[v]
                keyed.append((sum(map(pos_of, ns)) / len(ns) if ns else pos[v], pos[v], v))
            keyed.sort()
            row[:] = [v for _, _, v in keyed]
            for i, v in enumerate(row):
                pos[v] = i

    for _ in range(SWEEPS):
        sweep(layers[1:], nbr_up)
        sweep(list(reversed(layers[:-1])), nbr_down)

    # x coordinates: packed, then pulled towards the neighbours and pushed apart again
    x = [0.0] * total
    for row in layers:
        at = 0.0
        for v in row:
            x[v] = at + width[v] / 2
            at += width[v] + GAP_X
        shift = at / 2
        for v in row:
            x[v] -= shift
    for rows, nbrs in ((layers[1:], nbr_up), (list(reversed(layers[:-1])), nbr_down),
                       (layers[1:], nbr_up)):
        for row in rows:
            want = [sum(map(x.__getitem__, nbrs[v])) / len(nbrs[v]) if nbrs[v] else x[v] for v in row]
            placed = list(want)
            for i in range(1, len(row)):  # left to right: keep the order and the gaps
                lo = placed[i - 1] + (width[row[i - 1]] + width[row[i]]) / 2 + GAP_X
                placed[i] = max(placed[i], lo)
            shift = sum(w - p for w, p in zip(want, placed, strict=True)) / len(row) if row else 0.0
            want = [p + shift for p in placed]  # pushed apart, as a block centred on what they want
            for v, w in zip(row, want, strict=True):
                x[v] = w

    row_h = [max((height[v] for v in row), default=0.0) for row in layers]
    y_of_layer, at = [], 0.0
    for h in row_h:
        y_of_layer.append(at + h / 2)
        at += h + GAP_Y
    left = min((x[v] - width[v] / 2 for v in range(total)), default=0.0)
    right = max((x[v] + width[v] / 2 for v in range(total)), default=0.0)
    xs = [x[v] - left for v in range(total)]
    ys = [y_of_layer[lay_of[v]] for v in range(total)]

    polylines = []
    for u, v in edges:
        a, b = (u, v) if u < v else (v, u)
        pts = [(xs[c], ys[c]) for c in chains.get((a, b), [])]
        if u > v:
            pts.reverse()
        polylines.append([(xs[u], ys[u]), *pts, (xs[v], ys[v])])
    return Placed(xs[:n], ys[:n], polylines, right - left, max(at - GAP_Y, 0.0))
