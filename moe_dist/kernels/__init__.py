"""Raw Triton kernels and their launchers (check shapes, allocate, launch), one concept per file.

Nothing here is differentiable or dispatches on device: ops/ wraps these launchers in
torch.library custom ops and autograd Functions. Each launcher has a pure-PyTorch reference
beside it. Import these modules lazily (ops/grouped_mm does): Triton decides whether
@triton.jit functions, its own library included, run compiled or interpreted
(TRITON_INTERPRET=1) when they are defined, i.e. when triton and these modules are imported.
"""
