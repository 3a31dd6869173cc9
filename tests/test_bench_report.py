"""bench/report.py: the docs' tables are rendered from the benchmark's JSON, device time
where the row has it, and only the marked blocks of a page change."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
report = pytest.importorskip("report")


def _data():
    prefill = {"shape": "llama3-8b-prefill", "kind": "prefill", "tokens": 16384, "layers": 32, "floor_us": 100.0,
               "table_us": 32.0, "ours_us": 108.0, "ours_graph_us": 104.0, "liger_us": 130.0,
               "liger_graph_us": 110.0, "torch_compile_us": 121.0}
    decode = {"shape": "decode-64", "kind": "decode", "tokens": 64, "layers": 32, "floor_us": 0.44,
              "table_us": 16.0, "ours_us": 2.4, "liger_us": 2.1}
    qk = {"shape": "qwen3-qknorm-prefill", "kind": "qknorm", "tokens": 16384, "layers": 36, "floor_us": 100.0,
          "table_us": 40.0, "ours_us": 107.5}
    meta = {"device": "GPU", "torch": "2", "triton": "3", "dtype": "bfloat16", "copy_tbps": 3.0,
            "empty_kernel_us": 0.97}
    return {"meta": meta, "rows": [prefill, decode, qk], "host_us": {"trivial torch op (q.add_(0))": 10.0,
                                                                  "ours apply_rope_ (positions)": 17.0}}


def test_kernel_table_takes_device_time_and_its_ratio():
    table = report.kernel_table(_data()["rows"])
    line = next(ln for ln in table.splitlines() if ln.startswith("| Llama"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:5] == ["100.0", "**104.0**", "1.040", "110.0"]  # graph figures, not the eager ones
    assert cells[5] == "-"  # only an eager figure for torch.compile: not mixed into device time
    dec = next(ln for ln in table.splitlines() if ln.startswith("| decode, 64"))
    assert "**2.40**" in dec and "2.10" in dec
    assert "qknorm" not in table and "prefill, 16384 tok |" not in table


def test_with_table_adds_the_table_spread_over_the_layers():
    table = report.table_table(_data()["rows"])
    line = next(ln for ln in table.splitlines() if ln.startswith("| Llama"))
    assert "| 111.0 |" in line  # Liger 110 in a graph + 32 us / 32 layers


def test_host_ratio_is_to_the_trivial_op():
    assert "| ours apply_rope_ (positions) | 17.00 | 1.70 |" in report.host_table(_data()["host_us"])


def test_update_rewrites_only_marked_blocks():
    page = ("# Title\nprose 1\n<!-- table:qknorm -->\nold table\n<!-- /table -->\nprose 2\n"
            "<!-- table:meta -->\nold\n<!-- /table -->\n")
    out = report.update(page, _data())
    assert out.startswith("# Title\nprose 1\n<!-- table:qknorm -->\n| shape |")
    assert "old" not in out and "prose 2\n<!-- table:meta -->\nGPU, torch 2" in out
    assert "**107.5** | 1.075 |" in out
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        report.update("<!-- table:nope -->\nx\n<!-- /table -->", _data())
