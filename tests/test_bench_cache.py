"""bench/bench_cache.py's pure-Python parts, on a CPU: the paging (block tables, slots, and
FlashInfer's view of the same), the bytes of the floor, and the per-column check (against a
pure-torch stand-in for the fused op written from its spec)."""

import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
bc = pytest.importorskip("bench_cache")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("starts,n", [([0], 8192), ([5, 131071, 77, 4096, 16, 17], 1), ([0, 0, 0, 0], 2048),
                                      ([3, 100], 40)])
def test_paging_slots_follow_the_block_tables(starts, n):
    p = bc.make_paging(starts, n, num_blocks=16384, gen=_gen())
    nseq, bs = len(starts), bc.BLOCK_SIZE
    assert p.positions.tolist() == [s + i for s in starts for i in range(n)]
    assert p.block_table.shape == (nseq, p.width) and p.width == (max(starts) + n - 1) // bs + 1
    table = p.block_table.long()
    for b in range(nseq):  # each row: distinct blocks of the cache
        assert table[b].unique().numel() == p.width and int(table[b].min()) >= 0 and int(table[b].max()) < 16384
    want = table[p.seq, p.positions // bs] * bs + p.positions % bs
    assert torch.equal(p.slots, want)
    assert p.slots.unique().numel() == p.slots.numel()  # no two tokens share a slot
    # FlashInfer's paging lands every token on the same slot
    page = p.indices.long()[p.indptr.long()[p.batch_indices.long()] + p.positions_i32.long() // bs]
    assert torch.equal(page * bs + p.positions_i32.long() % bs, p.slots)
    assert p.indptr.dtype == p.indices.dtype == p.batch_indices.dtype == p.positions_i32.dtype == torch.int32


def test_paging_written_blocks_are_distinct_across_sequences():
    p = bc.make_paging([7 * 16 + 3] * 64, 1, num_blocks=128, gen=_gen(1))  # same position, 64 sequences
    blocks = p.slots // bc.BLOCK_SIZE
    assert blocks.unique().numel() == 64
    assert bool((p.slots % bc.BLOCK_SIZE == 3).all())


def test_paging_rows_and_refusals():
    gen = _gen(2)
    decode = bc.row_paging("decode-64", gen)
    assert decode.positions.numel() == 64 and int(decode.positions.max()) < bc.MAX_POS
    assert decode.width <= bc.MAX_POS // bc.BLOCK_SIZE
    prefill = bc.row_paging("prefill-8k", gen)
    assert prefill.positions.tolist() == list(range(8192)) and prefill.width == 512
    four = bc.row_paging("prefill-8k", gen, prefill_seqs=4)
    assert four.positions.tolist() == list(range(2048)) * 4 and four.indptr.tolist() == [0, 128, 256, 384, 512]
    with pytest.raises(ValueError):
        bc.row_paging("prefill-8k", gen, prefill_seqs=3)
    with pytest.raises(ValueError):
        bc.make_paging([0], 17 * 16, num_blocks=16)  # wider than the cache
    # the same row gets the same paging in every model's run
    a = bc.row_paging("decode-8", torch.Generator().manual_seed(zlib.crc32(b"decode-8")))
    b = bc.row_paging("decode-8", torch.Generator().manual_seed(zlib.crc32(b"decode-8")))
    assert torch.equal(a.slots, b.slots)


def test_floor_bytes_by_hand():
    # Llama-3-8B bf16: q 32x128 read + written, k and v 8x128 read, both written to the cache
    assert bc.floor_parts("llama3-8b", 1, "bf16") == {"q": 2 * 32 * 128 * 2, "kv_read": 2 * 8 * 128 * 2,
                                                      "cache_write": 2 * 8 * 128 * 2}
    # FP8: all of q read (bf16) and q_out written (1 byte); the cache 1 byte an entry
    assert bc.floor_bytes("llama3-8b", 64, "fp8") == 64 * (32 * 128 * 3 + 8 * 128 * 2 * 2 + 8 * 128 * 2)
    # MLA bf16: q_pe 128x64 read + written, kv_c + k_pe read, 576 written
    assert bc.floor_bytes("deepseek-v3", 8192, "bf16") == 8192 * (2 * 128 * 64 * 2 + 576 * 2 + 576 * 2)
    # MLA FP8: q of 512 + 64 read and q_out written, kv 576 read, 576 bytes written
    assert bc.mla_q_width("fp8") == 576 and bc.mla_q_width("fp8", 128) == 192 and bc.mla_q_width("bf16") == 192
    assert bc.floor_bytes("deepseek-v3", 1, "fp8") == 128 * 576 * 3 + 576 * 2 + 576
    assert bc.floor_bytes("deepseek-v3", 1, "fp8", q_width=192) == 128 * 192 * 3 + 576 * 2 + 576


def test_flashinfer_table_and_kernel_counts():
    assert bc.fi_table_bytes("llama3-8b") == 131072 * 128 * 4 == 64 * 2**20
    assert bc.fi_table_bytes("deepseek-v3") == 32 * 2**20
    assert bc.expected_kernels("ours", "llama3-8b", "fp8") == 1
    assert bc.expected_kernels("ours", "deepseek-v3", "fp8") == 1  # q_nope and q_pe to q_out in the same launch
    assert bc.expected_kernels("flashinfer", "deepseek-v3", "bf16") == 2  # rope + append
    assert bc.expected_kernels("flashinfer", "deepseek-v3", "fp8") == 1
    assert bc.expected_kernels("liger", "llama3-8b", "bf16") == 2
    assert bc.expected_kernels("liger", "deepseek-v3", "bf16") is None  # + its copies of strided views


def test_q_heads_per_program():
    assert bc.q_heads_per_program(32, [128]) == 32
    assert bc.q_heads_per_program(128, [512, 64]) == 4
    assert bc.q_heads_per_program(128, [128, 64]) == 16
    assert bc.q_heads_per_program(3, [16]) == 4  # at most the heads, rounded up to a power of two


# ------------------------------------------------------------------------------------------
# The check, against a pure-torch stand-in for the fused ops (their spec, /work/spec_cache.md)
# ------------------------------------------------------------------------------------------
def _quant(x, scale):
    return (x.float() / float(scale)).clamp(-bc.FP8_MAX, bc.FP8_MAX).to(bc.FP8)


def _write(cache, blk, off, x, scale, lo=None, hi=None):
    sl = slice(lo, hi)
    if cache.dtype == bc.FP8:
        cache.view(torch.uint8)[blk, off, ..., sl] = _quant(x, scale).view(torch.uint8)
    else:
        cache[blk, off, ..., sl] = x.to(cache.dtype)


def _fake_gqa(shift=0):
    from yarn_triton.reference import rope_reference

    def op(q, k, v, positions, params, k_cache, v_cache, slot_mapping, *, layout="neox", k_scale=None,
           v_scale=None, q_out=None, q_scale=None, **kw):
        rq, rk = rope_reference(q, k, positions, params, layout=layout)
        if q_out is None:
            q.copy_(rq)
        else:
            q_out.view(torch.uint8).copy_(_quant(rq, q_scale).view(torch.uint8))
        s = slot_mapping + shift
        bs = k_cache.shape[1]
        _write(k_cache, s // bs, s % bs, rk, k_scale)
        _write(v_cache, s // bs, s % bs, v, v_scale)
        return q_out if q_out is not None else q, k_cache, v_cache
    return op


def _fake_mla(positions_shift=0):
    from yarn_triton.reference import rope_reference

    def op(q_pe, k_pe, kv_c, positions, params, kv_cache, slot_mapping, *, layout="deepseek", scale=None,
           q_out=None, q_scale=None, q_nope=None, **kw):
        rq, rk = rope_reference(q_pe, k_pe.unsqueeze(-2), positions + positions_shift, params, layout=layout)
        if q_out is None:
            q_pe.copy_(rq)
        else:  # q_nope's channels, then the rotated q_pe
            q_out.view(torch.uint8).copy_(_quant(torch.cat((q_nope, rq), -1), q_scale).view(torch.uint8))
        bs, lat = kv_cache.shape[1], kv_c.shape[-1]
        s = slot_mapping
        _write(kv_cache, s // bs, s % bs, kv_c, scale, None, lat)
        _write(kv_cache, s // bs, s % bs, rk.squeeze(-2), scale, lat, None)
        return q_pe, kv_cache
    return op


def _torch_store(slots, kv_parts=(), kv_scales=None, q_parts=(), q_scale=None, block_size=bc.BLOCK_SIZE):
    """bench_cache.cache_store, spelled out in torch."""
    for i, (src, cache) in enumerate(kv_parts):
        keep = slots >= 0
        s = slots[keep]
        _write(cache, s // block_size, s % block_size, src[keep], kv_scales[i] if kv_scales else None)
    for src, dst in q_parts:
        if dst.dtype == bc.FP8:
            dst.view(torch.uint8).copy_(_quant(src, q_scale).view(torch.uint8))
        else:
            dst.copy_(src)


def _row(model, cache, row="decode-8"):
    import yarn_triton  # noqa: F401

    paging = bc.row_paging(row, _gen(3), max_pos=4096, num_blocks=512)
    caches = bc.Caches(model, cache, "cpu", num_blocks=512)
    return bc.Row(model, cache, row, caches, paging, "cpu", _gen(4))


@pytest.mark.parametrize("model", list(bc.MODELS))
@pytest.mark.parametrize("cache", bc.CACHES)
def test_check_passes_a_correct_op_and_catches_wrong_ones(monkeypatch, model, cache):
    import yarn_triton as yt

    monkeypatch.setattr(yt, "apply_rope_and_cache_", _fake_gqa(), raising=False)
    monkeypatch.setattr(yt, "apply_mla_rope_and_cache_", _fake_mla(), raising=False)
    monkeypatch.setattr(bc, "cache_store", _torch_store)
    r = _row(model, cache)
    methods = r.methods()
    fn, layout, _ = methods["ours"]
    chk = r.check(fn, layout)
    assert chk["ok"], chk
    assert chk["stray_bytes"] == 0 and chk["q_err"] < bc.TOL[cache] and chk["k_err"] < bc.TOL[cache]
    if model == "deepseek-v3" and cache == "fp8":
        assert r.q_width == 576
    # inputs restored after a check: a second one sees the same
    assert r.check(fn, layout) == chk
    # wrong: one slot further on (stray bytes, wrong entries); wrong positions (rope off)
    if model == "llama3-8b":
        monkeypatch.setattr(yt, "apply_rope_and_cache_", _fake_gqa(shift=1))
    else:
        monkeypatch.setattr(yt, "apply_mla_rope_and_cache_", _fake_mla(positions_shift=1))
    fn, layout, _ = r.methods()["ours"]
    bad = r.check(fn, layout)
    assert not bad["ok"]
    if model == "llama3-8b":
        assert bad["stray_bytes"] > 0
    else:
        assert bad["k_err"] > bc.TOL[cache]


def test_ours_skips_with_a_message_until_the_op_lands(monkeypatch):
    import yarn_triton as yt

    monkeypatch.delattr(yt, "apply_rope_and_cache_", raising=False)
    fn, _, note = _row("llama3-8b", "bf16").methods()["ours"]
    assert fn is None and "apply_rope_and_cache_" in note


def test_csv_and_table(tmp_path, capsys):
    rows = [{"model": "llama3-8b", "cache": "fp8", "row": "decode-1", "tokens": 1, "floor_us": 0.02, "ours_us": 2.0,
             "ours_x_floor": 100.0, "unfused_us": 3.0, "fuse_gain": 1.5, "flashinfer_us": 2.5, "fi_over_ours": 1.25,
             "ours_kernels": ["k"], "ours_check": {"ok": False, "q_err": 1.0, "k_err": 0, "v_err": 0,
                                                   "stray_bytes": 0}, "fi_table_bytes": 64 * 2**20}]
    bc.write_csv(tmp_path / "x.csv", rows)
    text = (tmp_path / "x.csv").read_text()
    assert text.splitlines()[0].startswith("model,cache,row,tokens,floor_us,ours_us")
    bc.print_table({"device": "GPU", "copy_tbps": 3.0, "empty_kernel_us": 1.0, "fused_available": True}, rows)
    out = capsys.readouterr().out
    assert "2.00!" in out and "1.50" in out and "67108864 bytes (64 MiB)" in out


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the store kernel needs a GPU or Triton's interpreter")
@pytest.mark.parametrize("mla", [False, True])
def test_store_kernel_matches_torch(mla):
    """The unfused columns' Triton store against its torch spelling (bf16: the interpreter's
    fp32 -> e4m3 rounding is not the GPU's; FP8 is checked on the GPU by the benchmark)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(5)
    T, nb, bs = 6, 8, bc.BLOCK_SIZE
    slots = torch.tensor([3, -1, 17, 40, 127, 64], device=dev)
    if mla:
        kv = torch.randn(T, 576, device=dev, dtype=torch.bfloat16, generator=g)
        caches = [torch.zeros(nb, bs, 576, device=dev, dtype=torch.bfloat16) for _ in range(2)]
        parts = lambda c: [(kv[:, :512].unsqueeze(1), c[..., :512].unsqueeze(2)),  # noqa: E731
                           (kv[:, 512:].unsqueeze(1), c[..., 512:].unsqueeze(2))]
        q = torch.randn(T, 4, 192, device=dev, dtype=torch.bfloat16, generator=g)
        outs = [torch.zeros_like(q) for _ in range(2)]
        qparts = lambda o: [(q[..., :128], o[..., :128]), (q[..., 128:], o[..., 128:])]  # noqa: E731
    else:
        k, v = (torch.randn(T, 2, 64, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
        caches = [torch.zeros(2, nb, bs, 2, 64, device=dev, dtype=torch.bfloat16) for _ in range(2)]
        parts = lambda c: [(k, c[0]), (v, c[1])]  # noqa: E731
        q = torch.randn(T, 3, 64, device=dev, dtype=torch.bfloat16, generator=g)
        outs = [torch.zeros_like(q) for _ in range(2)]
        qparts = lambda o: [(q, o)]  # noqa: E731
    bc.cache_store(slots, parts(caches[0]), None, qparts(outs[0]))
    _torch_store(slots, parts(caches[1]), None, qparts(outs[1]))
    assert torch.equal(caches[0], caches[1]) and torch.equal(outs[0], outs[1])
    assert int(caches[0].count_nonzero()) > 0


# ------------------------------------------------------------------------------------------
# The FlashInfer column's plumbing (paging, table, q_out slices), against torch stand-ins for
# the binding's functions that follow FlashInfer's semantics (pos_enc.cuh, page.cuh)
# ------------------------------------------------------------------------------------------
def _fi_rotate(x, table, pos, interleave):
    half = table.shape[1] // 2
    cos, sin = table[pos, :half][:, None, :], table[pos, half:][:, None, :]
    xf = x.float()
    if interleave:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), -1).flatten(-2)
    else:
        a, b = xf[..., :half], xf[..., half:]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), -1)
    return out


def _fi_slots(idx, indptr, bidx, pos32, bs):
    page = idx.long()[indptr.long()[bidx.long()] + pos32.long() // bs]
    return page, pos32.long() % bs


class _FakeFlashInfer:
    """The binding's functions in torch (quant_scale multiplies, as FlashInfer's does)."""

    class rope:
        @staticmethod
        def cos_sin_cache_(q, k, table, pos, interleave):
            r = table.shape[1]
            q[..., :r] = _fi_rotate(q[..., :r], table, pos, interleave).to(q.dtype)
            k[..., :r] = _fi_rotate(k[..., :r], table, pos, interleave).to(k.dtype)

    class cache:
        @staticmethod
        def append_paged_kv_(k, v, kc, vc, idx, indptr, bidx, pos32):
            page, entry = _fi_slots(idx, indptr, bidx, pos32, kc.shape[1])
            kc[page, entry], vc[page, entry] = k, v

        @staticmethod
        def append_paged_mla_(ckv, kpe, ckv_cache, kpe_cache, idx, indptr, bidx, pos32):
            page, entry = _fi_slots(idx, indptr, bidx, pos32, ckv_cache.shape[1])
            ckv_cache[page, entry], kpe_cache[page, entry] = ckv, kpe

        @staticmethod
        def gqa_rope_quant_append_(q, k, v, q_out, kc, vc, table, pos, idx, indptr, bidx, pos32, sq, skv, interleave):
            q_out.view(torch.uint8).copy_(_quant(_fi_rotate(q, table, pos, interleave), 1 / sq).view(torch.uint8))
            page, entry = _fi_slots(idx, indptr, bidx, pos32, kc.shape[1])
            kc.view(torch.uint8)[page, entry] = _quant(_fi_rotate(k, table, pos, interleave), 1 / skv).view(torch.uint8)
            vc.view(torch.uint8)[page, entry] = _quant(v, 1 / skv).view(torch.uint8)

        @staticmethod
        def mla_rope_quant_append_(q_rope, q_nope, k_rope, k_nope, q_rope_out, q_nope_out, ckv_cache, kpe_cache,
                                   table, pos, idx, indptr, bidx, pos32, sq, skv, interleave):
            assert q_nope.shape[-1] == k_nope.shape[-1]  # FlashInfer's one no_rope_dim
            q_rope_out.view(torch.uint8).copy_(_quant(_fi_rotate(q_rope, table, pos, interleave), 1 / sq)
                                               .view(torch.uint8))
            q_nope_out.view(torch.uint8).copy_(_quant(q_nope, 1 / sq).view(torch.uint8))
            page, entry = _fi_slots(idx, indptr, bidx, pos32, ckv_cache.shape[1])
            kr = _fi_rotate(k_rope.unsqueeze(1), table, pos, interleave).squeeze(1)
            kpe_cache.view(torch.uint8)[page, entry] = _quant(kr, 1 / skv).view(torch.uint8)
            ckv_cache.view(torch.uint8)[page, entry] = _quant(k_nope, 1 / skv).view(torch.uint8)


def _fi_namespace(r):
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location(
        "fi_load", os.path.join(os.path.dirname(__file__), "..", "bench", "flashinfer", "load.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = mod.yarn_cos_sin_cache(r.params, 8192, "cpu")
    return types.SimpleNamespace(mod=mod, rope=_FakeFlashInfer.rope, cache=_FakeFlashInfer.cache, table=table)


@pytest.mark.parametrize("model", list(bc.MODELS))
@pytest.mark.parametrize("cache", bc.CACHES)
def test_flashinfer_column_plumbing(model, cache):
    r = _row(model, cache)
    fn, layout, note = r.methods(fi=_fi_namespace(r))["flashinfer"]
    assert ("one launch" in note) == (cache == "fp8")
    chk = r.check(fn, layout)
    assert chk["ok"], chk


def test_flashinfer_mla_fp8_needs_the_absorbed_q():
    paging = bc.row_paging("decode-8", _gen(3), max_pos=4096, num_blocks=512)
    r = bc.Row("deepseek-v3", "fp8", "decode-8", bc.Caches("deepseek-v3", "fp8", "cpu", num_blocks=512), paging,
               "cpu", _gen(4), fp8_q_nope=128)
    fn, _, note = r.methods(fi=_fi_namespace(r))["flashinfer"]
    assert fn is None and "q_nope" in note


class _FakeLiger:
    """LigerRopeFunction's contract on [B, H, S, D] views (in place when the [B, S, H, D]
    storage is contiguous, else on a copy), in torch."""

    @staticmethod
    def apply(q, k, cos, sin):
        from bench_rope import hf_apply

        outs = []
        for x in (q, k):
            xs = x.transpose(1, 2).contiguous()  # what Liger's rope_forward does
            rot = hf_apply(xs.transpose(1, 2).float(), xs.transpose(1, 2).float(), cos.float(), sin.float())[0]
            xs.copy_(rot.transpose(1, 2))
            outs.append(xs.transpose(1, 2))
        return tuple(outs)


@pytest.mark.parametrize("model", list(bc.MODELS))
@pytest.mark.parametrize("cache", bc.CACHES)
def test_liger_column_plumbing(monkeypatch, model, cache):
    monkeypatch.setattr(bc, "cache_store", _torch_store)
    r = _row(model, cache)
    fn, layout, _ = r.methods(liger=_FakeLiger)["liger"]
    assert layout == "neox"
    chk = r.check(fn, layout)
    assert chk["ok"], chk


@pytest.mark.parametrize("model", list(bc.MODELS))
@pytest.mark.parametrize("cache", bc.CACHES)
def test_moves_writes_the_fused_columns_bytes_unrotated(monkeypatch, model, cache):
    """The ``moves`` evidence column: k and v (MLA: kv_c, k_pe) land at their slots as they
    are, q's rope part is read and written back unchanged (FP8: all of q to q_out)."""
    monkeypatch.setattr(bc, "cache_store", _torch_store)
    r = _row(model, cache)
    for c in r.caches.all:
        c.view(torch.uint8).fill_(0x7F)
    q0 = r.q.clone()
    r.moves()
    assert torch.equal(r.q, q0)
    keep = r.slots >= 0
    s = r.slots[keep]
    blk, off = s // bc.BLOCK_SIZE, s % bc.BLOCK_SIZE
    fp8 = cache == "fp8"

    def stored(x):
        return _quant(x, r.kv_scale).view(torch.uint8) if fp8 else x.to(torch.bfloat16).view(torch.int16)

    def bits(c):
        return c.view(torch.uint8) if fp8 else c.view(torch.int16)
    if model == "llama3-8b":
        assert torch.equal(bits(r.caches.k)[blk, off], stored(r.k[keep]))
        assert torch.equal(bits(r.caches.v)[blk, off], stored(r.v[keep]))
    else:
        assert torch.equal(bits(r.caches.ckv)[blk, off], stored(r.kv_c[keep]))
        assert torch.equal(bits(r.caches.kpe)[blk, off], stored(r.k_pe[keep]))
    if fp8:
        assert torch.equal(r.q_out.view(torch.uint8), _quant(q0, r.q_scale).view(torch.uint8))
