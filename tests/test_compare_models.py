"""tools/compare_models.py: parameter matching against real models, and the --quick run end to end."""

import math
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import REPO, load_tool
from moe_dist.macs import vocab_size
from moe_dist.models.transformer import LM

compare = load_tool("compare_models")


@pytest.mark.parametrize("scale", ["quick", "cpu"])
def test_plans_match_dense_parameters_and_share_everything_else(scale, tmp_path):
    plans = compare.plans(compare.SCALES[scale], [m.name for m in compare.MODELS])
    assert [p.model.name for p in plans] == ["dense", "switch", "sigma_moe", "switchhead", "moeut", "slicemoe"]
    dense = plans[0].cfg
    for p in plans:
        real = sum(t.numel() for t in LM(p.cfg, vocab_size(p.cfg)).parameters())
        assert real == p.counts.params_total, p.model.name  # the counter the matching trusts
        assert abs(real / plans[0].counts.params_total - 1) <= compare.MATCH_TOLERANCE, p.model.name
        # Same batches, budget and schedule for every model: only the architecture differs.
        assert p.cfg.data == dense.data and p.cfg.optim == dense.optim and p.cfg.train == dense.train
        assert replace(p.cfg.run, dir=dense.run.dir) == dense.run  # run.dir and run.seed are set per run
        assert p.cfg.model.d_model == dense.model.d_model and p.cfg.model.n_layers == dense.model.n_layers
        assert p.cfg.model.activation == "relu"
    by = {p.model.name: p for p in plans}
    assert by["switchhead"].counts.macs_attention < by["dense"].counts.macs_attention
    assert by["moeut"].cfg.model.group_size == 2 and by["moeut"].cfg.model.norm == "peri"


def test_unmatchable_knob_is_an_error(monkeypatch):
    narrow = replace(compare.MODELS[1], candidates=lambda d: range(4, 8, 4))  # Switch experts 4 wide at most
    monkeypatch.setattr(compare, "MODELS", [compare.MODELS[0], narrow])
    with pytest.raises(SystemExit, match=r"switch: no moe.d_expert in range\(4, 8, 4\) brings total parameters within 3%"):
        compare.plans(compare.SCALES["quick"], ["switch"])


def test_quick_run_writes_its_section_and_keeps_the_rest(tmp_path):
    out = tmp_path / "results.md"
    out.write_text("# Results\n\nHand-written discussion.\n\n<!-- compare_models:cpu:begin -->\nold cpu table\n"
                   "<!-- compare_models:cpu:end -->\n\nClosing text.\n")
    # One seed (6 runs, about 45 s of the suite's 15 minutes); the mean over seeds is
    # checked by the next test, on the same table code.
    cmd = [sys.executable, "tools/compare_models.py", "--quick", "--work-dir", str(tmp_path / "runs"),
           "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Results\n\nHand-written discussion.\n") and "old cpu table" in text
    assert text.rstrip().endswith("<!-- compare_models:quick:end -->") and "Closing text." in text
    section = text.split("<!-- compare_models:quick:begin -->")[1].split("<!-- compare_models:quick:end -->")[0]
    assert "Command: `python tools/compare_models.py --quick --work-dir" in section and "seed 0," in section
    cells = ([x.strip() for x in line.strip("|").split(" | ")] for line in section.splitlines() if line.startswith("| "))
    rows = {r[0]: r for r in cells}
    for name in ("dense", "switch", "sigma_moe", "switchhead", "moeut", "slicemoe"):
        r = rows[name]
        assert 1 < float(r[1]) < 512, r  # validation perplexity below the uniform 512-token guess
        assert abs(float(r[3].rstrip("%"))) <= 3.0, r  # matched total parameters
        assert float(r[7].replace(",", "")) > 0  # tokens/s
        routed = {"ffn": name in ("switch", "sigma_moe", "moeut", "slicemoe"), "attn": name in ("switchhead", "moeut")}
        for col, kind in ((8, "ffn"), (9, "attn")):
            assert (0 < float(r[col]) <= 1) if routed[kind] else r[col] == "-", (name, kind, r)
    claims = [r for r in rows.values() if r[-1] in ("yes", "no")]
    assert len(claims) == 3
    # The run directory holds what the table was read from.
    metrics = tmp_path / "runs" / "moeut-seed0" / "metrics.jsonl"
    last_eval = [line for line in metrics.read_text().splitlines() if "val_ppl" in line][-1]
    ppl = float(re.search(r'"val_ppl": ([0-9.e+]+)', last_eval).group(1))
    assert math.isfinite(ppl) and f"| moeut | {ppl:.2f} |" in section and rows["moeut"][-1] == f"{ppl:.2f}"


def test_table_of_two_seeds_shows_their_means_and_each_seed():
    plans = compare.plans(compare.SCALES["quick"], ["dense", "moeut"])
    runs = {"dense": [compare.Run(200.0, 1000.0, 5.0), compare.Run(210.0, 1200.0, 5.0)],
            "moeut": [compare.Run(190.0, 800.0, 6.0, {"ffn": 0.9, "attn": 0.5}),
                      compare.Run(195.0, 900.0, 6.0, {"ffn": 0.7, "attn": 0.7})]}  # fmt: skip
    results = [compare.Result(p, runs[p.model.name]) for p in plans]
    text = compare.table("quick", compare.SCALES["quick"], results, "cmd", 60.0)
    assert "seeds 0-1 (values are means over the seeds)" in text
    rows = {r[0]: r for r in ([x.strip() for x in line.strip("|").split(" | ")] for line in text.splitlines()
                              if line.startswith("| ") and not line.startswith("| model"))}
    assert (rows["dense"][1], rows["dense"][7], rows["dense"][-1]) == ("205.00", "1,100", "200.00, 210.00")
    assert (rows["moeut"][1], rows["moeut"][8], rows["moeut"][9], rows["moeut"][-1]) == (
        "192.50", "0.8000", "0.6000", "190.00, 195.00")


def test_unknown_model_name_is_rejected():
    p = subprocess.run([sys.executable, "tools/compare_models.py", "--models", "dense,mixtral", "--plan-only"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--models: unknown ['mixtral']" in p.stderr
