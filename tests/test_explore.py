"""``gradfuse explore``: the pages of every example, opened in a real headless chromium with the
network blocked; the layout of a 12-layer transformer's training step, timed.

The browser is Debian's ``chromium`` with ``chromium-driver``, driven by selenium (pinned in the
dev dependencies) in offline mode. On a fresh machine the fixture installs them with apt-get when
it runs as root; if they cannot be had, the browser tests fail, saying why, rather than skip.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import gradfuse as gf
from gradfuse import functional as F
from gradfuse import nn
from gradfuse.cli import main
from gradfuse.explore import explore
from gradfuse.explore.layout import layered_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))
SCREENSHOT = os.path.join(ROOT, "docs", "explore.png")  # the README's picture, rewritten with --accept


# -- a 12-layer transformer, written in the DSL ---------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        self.ln1, self.attn = nn.LayerNorm(dim), nn.MultiHeadSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class Transformer(nn.Module):
    def __init__(self, layers: int = 12, dim: int = 64, heads: int = 4, length: int = 16, vocabulary: int = 50):
        self.embed = nn.Embedding(vocabulary, dim)
        self.position = nn.LearnedPositionalEncoding(length, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocabulary)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.position(self.embed(ids)))))


transformer = gf.Model(Transformer(), inputs={"x": "i64[N,16]"}, targets={"y": "i64[N,16]"}, loss=F.cross_entropy)


@pytest.fixture(scope="module")
def transformer_page(tmp_path_factory):
    """The page of the transformer's training step, made as the command makes it (trace, autodiff,
    optimizer, the compiler's passes, layouts, the file), with its wall and CPU seconds."""
    path = str(tmp_path_factory.mktemp("transformer") / "transformer.html")
    wall, cpu = time.perf_counter(), time.process_time()
    report = explore(os.path.abspath(__file__) + ":transformer", path, optimizer=gf.SGD(momentum=0.9))  # as the CLI
    return path, report, time.perf_counter() - wall, time.process_time() - cpu


def test_a_12_layer_transformer_training_step_is_written_in_under_10_s(transformer_page, capsys):
    path, report, wall, cpu = transformer_page
    html = open(path, encoding="utf-8").read()
    payload = json.loads(re.search(r'id="payload">(.*?)</script>', html, re.S).group(1).replace("<\\/", "</"))
    nodes = {v["key"]: len(v["nodes"]) for v in payload["views"]}
    biggest = max(len(lay["items"]) for v in payload["views"] for lay in v["layouts"].values())
    with capsys.disabled():
        print(f"\n12-layer transformer training step: {nodes} nodes, {report.layouts} layouts (largest: {biggest} "
              f"boxes), page {report.bytes / 1e6:.1f} MB, written in {wall:.1f} s ({cpu:.1f} s of CPU: other "
              "processes on the machine count in the first, not in the second)")
    assert sum(nodes.values()) > 3000 and nodes["kernels"] > 1500  # its seconds are printed, not asserted
    for v in payload["views"]:  # every layout is finite and every node is drawn in its group's layout
        for lay in v["layouts"].values():
            assert all(abs(c) < 1e7 for item in lay["items"] for c in item[2:])
        drawn = {ref for lay in v["layouts"].values() for kind, ref, *_ in lay["items"] if kind == "n"}
        assert drawn == {i for i, n in enumerate(v["nodes"]) if not n.get("h")}


def test_the_transformer_page_opens_in_the_browser(browser, transformer_page):
    path = transformer_page[0]
    start = time.perf_counter()
    _open(browser, path, "#%grad.blocks.11.attn.q.weight")
    seconds = time.perf_counter() - start
    assert [e.get_attribute("data-v") for e in browser.find_elements("css selector", "#canvas g.item.sel")] == \
        ["grad.blocks.11.attn.q.weight"]
    assert browser.find_elements("css selector", "#canvas g.item.fwd")
    _open(browser, path, "#kernels/s:blocks.5.mlp.0")
    assert len(browser.find_elements("css selector", "#canvas g.group.kernel")) >= 2
    browser.find_element("css selector", "#canvas g.group.kernel").click()  # a kernel, expanded over its box
    assert browser.find_elements("css selector", "#canvas rect.inset")
    assert browser.find_element("css selector", "#details h2").text.startswith("kernel ")
    assert _errors(browser) == []
    print(f"the transformer's page opened and drew in {seconds:.1f} s")


