"""The suite's own tools: the interpreter's case selection (``one_per_path``) and the
kernel-path comparison (``tests/kernel_paths.py``) that shows a faster suite covers no less."""

import itertools
import json

import kernel_paths
from conftest import pick_one_per_path


def test_one_case_per_path_and_every_value_still_runs():
    axes = (["f32", "bf16"], ["neox", "interleaved", "deepseek"], ["contiguous", "fused", "bhsd"], [1.0, 4.0, 40.0])
    cases = list(itertools.product(*axes))
    path = lambda c: (c[0], c[1], c[2] == "bhsd")  # noqa: E731
    picked = pick_one_per_path(cases, path)
    assert len(picked) == len({path(c) for c in cases}) == 12
    assert {path(c) for c in picked} == {path(c) for c in cases}
    for i, values in enumerate(axes):  # views and scales, which select no code, still all run
        assert {c[i] for c in picked} == set(values), i


def _write(path, tests, random=()):
    with open(path, "w") as f:
        json.dump({"tests": tests, "random": list(random)}, f)


def test_comparison_fails_on_a_lost_fixed_path_only(tmp_path, capsys):
    before, after = str(tmp_path / "before.json"), str(tmp_path / "after.json")
    _write(before, {"t::a": ["A", "B"], "t::b": ["B"], "t::sweep": ["R"]}, random=["t::sweep"])
    _write(after, {"t::a": ["A", "B"]})
    assert kernel_paths._report(before, after) == 0  # B still runs; R was only a random draw
    _write(after, {"t::a": ["A"]})
    assert kernel_paths._report(before, after) == 1
    assert "lost: B <- t::a" in capsys.readouterr().out
    # xdist workers' files are merged
    _write(after, {"t::a": ["A"]})
    _write(after + ".gw1", {"t::b": ["B"]})
    assert kernel_paths._report(before, after) == 0
