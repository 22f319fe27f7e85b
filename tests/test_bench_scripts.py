"""Aggregation of benchmark scripts that have no test file of their own (bench_sharding): the lines
written into the docs. The robotics scripts' tests are in tests/robotics/test_bench_robotics.py."""

from __future__ import annotations


def test_sharding_command_line_names_every_non_default_option(load_script):
    """Regression: --warmup and --strategies were left out of the command printed into the docs."""
    sharding = load_script("bench_sharding")
    ap = sharding.parser()
    assert sharding.command_line(ap.parse_args([]), ap) == "python scripts/bench_sharding.py"
    args = ap.parse_args(["--width", "64", "--warmup", "1", "--strategies", "ddp", "zero3"])
    assert sharding.command_line(args, ap) == ("python scripts/bench_sharding.py --width 64 --warmup 1 "
                                               "--strategies ddp zero3")