def test_several_kernels_are_open_at_once(browser, transformer_page):
    """A click on a second kernel of a layer opens it over its box beside the first; a click on one of
    several open kernels closes it."""
    _open(browser, transformer_page[0], "#kernels/s:blocks.5.mlp.0")
    boxes = [e.get_attribute("data-g") for e in browser.find_elements("css selector", "#canvas g.group.kernel")]
    assert len(boxes) >= 2
    first, second = boxes[0], boxes[-1]

    def click(gid):  # an event on the box itself: the first kernel's ops may lie over the second's box
        browser.execute_script("document.querySelector(`#canvas g.group.kernel[data-g='${arguments[0]}']`)"
                               ".dispatchEvent(new MouseEvent('click', {bubbles: true}))", gid)
        return {e.get_attribute("data-g") for e in browser.find_elements("css selector", "#canvas rect.inset")}

    def ops(gid):  # the op nodes drawn of a kernel, and those it has
        drawn = {e.get_attribute("data-v") for e in browser.find_elements("css selector", "#canvas g.item.node")}
        has = browser.execute_script("return gradfuseExplore.payload.views.find((v) => v.key === 'kernels').nodes"
                                     ".filter((n) => n.g === arguments[0] && !n.h).map((n) => n.v)", gid)
        return set(has) & drawn, set(has)

    assert click(first) == {first}
    assert click(second) == {first, second}
    for gid in (first, second):
        drawn, has = ops(gid)
        assert has and drawn == has
    assert browser.find_element("css selector", "#details h2").text.split()[:2] == ["kernel", second[2:]]
    assert click(first) == {second}  # closed again
    assert _errors(browser) == []


def test_the_layout_takes_thousands_of_nodes_and_cycles_without_recursion():
    n = 6001  # where elkjs overflows its stack
    edges = [(i, i + 1) for i in range(n - 1)] + [(i, i + 7) for i in range(0, n - 7, 5)] + [(n - 1, 0)]
    start = time.perf_counter()
    placed = layered_layout([(60.0, 30.0)] * n, edges)
    print(f"a {n}-node layout with a cycle in {time.perf_counter() - start:.1f} s")
    assert len(placed.edges) == len(edges) and placed.height > 0
    ys = placed.y
    assert all(ys[a] < ys[b] for a, b in edges[:n - 1])  # layered top to bottom, the back edge drawn upwards


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: os.path.basename(p))
def test_every_kernel_has_its_source_with_each_op_marked(path):
    from gradfuse.explore import build_payload, stages_of_model

    payload = build_payload(stages_of_model(path), 64)
    kernels = next(v for v in payload["views"] if v["key"] == "kernels")
    assert set(payload["kernels"]) == {n["k"] for n in kernels["nodes"] if "k" in n}
    for name, k in payload["kernels"].items():
        assert k["src"] and re.match(rf"def {k['fn']}\(", k["src"][1]), name
        assert set(range(len(k["ops"]))) <= set(k["marks"]), (name, k["ops"], k["marks"])
        assert k["step"] is not None and payload["memory"]["steps"][k["step"]] == name
    saved = {s["v"] for s in payload["saved"]}
    backward = next(v for v in payload["views"] if v["key"] == "backward")
    assert saved and saved <= {n["v"] for n in backward["nodes"] if n["st"] == "forward"}


