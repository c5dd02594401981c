"""The benchmark's command line: block size and extra config keys, and the errors that name a bad one."""
import pytest

from benchmarks import bench_attention as bench


def test_block_size_and_config_reach_the_shapes():
    args = bench.parse_args(["--tiny", "--device", "cpu", "--block-size", "16",
                             "--config", '{"moba_encoder_top_k_left": 20, "moba_encoder_top_k_right": 24}'])
    assert args.shapes.block == 16
    cfg = bench.moba_config(args.shapes, "shared", args.gate)
    assert (cfg.moba_block_size, cfg.moba_encoder_top_k_left, cfg.moba_encoder_top_k_right) == (16, 20, 24)
    # the correctness check runs with the same keys
    assert args.shapes.check_cfg["moba_encoder_top_k_right"] == 24


@pytest.mark.parametrize("argv, message", [
    (["--config", "{not json"], "--config: not JSON"),
    (["--config", "[1, 2]"], "expected a JSON object"),
    (["--config", '{"moba_block_size": 16}'], "set moba_block_size with its own option"),
    (["--block-size", "24"], "moba_block_size=24"),
    (["--config", '{"moba_encoder_top_k_left": 9, "moba_encoder_top_k_right": 3}'], "moba_encoder_top_k_right=3"),
])
def test_bad_block_size_or_config_is_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--device", "cpu", *argv])
    assert message in capsys.readouterr().err
