"""The offline demo: config/digits.cfg trains a model whose samples score near real digits."""
import json

import pytest
import torch

from conftest import run_main
from datasets import digits_array
from score import Evaluator


@pytest.mark.slow
def test_the_demo_configuration_learns_digits(tmp_path):
    # 600 of the demo's 2500 steps, scored on 500 samples (its sampler: 10 evaluations of the
    # stochastic DPM-Solver++). The demo's EMA warm-up keeps the average's horizon within the
    # run: decay (1 + k) / (10 + k) = 0.985 at step 600, where 0.999 would still weigh the
    # initial weights by 0.999^600 = 0.55.
    run_main("--flagfile", "config/digits.cfg", "--train", "--eval", "--logdir", tmp_path, "--total_steps", "600",
             "--sample_step", "0", "--num_images", "500", tiny=False)  # in this process, as main.py runs it
    model = json.loads(open(tmp_path / "eval.txt").read().splitlines()[-1])

    evaluator = Evaluator("digits")  # reference: the training digits' statistics
    generator = torch.Generator().manual_seed(0)
    noise = evaluator.score(*evaluator.features(torch.rand(500, 1, 8, 8, generator=generator)))
    held_out = evaluator.score(*evaluator.features(torch.from_numpy(digits_array(train=False)[0])))
    # Measured (2 CPU cores, torch 2.14.1, 2026-11-30): this model FID 22.3, IS 7.05 (--seed 1:
    # FID 24.4, IS 6.99); the same recipe stopped at 200 steps, a stand-in for a bug that slows
    # learning 3x: FID 75.6, IS 5.91; uniform noise FID 661, IS 3.2; the 297 held-out real
    # digits FID 22.4, IS 8.3 (the full 2500-step demo: FID 5.8-7.3 over 3 seeds). The
    # thresholds sit 1.4x above the larger measured FID and 0.8 below the smaller IS, and well
    # short of the 200-step model's. (Before the EMA warm-up and the fast sampler, with EMA
    # decay 0.99 and 100 ancestral steps, this test's model scored FID 49.3.)
    assert model["FID"] < 35
    assert model["IS"] > 6.2
    assert noise["FID"] > 500 and held_out["FID"] < 30  # the yardsticks are what they were
