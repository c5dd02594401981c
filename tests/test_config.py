import json

import pytest

from moba_backend.config import (MobaConfig, MobaConfigError, attention_backend_from_env,
                                 parse_moba_config)


def test_defaults_match_spec():
    c = parse_moba_config(None)
    assert (c.moba_block_size, c.moba_encoder_top_k_left, c.moba_encoder_top_k_right) == (128, 50, 60)
    assert (c.moba_decoder_top_k_left, c.moba_decoder_top_k_right) == (100, 120)
    assert c.encoder_seq_limit == 50 * 128 and c.decoder_seq_limit == 100 * 128
    assert (c.moba_sink_blocks, c.moba_local_blocks, c.moba_query_tile) == (1, 1, 128)
    assert c.moba_dense_layers == () and c.moba_max_seq_length is None
    assert c.moba_gate in ("mean", "max", "minmax", "learned")
    assert c.moba_tile_select in ("token", "union", "shared")


def test_parse_json_and_aliases():
    c = parse_moba_config(json.dumps({"plas_block_size": 64, "moba_encoder_top_k_left": 4,
                                      "moba_encoder_top_k_right": 8, "moba_dense_layers": [0, 3]}))
    assert c.moba_block_size == 64 and c.moba_dense_layers == (0, 3)
    assert c.is_dense_layer(3) and not c.is_dense_layer(1)


@pytest.mark.parametrize("raw, needle", [
    ({"moba_blok_size": 64}, "moba_blok_size"),
    ({"moba_block_size": 96}, "moba_block_size=96: must be a power of two >= 16"),
    ({"moba_block_size": 8}, "moba_block_size=8"),
    ({"moba_encoder_top_k_left": 70}, "moba_encoder_top_k_right=60: must be >= moba_encoder_top_k_left=70"),
    ({"moba_decoder_top_k_left": 10, "moba_decoder_top_k_right": 2}, "moba_decoder_top_k_right=2"),
    ({"moba_use_encoder_seq_limit": 100}, "moba_use_encoder_seq_limit=100: must be >= "),
    ({"moba_use_decoder_seq_limit": 10}, "moba_use_decoder_seq_limit=10"),
    ({"moba_block_size": "128"}, "moba_block_size"),
    ({"moba_gate": "median"}, "moba_gate"),
    ({"moba_tile_select": "all"}, "moba_tile_select"),
    ({"moba_query_tile": 100}, "moba_query_tile=100"),
    ({"moba_sink_blocks": -1}, "moba_sink_blocks=-1"),
    ({"moba_dense_layers": [-2]}, "moba_dense_layers"),
    ({"moba_encoder_top_k_left": 1, "moba_encoder_top_k_right": 2}, "forced blocks"),
    ({"plas_block_size": 64, "moba_block_size": 64}, "given twice"),
    ({"moba_max_seq_length": 0}, "moba_max_seq_length=0"),
    ({"plas_block_size": 100}, "moba_block_size (given as plas_block_size)"),
    ({"plas_gate": "median"}, "moba_gate (given as plas_gate)"),
])
def test_bad_config_names_key(raw, needle):
    with pytest.raises(MobaConfigError) as e:
        parse_moba_config(raw)
    assert needle in str(e.value)


def test_bad_json():
    with pytest.raises(MobaConfigError, match="not valid JSON"):
        parse_moba_config("{moba_block_size: 1")
    with pytest.raises(MobaConfigError, match="JSON object"):
        parse_moba_config("[1, 2]")


def test_max_seq_length_is_enforced():
    c = MobaConfig(moba_max_seq_length=1000)
    c.check_seq_len(1000)
    with pytest.raises(MobaConfigError, match="exceeds moba_max_seq_length=1000"):
        c.check_seq_len(1001)


def test_backend_env():
    assert attention_backend_from_env({"FD_ATTENTION_BACKEND": "MOBA_ATTN"})
    assert attention_backend_from_env({"FD_ATTENTION_BACKEND": "PLAS_ATTN"})
    assert not attention_backend_from_env({})
    assert not attention_backend_from_env({"FD_ATTENTION_BACKEND": "FLASH_ATTN"})
    with pytest.raises(MobaConfigError, match="MOBA_ATTN"):
        attention_backend_from_env({"FD_ATTENTION_BACKEND": "MOBA"})
