"""tools/count_macs.py's formulas against torch's own count of the matmuls a model runs."""

import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO
from moe_dist.config import load_config
from moe_dist.macs import count
from moe_dist.models.transformer import LM

ARCHS = {
    "dense": ["model.ffn=dense"],
    "switch": ["model.ffn=moe", "moe.top_k=1", "model.activation=relu"],
    "top2_shared": ["model.ffn=moe", "moe.top_k=2", "moe.num_shared_experts=1"],
    "sigma_moe": ["model.ffn=sigma_moe", "moe.top_k=3", "model.activation=relu"],
    "switchhead": ["model.attention=switchhead", "model.n_heads=2", "model.head_dim=12", "model.ffn=dense"],
    "moeut": ["model.attention=switchhead", "model.n_heads=2", "model.head_dim=12", "model.ffn=sigma_moe",
              "model.group_size=2", "model.n_layers=4", "model.norm=peri"],
    "slice_moe": ["model.ffn=slice_moe", "moe.num_slices=4", "moe.slice_router_hidden=10"],
    "moe_every_2_untied": ["model.ffn=moe", "moe.every=2", "model.tie_embeddings=false", "model.positions=learned"],
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_counts_match_the_model(arch):
    cfg = load_config(None, [
        "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=48", "moe.num_experts=5",
        "moe.d_expert=16", "moe.capacity_factor=0", "attention.num_experts=3", "attention.top_k=2",
        "moe.grouped_mm=loop", "model.vocab_size=97", "data.seq_len=16", *ARCHS[arch],
    ])
    torch.manual_seed(0)
    model = LM(cfg, 97).eval()
    c = count(cfg)
    assert c.params_total == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randint(0, 97, (3, 16)))
    # The flop counter sees every matmul (2 flops per MAC) but not CPU attention kernels.
    macs_per_token = fc.get_total_flops() / 2 / (3 * 16)
    assert macs_per_token == c.macs_total - c.macs["attention_scores"]
    head_dim = cfg.model.head_dim or 32 // cfg.model.n_heads
    assert c.macs["attention_scores"] == 2 * cfg.model.n_heads * head_dim * 16 * cfg.model.n_layers


def test_active_parameters_of_a_token_choice_moe():
    cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "moe.num_experts=6", "moe.top_k=2",
                             "moe.d_expert=8", "model.vocab_size=50", "model.activation=relu"])
    c = count(cfg)
    expert = 2 * 32 * 8
    assert c.params_total - c.params_active == 2 * (6 - 2) * expert  # 4 idle experts per layer


def test_count_macs_cli_on_the_moeut_paper_config():
    p = subprocess.run([sys.executable, "tools/count_macs.py", "configs/paper/moeut_244m.yaml"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "parameters: total 231,784,448 (231.8M)" in p.stdout
    assert "ffn                    75,497,472" in p.stdout  # 18 x 16 x (1024x128 + 128x1024)
