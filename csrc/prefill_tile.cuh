// What one prefill CTA computes, shared by the mma.sync kernel (prefill.cuh) and the Hopper kernel
// (prefill_sm90.cuh): packed rows [row0, row0 + rows) of kernel tile i_t and KV head i_hk (row r:
// token r / G, query head r % G of the group) against the tile's list of selected blocks, walked
// in chunks of BN keys.
#pragma once

#include "common.cuh"
#include "params.h"

namespace moba {

struct PrefillTile {
  int64_t i_req, i_q0;  // request, first query row of the tile
  int pos0;             // position of the tile's first token
  int n_rows;           // packed rows of the whole tile (tokens x group)
  int min_pos, max_pos; // positions of the CTA's first and last query
  int n_keys;           // keys of the selected blocks
  int b_shift;          // log2 of the block size (a power of two)
  const int* list;      // selected blocks, ascending
  const int* bt;        // the request's block table

  // Position of the k-th selected key.
  MOBA_DEVICE int key_pos(int k) const {
    return (list[k >> b_shift] << b_shift) + (k & ((1 << b_shift) - 1));
  }

  // Lists are ascending and end with the tile's own blocks, so both bounds below are found by
  // walking back from the end over those few entries.
  // Chunks of BN keys that hold a key at or before the CTA's last query.
  MOBA_DEVICE int live_chunks(int BN) const {
    int n = (n_keys + BN - 1) / BN;
    while (n > 0 && key_pos((n - 1) * BN) > max_pos) --n;
    return n;
  }
  // The first of the n_live chunks that needs the causal mask: its last key lies past the CTA's
  // first query, or it is the partial last chunk of the list.
  MOBA_DEVICE int first_masked_chunk(int BN, int n_live) const {
    int c = n_live;
    if (c > 0 && c * BN > n_keys) --c;
    while (c > 0 && key_pos(c * BN - 1) > min_pos) --c;
    return c;
  }
};

// False when the CTA has no rows (row0 past the tile's last row).
MOBA_DEVICE bool prefill_tile(const AttnParams& p, int i_t, int i_hk, int row0, int rows, PrefillTile& t) {
  const int G = p.group;
  t.n_rows = p.tile_len[i_t] * G;
  if (row0 >= t.n_rows) return false;
  t.i_req = p.tile_req[i_t];
  t.i_q0 = p.tile_q0[i_t];
  t.pos0 = p.tile_pos0[i_t];
  const int64_t i_row = p.tile_index[i_t];
  t.list = p.blocks + i_row * p.stride_lt + i_hk * p.stride_lh;
  t.n_keys = p.nblocks[i_row * p.stride_nt + i_hk] * p.block_size;
  t.bt = p.block_table + t.i_req * p.stride_bt;
  t.min_pos = t.pos0 + row0 / G;
  t.max_pos = t.pos0 + min(t.n_rows - 1, row0 + rows - 1) / G;
  t.b_shift = __ffs(p.block_size) - 1;
  return true;
}

}  // namespace moba
