import torch, time, sys, json, os
import yarn_triton as yt
from yarn_triton.reference import rope_reference
from yarn_triton.reference_cache import quantize_reference
torch.manual_seed(0)
dev = "cuda"
params = yt.RopeParams.yarn(128, base=500000, scaling_factor=8, original_max_position_embeddings=8192)
def check(T, cdt, layout="neox", q_out=False):
    Hq, Hk, D = 32, 8, 128
    q = torch.randn(T, Hq, D, device=dev, dtype=torch.bfloat16); k = torch.randn(T, Hk, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(T, Hk, D, device=dev, dtype=torch.bfloat16)
    nb, bs = 4096, 16
    kc = torch.full((nb, bs, Hk, D), 3.0, device=dev).to(cdt); vc = kc.clone()
    pos = torch.randint(0, 131072, (T,), device=dev)
    slots = torch.randperm(nb * bs, device=dev)[:T]; slots[::7] = -1
    fp8 = cdt != torch.bfloat16
    sc = dict(k_scale=torch.tensor([0.5], device=dev), v_scale=0.25) if fp8 else {}
    qo = torch.empty(q.shape, device=dev, dtype=torch.float8_e4m3fn) if q_out else None
    qs = dict(q_out=qo, q_scale=torch.tensor([0.3], device=dev)) if q_out else {}
    q0 = q.clone()
    yt.apply_rope_and_cache_(q, k, v, pos, params, kc, vc, slots, layout=layout, **sc, **qs)
    torch.cuda.synchronize()
    qr, kr = rope_reference(q0.double(), k.double(), pos, params, layout=layout)
    qres = (qo.float() if q_out else q.double())
    qref = quantize_reference(qr.float(), torch.float8_e4m3fn, qs["q_scale"]).float() if q_out else qr
    qerr = ((qres.double() - qref.double()).abs().max() / qref.abs().max()).item()
    m = slots >= 0
    s = slots[m]
    kw = quantize_reference(kr[m].float(), cdt, sc.get("k_scale")).float()
    vw = quantize_reference(v[m], cdt, sc.get("v_scale")).float()
    kg = kc[s // bs, s % bs].float(); vg = vc[s // bs, s % bs].float()
    kdiff = ((kg - kw).abs() > (kw.abs() * 0.13 + 1e-3)).sum().item()
    kexact = (kg == kw).float().mean().item()
    vexact = torch.equal(vg, vw)
    mask = torch.ones(nb * bs, dtype=torch.bool, device=dev); mask[s] = False
    untouched = bool((kc.view(nb * bs, -1)[mask].float() == 3).all() and (vc.view(nb * bs, -1)[mask].float() == 3).all())
    return dict(T=T, cdt=str(cdt), layout=layout, q_out=q_out, qerr=qerr, k_far=kdiff, k_exact=kexact, v_exact=vexact, untouched=untouched)
res = []
for T in ((1, 8, 64, 256, 8192) if os.environ.get('YT_FASTDIV') != '1' else ()):
    for cdt in (torch.bfloat16, torch.float8_e4m3fn):
        res.append(check(T, cdt, q_out=(cdt != torch.bfloat16)))
for layout in ("interleaved", "deepseek"):
    res.append(check(64, torch.float8_e5m2, layout))
for r in res: print(r)
# timing in a CUDA graph
def gtime(fn, n=200):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph(); s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(20): fn()
    g.replay(); torch.cuda.synchronize()
    st = torch.cuda.Event(enable_timing=True); en = torch.cuda.Event(enable_timing=True)
    st.record()
    for _ in range(n // 20): g.replay()
    en.record(); torch.cuda.synchronize()
    return st.elapsed_time(en) * 1000 / n
import os
if os.environ.get("YT_FASTDIV") == "1": res = []
for T in (1, 8, 64, 256, 8192):
    Hq, Hk, D = 32, 8, 128
    q = torch.randn(T, Hq, D, device=dev, dtype=torch.bfloat16); k = torch.randn(T, Hk, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(T, Hk, D, device=dev, dtype=torch.bfloat16)
    nb, bs = 16384, 16
    pos = torch.randint(0, 131072, (T,), device=dev)
    slots = torch.randperm(nb * bs, device=dev)[:T]
    row = [T]
    for cdt, mode in ((torch.bfloat16, "-"), (torch.float8_e4m3fn, "tq"), (torch.float8_e4m3fn, "fq"), (torch.float8_e4m3fn, "t")):
        kc = torch.zeros((nb, bs, Hk, D), device=dev).to(cdt); vc = kc.clone()
        fp8 = cdt != torch.bfloat16
        mk = (lambda x: torch.tensor([x], device=dev)) if mode.startswith("t") else float
        sc = dict(k_scale=mk(0.5), v_scale=mk(0.5)) if fp8 else {}
        qs = dict(q_out=torch.empty(q.shape, device=dev, dtype=torch.float8_e4m3fn), q_scale=mk(0.3)) if mode.endswith("q") else {}
        fn = lambda: yt.apply_rope_and_cache_(q, k, v, pos, params, kc, vc, slots, **sc, **qs)
        fn(); torch.cuda.synchronize()
        row.append(round(gtime(fn), 2))
    row.append(round(gtime(lambda: yt.apply_rope_(q, k, pos, params)), 2))
    print("time T=%d fused bf16 %.2f | fp8 cache+q_out, tensor scales %.2f, float scales %.2f | fp8 cache, q in place %.2f | rope_ alone %.2f" % tuple(row))
# torch.compile
T = 16
q = torch.randn(T, 32, 128, device=dev, dtype=torch.bfloat16); k = torch.randn(T, 8, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
kc = torch.zeros((64, 16, 8, 128), device=dev, dtype=torch.float8_e4m3fn); vc = kc.clone()
pos = torch.randint(0, 1000, (T,), device=dev); slots = torch.randperm(1024, device=dev)[:T]
ks = torch.tensor([0.5], device=dev)
def f(q, k, v, kc, vc):
    q = q * 1.0
    yt.apply_rope_and_cache_(q, k, v, pos, params, kc, vc, slots, k_scale=ks, v_scale=ks)
    return q
kc2, vc2 = kc.clone(), vc.clone()
out_c = torch.compile(f, fullgraph=True)(q, k, v, kc, vc)
out_e = f(q, k, v, kc2, vc2)
print("compile equal", torch.equal(out_c, out_e), torch.equal(kc.view(torch.uint8), kc2.view(torch.uint8)), torch.equal(vc.view(torch.uint8), vc2.view(torch.uint8)))

from yarn_triton.kernels import launcher
for k_, v_ in launcher.tuned_configs().items():
    if k_[-1] is not None: print("tuned", k_[0], k_[-1], v_)
