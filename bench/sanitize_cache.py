"""compute-sanitizer's target (``bash bench/device_serving.sh check``): the serving ops with
padding slots, slots past the cache and FP8 caches and q_out, GQA and MLA, small shapes:
every load and store must stay inside its tensor. Each call runs twice on fresh tensors of
the same shapes: the first takes the full path and Triton's launcher, the second replays
its plan through the packed launcher (kernels/packed_launch.py)."""
import torch
import yarn_triton as yt
dev = "cuda"
torch.manual_seed(0)
p = yt.RopeParams.yarn(128, base=500000, scaling_factor=8, original_max_position_embeddings=8192)
pm = yt.RopeParams.yarn(64, base=10000, scaling_factor=40, original_max_position_embeddings=4096)  # (one object: plans key on it)
for T in (1, 7, 300):
    for cdt, rep in ((c, r) for c in (torch.bfloat16, torch.float8_e4m3fn) for r in range(2)):
        q = torch.randn(T, 32, 128, device=dev, dtype=torch.bfloat16); k = torch.randn(T, 8, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        kc = torch.zeros(9, 16, 8, 128, device=dev).to(cdt); vc = torch.zeros_like(kc)
        slots = torch.randint(-1, 9 * 16 + 40, (T,), device=dev)  # -1, valid, past the cache
        fp8 = cdt != torch.bfloat16
        kw = dict(k_scale=torch.tensor([0.5], device=dev), v_scale=0.25) if fp8 else {}
        if fp8:
            kw.update(q_out=torch.empty(q.shape, device=dev, dtype=cdt), q_scale=0.5)
        yt.apply_rope_and_cache_(q, k, v, torch.randint(0, 1 << 17, (T,), device=dev), p, kc, vc, slots, **kw)
        qm = torch.randn(T, 128, 576, device=dev, dtype=torch.bfloat16)
        kvc = torch.zeros(9, 16, 576, device=dev).to(cdt)
        mk = dict(scale=0.5, q_out=torch.empty(qm.shape, device=dev, dtype=cdt), q_scale=0.5, q_nope=qm[..., :512]) if fp8 else {}
        yt.apply_mla_rope_and_cache_(qm[..., 512:], torch.randn(T, 64, device=dev, dtype=torch.bfloat16),
                                     torch.randn(T, 512, device=dev, dtype=torch.bfloat16),
                                     torch.randint(0, 1 << 17, (T,), device=dev), pm, kvc, slots, **mk)
torch.cuda.synchronize()
from yarn_triton import op  # noqa: E402
packed = sum(plan.launch._packed is not None for plan in op.plans._PLANS.values())
print(f"sanitize script done: {len(op.plans._PLANS)} plans, {packed} with the packed launcher")