def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys):
    assert main(["explore", str(tmp_path / "nope.py")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no such file" in err
    assert main(["explore", EXAMPLES[0], "--batch", "0", "-o", str(tmp_path / "x.html")]) == 1
    assert "--batch" in capsys.readouterr().err
    assert main(["explore", EXAMPLES[0], "-o", str(tmp_path)]) == 1  # a directory, not a file
    assert "is a directory" in capsys.readouterr().err


def test_an_artifact_has_a_page_too(browser, tmp_path):
    model = os.path.join(ROOT, "examples", "digits_mlp.py")
    assert main(["compile", model, "-o", str(tmp_path / "mlp")]) == 0
    out = tmp_path / "mlp.html"
    report = explore(str(tmp_path / "mlp"), str(out))
    assert report.bytes > 0
    page = out.read_text()
    assert '"model":"digits_mlp"' in page and "grad.fc1.weight" in page
    _open(browser, str(out), "#%grad.fc1.weight")
    assert browser.find_element("css selector", "#canvas g.item.fwd").get_attribute("data-v") == "fc1.matmul"
    assert _errors(browser) == []


# -- in the browser --------------------------------------------------------------------------------
def _install_browser() -> str | None:
    """The reason chromium and its driver cannot be had, or None once they are there."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return None
    if os.geteuid() != 0:
        return "chromium and chromium-driver are not installed and this is not root: apt-get install -y " \
               "chromium chromium-driver"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "chromium", "chromium-driver"], ["apt-get", "update"],
                ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode == 0 and cmd[1] == "install":
            break
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return None
    return f"apt-get install -y chromium chromium-driver failed: {done.stderr.strip()[-400:]}"


@pytest.fixture(scope="module")
def browser():
    why = _install_browser()
    if why:
        pytest.fail(f"no browser for the page tests: {why}")
    os.environ["SE_OFFLINE"] = "true"  # selenium must not look for (download) a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1500,1000",
                 "--proxy-server=http://0.0.0.0:9", "--proxy-bypass-list=<-loopback>",  # any fetch fails
                 "--host-resolver-rules=MAP * ~NOTFOUND", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pages")
    out = {}
    for path in EXAMPLES:
        name = os.path.splitext(os.path.basename(path))[0]
        out[name] = str(folder / f"{name}.html")
        report = explore(path, out[name])
        print(f"{name}: {report.bytes:,} bytes in {report.seconds:.1f} s")
    return out


def _errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def _open(driver, page: str, hash_: str = ""):
    driver.get("about:blank")
    driver.get_log("browser")
    driver.get("file://" + page + hash_)
    driver.find_element("css selector", "#canvas g.item")


@pytest.mark.parametrize("name", [os.path.splitext(os.path.basename(p))[0] for p in EXAMPLES])
def test_every_example_page_draws_and_links(browser, pages, name, tmp_path):
    page = pages[name]
    html = open(page, encoding="utf-8").read()
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", html), "the page must fetch nothing"
    payload = json.loads(re.search(r'<script type="application/json" id="payload">(.*?)</script>', html,
                                   re.S).group(1).replace("<\\/", "</"))
    backward = next(v for v in payload["views"] if v["key"] == "backward")
    # a backward node whose forward node is an op of the same graph: the test's click
    node = next(n for n in backward["nodes"] if n["st"] == "backward" and "f" in n and not n.get("h")
                and any(m["v"] == n["f"] and m["o"] not in ("input", "param", "state") for m in backward["nodes"]))

    _open(browser, page)
    assert browser.find_elements("css selector", "#canvas g.item")
    assert browser.find_elements("css selector", "#canvas path.edge")
    assert _errors(browser) == []

    # a deep link selects its node, drawn, in its layer
    _open(browser, page, f"#%{node['v']}")
    selected = browser.find_elements("css selector", "#canvas g.item.sel")
    assert [e.get_attribute("data-v") for e in selected] == [node["v"]]
    assert node["v"] in browser.find_element("css selector", "#details h2").text

    # clicking a backward node highlights the forward node it differentiates
    browser.execute_script("gradfuseExplore.show('backward', '')")
    group = browser.find_elements("css selector", f"#canvas g.item[data-g='{node['g']}']") if node["g"] else []
    if group:  # its layer is collapsed at the top: a click expands it
        group[0].click()
    browser.find_element("css selector", f"#canvas g.item[data-v='{node['v']}']").click()
    highlighted = browser.find_elements("css selector", "#canvas g.item.fwd")
    assert [e.get_attribute("data-v") for e in highlighted] == [node["f"]]
    assert "differentiates" in browser.find_element("css selector", "#details").text.lower()

    # a kernel: its ops, its source with the lines of each op marked, its place in the memory plan
    kernel = next(iter(payload["kernels"]))
    _open(browser, page, f"#kernels/k:{kernel}")
    text = browser.find_element("css selector", "#details").text
    assert f"kernel {kernel}" in text and "generated source" in text.lower() and "memory plan" in text.lower()
    assert browser.find_elements("css selector", "#ksrc div[data-op='0']")
    assert browser.find_element("css selector", "#memstep").get_attribute("visibility") == "visible"  # its step

    # search by op finds nodes
    box = browser.find_element("css selector", "#search")
    box.send_keys("matmul")
    assert browser.find_elements("css selector", "#results div[data-view]")
    for tab in browser.find_elements("css selector", "#chart-tabs button"):
        tab.click()
        assert browser.find_element("css selector", "#chart").text
    assert _errors(browser) == []
    browser.save_screenshot(str(tmp_path / f"{name}.png"))


def test_a_screenshot_for_the_readme(browser, tmp_path, accept):
    page = str(tmp_path / "digits_mlp.html")
    assert main(["explore", os.path.join(ROOT, "examples", "digits_mlp.py"), "-o", page]) == 0
    _open(browser, page)
    box = browser.find_element("css selector", "#search")  # search by source line: file:line, or its text
    for query in ("digits_mlp.py:17", "self.fc1(x)"):
        box.clear()
        box.send_keys(query)
        hits = [d.text for d in browser.find_elements("css selector", "#results div[data-view]")]
        assert hits and all("digits_mlp.py:17" in h for h in hits), hits
    box.send_keys("\ue007")  # Enter: go to the first hit
    assert browser.find_element("css selector", "#canvas g.item.sel")

    _open(browser, page, "#%fc1.weight.next")  # an optimizer update: in the training step, linked to its param
    assert browser.find_element("css selector", "#views button.on").text == "train"
    assert browser.find_element("css selector", "#canvas g.item.fwd").get_attribute("data-v") == "fc1.weight"
    assert "updates" in browser.find_element("css selector", "#details").text.lower()

    _open(browser, page, "#%grad.fc1.weight")  # the README's command and link
    assert browser.find_element("css selector", "#canvas g.item.fwd").get_attribute("data-v") == "fc1.matmul"
    assert [e.get_attribute("data-v") for e in browser.find_elements("css selector", "#canvas g.item.sel")] == \
        ["grad.fc1.weight"]
    assert _errors(browser) == []
    shot = SCREENSHOT if accept else str(tmp_path / "explore.png")  # --accept: the README's picture too
    browser.save_screenshot(shot)
    assert os.path.getsize(shot) > 10_000


def test_a_model_without_a_loss_has_its_forward_and_kernels(browser, tmp_path, capsys):
    model = tmp_path / "plain.py"
    model.write_text("import gradfuse as gf\nfrom gradfuse import nn\n"
                     "model = gf.Model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "
                     "inputs={'x': 'f32[N,4]'})\n")
    page = str(tmp_path / "plain.html")
    assert main(["explore", str(model), "-o", page, "--dtype", "f64"]) == 0
    assert main(["explore", str(model), "-o", page, "--gradcheck"]) == 1
    assert "no loss" in capsys.readouterr().err
    _open(browser, page, "#kernels/%0")
    assert [b.text for b in browser.find_elements("css selector", "#views button")] == ["forward", "kernels"]
    assert browser.find_element("css selector", "#canvas g.item.sel").get_attribute("data-v") == "0"
    assert "f64[N,8]" in browser.find_element("css selector", "#details h2").text
    browser.find_element("xpath", "//nav[@id='chart-tabs']/button[text()='saved for backward']").click()
    assert "no backward" in browser.find_element("css selector", "#chart").text
    assert _errors(browser) == []


def test_kernel_times_and_gradient_health_are_drawn(browser, tmp_path):
    page = str(tmp_path / "mlp.html")
    assert main(["explore", os.path.join(ROOT, "examples", "digits_mlp.py"), "-o", page, "--batch", "32",
                 "--profile", "--gradcheck"]) == 0
    html = open(page, encoding="utf-8").read()
    payload = json.loads(re.search(r'id="payload">(.*?)</script>', html, re.S).group(1).replace("<\\/", "</"))
    assert set(payload["profile"]["ms"]) == set(payload["kernels"])  # every kernel timed, by its name in the graph
    assert [h["layer"] for h in payload["health"]] == ["fc1", "fc2", "loss"]
    assert {c["name"]: c["verdict"] for c in payload["gradcheck"]} == {p: "ok" for p in ("fc1.weight", "fc1.bias",
                                                                                          "fc2.weight", "fc2.bias")}
    _open(browser, page)
    for tab in ("kernel times", "gradient health"):
        browser.find_element("xpath", f"//nav[@id='chart-tabs']/button[text()='{tab}']").click()
        assert len(browser.find_elements("css selector", "#chart g.bar")) >= 3
    assert "fc1.weight" in browser.find_element("css selector", "#chart table").text  # the gradient check
    browser.find_element("xpath", "//nav[@id='chart-tabs']/button[text()='kernel times']").click()
    browser.find_element("css selector", "#chart g.bar").click()  # the slowest kernel opens
    assert browser.find_element("css selector", "#details h2").text.startswith("kernel ")
    assert _errors(browser) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
