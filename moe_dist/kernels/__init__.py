"""Raw Triton kernels and their launchers (check shapes, allocate, launch), one concept per file.

Nothing here is differentiable or dispatches on device: ops/ wraps these launchers in
autograd Functions, and in torch.library custom ops for torch.compile to trace (eager calls
skip the ops' dispatch cost, see ops/grouped_mm.py's _eager_or_op). Each launcher has a
pure-PyTorch reference beside it. Import these modules lazily (ops/grouped_mm does): Triton decides whether
@triton.jit functions, its own library included, run compiled or interpreted
(TRITON_INTERPRET=1) when they are defined, i.e. when triton and these modules are imported.
"""
