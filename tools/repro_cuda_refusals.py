import torch, streamkl
mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
q_s, k_s, q_t, k_t = mk(1, 4, 64, 64), mk(1, 2, 64, 64), mk(1, 4, 64, 64), mk(1, 4, 64, 64)
kl, lse_s, lse_t = torch.ops.streamkl.attention_kl_fwd(q_s, k_s, q_t, k_t, 0.125, 0.125, False, "forward")
print("fwd ok", flush=True)
try:
    torch.ops.streamkl.attention_kl_fwd(q_s, k_s, q_t, k_t, 0.125, 0.125, False, "forward", -1, -1, "mean")
except Exception as e:
    print("aggregated refused:", type(e).__name__, str(e)[:80], flush=True)
try:
    torch.ops.streamkl.attention_kl_bwd(torch.ones_like(kl), q_s, k_s, q_t, k_t, kl, lse_s, lse_t, 0.125, 0.125, False, "forward", True)
except Exception as e:
    print("grouping refused:", type(e).__name__, str(e)[:80], flush=True)
