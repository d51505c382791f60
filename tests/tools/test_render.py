"""Pictures and HTML reports: grouped by module, coloured by a metric, blocks collapsed;
checked in a real headless browser."""

import os
import re
import shutil
from pathlib import Path

import pytest
from browser import chrome

from edgefx.tools.layers import program_graph
from edgefx.tools.render import (
    PALETTE,
    RenderError,
    collapse,
    html_page,
    render_graph,
    strip_xml_header,
    svg_of,
)

pytest.importorskip("graphviz")
if shutil.which("dot") is None:  # a missing dot must fail, not skip: say what to install
    pytest.fail("graphviz's dot is missing: apt-get install graphviz", pytrace=False)


def test_repeated_blocks_collapse_and_expand(deit_tiny, resnet18):
    graph = program_graph(deit_tiny)
    groups = {g.id: g for g in collapse(graph).values()}
    assert list(groups) == ["group:blocks.0..blocks.11"]
    assert len(groups["group:blocks.0..blocks.11"].members) == 12
    svg = svg_of(graph)
    assert "blocks.0 … blocks.11" in svg and "12x Block" in svg
    assert "blocks.5.attn" not in svg  # folded away
    expanded = svg_of(graph, expand=True)
    assert "blocks.5.attn.qkv" in expanded and "collapsed" not in expanded
    # resnet18: layer1.0 and layer1.1 are one structure; layer2.0 has a downsample
    resnet = {g.id for g in collapse(program_graph(resnet18[2])).values()}
    assert resnet == {"group:layer1.0..layer1.1"}


def test_a_24_block_model_stays_a_readable_picture():
    """24 ViT blocks collapse into one box: the picture is a screen tall, not 30."""
    timm = pytest.importorskip("timm")
    import torch

    from edgefx.frontend import capture

    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=32, depth=24, num_heads=2, num_classes=10
    ).eval()
    graph = program_graph(capture(model, (torch.randn(1, 3, 32, 32),), dynamic_batch=False))

    def size(svg: str) -> tuple[int, int]:
        found = re.search(r'<svg width="(\d+)pt" height="(\d+)pt"', svg)
        return int(found.group(1)), int(found.group(2))

    collapsed, expanded = svg_of(graph), svg_of(graph, expand=True)
    assert "blocks.0 … blocks.23" in collapsed and "24x Block" in collapsed
    assert collapsed.count('class="node"') <= 12 < 200 < expanded.count('class="node"')
    assert size(collapsed)[1] < 1000 and size(expanded)[1] > 10 * size(collapsed)[1]


def test_boxes_are_coloured_by_the_metric_with_a_legend(resnet18):
    graph = program_graph(resnet18[2])
    dot = render_graph(graph, metric="macs", expand=True)
    source = dot.source
    assert "share of MACs" in source  # the legend
    # the costliest conv gets the hottest colour, a ReLU (no MACs) the coldest
    hottest = max(graph.segments, key=lambda s: s.macs)

    def fill_of(node_id: str) -> str:
        start = re.search(rf'^\s*"?{re.escape(node_id)}"? \[', source, re.M).end()
        return re.search(r'fillcolor="(#[0-9a-f]+)"', source[start:]).group(1)

    assert fill_of(hottest.id) == PALETTE[-1]
    assert fill_of("layer1.0.relu") == PALETTE[0]
    assert "cluster_layer1.0" in source  # grouped by source module


def test_unknown_metric_and_missing_data_are_clear_errors(resnet18):
    graph = program_graph(resnet18[2])
    with pytest.raises(RenderError, match="unknown metric 'flops'") as info:
        svg_of(graph, metric="flops")
    assert "macs, params, channels" in str(info.value)
    with pytest.raises(RenderError, match="no data for metric 'latency'"):
        svg_of(graph, metric="latency")


def test_channels_kept_colouring_of_a_pruned_model(resnet18_pruned):
    from edgefx.tools.diff import diff_graphs

    before, after = resnet18_pruned
    diff = diff_graphs(program_graph(before), program_graph(after))
    svg = svg_of(diff.b, metric="channels", data=diff.channels_kept(), expand=True)
    assert "channels kept" in svg and "channels: 1.00" in svg and "channels: 0." in svg


def screenshot(page: Path, png: Path) -> dict:
    """Open ``page`` in headless chromium, save a screenshot, and return what the page
    shows."""
    from selenium.webdriver.common.by import By

    with chrome() as browser:
        browser.get(page.resolve().as_uri())
        assert browser.save_screenshot(str(png))
        svg = browser.find_element(By.CSS_SELECTOR, ".picture svg")
        return {
            "title": browser.title,
            "svg_size": svg.size,
            "boxes": len(browser.find_elements(By.CSS_SELECTOR, ".picture svg g.node")),
            "svg_text": svg.text,
            "tables": len(browser.find_elements(By.CSS_SELECTOR, "pre.table")),
            "errors": [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
            if hasattr(browser, "get_log")
            else [],
        }


def test_html_report_opens_in_a_real_browser(capsys, tmp_path):
    from edgefx.tools.cli import main

    page = tmp_path / "report.html"
    assert main(["inspect", "cli_models:deit_tiny", "--static-batch", "--html", str(page)]) == 0
    text = page.read_text()
    # offline: nothing to fetch (the only URLs are XML namespaces inside the SVG)
    assert "<script" not in text and "<link" not in text and "src=" not in text
    assert "@import" not in text and "url(" not in text
    png = Path(os.environ.get("EDGEFX_SCREENSHOT_DIR", tmp_path)) / "inspect_deit_tiny.png"
    shown = screenshot(page, png)
    assert shown["title"] == "edgefx inspect deit_tiny"
    assert shown["svg_size"]["width"] > 200 and shown["svg_size"]["height"] > 200
    # inputs, outputs, legend and the model's boxes, the 12 blocks drawn as one
    assert shown["boxes"] >= 8 and shown["tables"] >= 1 and not shown["errors"]
    assert "blocks.0 … blocks.11" in shown["svg_text"] and "12x Block" in shown["svg_text"]
    assert png.stat().st_size > 10_000


def test_html_page_is_self_contained():
    page = html_page("t", [("a", strip_xml_header('<?xml version="1.0"?>\n<svg></svg>'))])
    assert page.startswith("<!DOCTYPE html>") and "<?xml" not in page and "<svg></svg>" in page
