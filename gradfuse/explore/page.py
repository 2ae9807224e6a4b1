"""The explore page: one HTML file with the payload inlined as JSON, a stylesheet and a small
vanilla script (``page.js``, ``page.css`` beside this file) that draws SVG from the precomputed
layouts. No external resource: the Content-Security-Policy forbids every fetch."""

from __future__ import annotations

import html
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
       "base-uri 'none'; form-action 'none'")


def _read(name: str) -> str:
    with open(os.path.join(_HERE, name), encoding="utf-8") as f:
        return f.read()


def render(payload: dict) -> str:
    from . import dumps

    title = html.escape(f"{payload['model']} · gradfuse explore")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>
{_read("page.css")}
</style>
</head>
<body>
<header>
  <h1>{html.escape(payload['model'])}</h1>
  <nav id="views"></nav>
  <input id="search" type="search" placeholder="search: %value, op, file:line, source text" autocomplete="off">
  <div id="results" hidden></div>
  <span id="meta"></span>
</header>
<main>
  <section id="graph">
    <div id="crumbs"></div>
    <svg id="canvas" xmlns="http://www.w3.org/2000/svg"></svg>
    <div id="hint">click a box to expand it · click a node to select it · drag to pan · wheel to zoom ·
      <a href="#" id="fit">fit all</a></div>
  </section>
  <aside id="details"><p class="muted">Select a node, a layer or a kernel.</p></aside>
</main>
<section id="charts">
  <nav id="chart-tabs"></nav>
  <div id="chart"></div>
</section>
<script type="application/json" id="payload">{dumps(payload)}</script>
<script>
{_read("page.js")}
</script>
</body>
</html>
"""
