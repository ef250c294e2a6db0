"""The mutation table: plant plausible bugs, one at a time, in a copy of the repository and
check that the tests meant to catch each one fail.

    python tests/mutation.py               # every mutant, after a clean run of their tests
    python tests/mutation.py ema flip      # only the mutants whose names contain ema or flip
    python tests/mutation.py --list        # the mutants, without running anything

The working tree is never touched: its files (tracked, and untracked ones git does not
ignore, plus the cached digits classifier) are copied into a temporary folder, each mutant
is written there, its tests run with `pytest -x -q`, and the file is restored. A mutant is
caught when one of its tests fails; the table names the first that did. The exit status is
1 if any mutant survives (or its tests fail on the clean copy, which would make a catch
meaningless). Not collected by pytest (the name does not start with test_).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRA_FILES = ["data/digits_classifier.pt"]  # ignored by git; without it every copy retrains it


@dataclass
class Mutant:
    name: str
    area: str
    path: str
    old: str
    new: str
    tests: list


def tests_of(file, *names):
    return [f"tests/{file}::{name}" for name in names] if names else [f"tests/{file}"]


REFERENCE_UNET = tests_of("test_pretrained.py", "test_each_layout_computes_the_reference_network")
FAST_PATH = "test_fast_path.py"
LOOP = "test_training_loop.py"
CONFIG = "test_config.py"

MUTANTS = [
    # ---- model
    Mutant("downsample_pads_before", "model", "model.py",
           "F.pad(x, (0, 1, 0, 1))", "F.pad(x, (1, 0, 1, 0))", REFERENCE_UNET),
    Mutant("groupnorm_eps_1e-5", "model", "model.py",
           'GN_EPS = {"official": 1e-6,', 'GN_EPS = {"official": 1e-5,', REFERENCE_UNET),
    Mutant("attention_unscaled", "model", "model.py",
           "F.scaled_dot_product_attention(q, k, v)", "F.scaled_dot_product_attention(q, k, v, scale=1.0)",
           REFERENCE_UNET),
    Mutant("skip_concat_order", "model", "model.py",
           "torch.cat([h, skips.pop()], dim=1)", "torch.cat([skips.pop(), h], dim=1)", REFERENCE_UNET),
    Mutant("timestep_frequencies", "model", "model.py",
           "torch.arange(half, dtype=torch.float64) / (half - 1))",
           "torch.arange(half, dtype=torch.float64) / half)",
           tests_of("test_model.py", "test_timestep_embedding_is_the_official_sinusoid")),
    # ---- diffusion
    Mutant("posterior_coef2_no_sqrt", "diffusion", "diffusion.py",
           "(1.0 - alphas_bar_prev) * alphas.sqrt() / (1.0 - alphas_bar)",
           "(1.0 - alphas_bar_prev) * alphas / (1.0 - alphas_bar)",
           tests_of("test_diffusion.py", "test_schedule_and_posterior_coefficients")),
    Mutant("xprev_trains_toward_x0", "diffusion", "diffusion.py",
           "target = self.q_posterior_mean(x_0, x_t, t)", "target = x_0",
           tests_of("test_diffusion.py", "test_loss_is_zero_for_the_true_target")),
    Mutant("noise_added_at_the_last_step", "diffusion", "diffusion.py",
           "if i == 0 or std is None:", "if std is None:",
           tests_of("test_samplers.py", "test_default_sampler_is_algorithm_2")),
    Mutant("ddim_sigma_eta_squared", "diffusion", "diffusion.py",
           "sigma = self.eta * torch.sqrt(", "sigma = self.eta ** 2 * torch.sqrt(",
           tests_of("test_samplers.py", "test_ddim_matches_the_update_of_song_et_al")),
    Mutant("likelihood_bin_too_wide", "diffusion", "diffusion.py",
           "upper = inv_std * (centered + 1.0 / 255.0)", "upper = inv_std * (centered + 2.0 / 255.0)",
           tests_of("test_likelihood.py", "test_discretized_gaussian_log_likelihood_matches_scipy")),
    Mutant("cosine_offset_tenfold", "diffusion", "diffusion.py",
           "COSINE_OFFSET = 0.008", "COSINE_OFFSET = 0.08",
           tests_of("test_diffusion.py", "test_every_schedule_is_the_official_one",
                    "test_cosine_schedule_equals_diffusers_squaredcos_cap_v2")),
    Mutant("chain_skips_the_last_step", "diffusion", "diffusion.py",
           "for i in reversed(range(self.timesteps.index(t) + 1)):",
           "for i in reversed(range(1, self.timesteps.index(t) + 1)):",
           tests_of("test_samplers.py", "test_the_loop_visits_each_kept_timestep_once_in_descending_order")),
    Mutant("chain_not_reset", "diffusion", "diffusion.py",
           "self.step.reset()", "pass",
           tests_of("test_samplers.py", "test_a_registered_stateful_step_is_reset_once_per_chain")),
    # ---- training loop
    Mutant("ema_decay_swapped", "training", "train.py",
           "ema_update(ema, net, 1.0 - ema_decay)", "ema_update(ema, net, ema_decay)",
           tests_of(LOOP, "test_ema_after_k_updates_is_its_closed_form")),
    Mutant("ema_before_the_fused_step", "training", "train.py",
           "        optimizer.step()\n        ema_update(ema, net, (1.0 - ema_decay) * (~bad).float())",
           "        ema_update(ema, net, (1.0 - ema_decay) * (~bad).float())\n        optimizer.step()",
           tests_of(LOOP, "test_ema_after_k_updates_is_its_closed_form")),
    Mutant("clip_at_a_fixed_1", "training", "train.py",
           "clip_grad_norm_(net.parameters(), grad_clip)", "clip_grad_norm_(net.parameters(), 1.0)",
           tests_of(LOOP, "test_the_step_uses_the_gradient_clipped_to_grad_clip")),
    Mutant("warmup_off_by_one", "training", "train.py",
           "min(step, warmup) / warmup", "min(step + 1, warmup) / warmup",
           tests_of(LOOP, "test_warmup_learning_rate_at_chosen_steps")),
    Mutant("resume_restarts_at_full_lr", "training", "train.py",
           'group["lr"] = lr * warmup_lr(warmup)(scheduler.last_epoch)', 'group["lr"] = lr',
           tests_of(LOOP, "test_resuming_mid_warmup_continues_the_schedule")),
    Mutant("fused_adam_found_inf_inverted", "training", "train.py",
           "optimizer.found_inf = bad.float()", "optimizer.found_inf = (~bad).float()",
           tests_of(LOOP, "test_fused_adam_matches_plain_adam")),
    Mutant("micro_batches_share_noise", "training", "train.py",
           "loss = trainer(x_0, t[part], noise[part]).mean()",
           "loss = trainer(x_0, t[:micro_batch], noise[:micro_batch]).mean()",
           tests_of("test_main.py", "test_gradient_accumulation_is_one_big_batch")),
    Mutant("ddp_syncs_the_wrong_micro_batch", "training", "train.py",
           "if world_size > 1 and not last else", "if world_size > 1 and last else",
           tests_of("test_main.py", "test_two_processes_equal_one")),
    Mutant("rank_offset_dropped", "training", "batches.py",
           "* self.global_batch + self.rank * local", "* self.global_batch",
           tests_of(LOOP, "test_ranks_and_micro_batches_partition_the_global_batch")),
    # ---- flips and data
    Mutant("flip_mask_of_micro_batch_0", "data", "train.py",
           "torch.where(flip[part, None, None, None]", "torch.where(flip[:micro_batch, None, None, None]",
           tests_of("test_flips.py", "test_flips_follow_the_seeded_mask_in_every_micro_batch")),
    Mutant("flip_mask_of_rank_0", "data", "train.py",
           "torch.where(flip[part, None, None, None]",
           "torch.where(flip[micro * micro_batch:(micro + 1) * micro_batch, None, None, None]",
           tests_of("test_flips.py",
                    "test_flipped_training_is_the_same_update_on_two_processes_and_in_micro_batches")),
    Mutant("flip_upside_down", "data", "train.py",
           "x_0.flip(-1), x_0)", "x_0.flip(-2), x_0)",
           tests_of("test_flips.py", "test_flips_follow_the_seeded_mask_in_every_micro_batch")),
    Mutant("folders_do_not_flip", "data", "data.py",
           '"folder": (True,', '"folder": (False,',
           tests_of("test_flips.py", "test_an_image_folder_flips_by_default")),
    Mutant("device_batches_unscaled", "data", "data.py",
           "return to_signed_unit(dataset.images)", "return dataset.images",
           tests_of(LOOP, "test_batches_on_the_device_are_the_loaders_batches")),
    # ---- fast path
    Mutant("autocast_float16", "fast path", "speed.py",
           "dtype=torch.bfloat16", "dtype=torch.float16",
           tests_of(FAST_PATH, "test_autocast_runs_the_network_in_bf16_and_returns_float32")),
    Mutant("autocast_result_left_bf16", "fast path", "speed.py",
           "return out.float().contiguous()", "return out.contiguous()",
           tests_of(FAST_PATH, "test_autocast_runs_the_network_in_bf16_and_returns_float32")),
    Mutant("input_not_channels_last", "fast path", "speed.py",
           "x = x.contiguous(memory_format=torch.channels_last)", "x = x.contiguous()",
           tests_of(FAST_PATH, "test_weights_and_activations_are_channels_last")),
    Mutant("weights_not_channels_last", "fast path", "speed.py",
           "return net.to(memory_format=torch.channels_last) if path.channels_last else net", "return net",
           tests_of(FAST_PATH, "test_weights_and_activations_are_channels_last")),
    Mutant("compile_mode_dropped", "fast path", "speed.py",
           "torch.compile(net, mode=mode, dynamic=False)", "torch.compile(net, dynamic=False)",
           tests_of(FAST_PATH, "test_compile_is_called_with_the_requested_mode")),
    Mutant("compiled_network_unused", "fast path", "speed.py",
           "net = torch.compile(net, mode=mode, dynamic=False)",
           "compiled = torch.compile(net, mode=mode, dynamic=False)",
           tests_of(FAST_PATH, "test_compiled_sampler_is_not_recompiled_across_steps")),
    Mutant("trainer_off_the_fast_path", "fast path", "train.py",
           "build_trainer(speed.wrap(ddp_net, fast), config.diffusion)", "build_trainer(ddp_net, config.diffusion)",
           tests_of(FAST_PATH, "test_training_runs_the_compiled_network_in_one_graph_without_recompiles")),
    # ---- scoring and evaluation
    Mutant("fid_trace_sign", "scoring", "score/metrics.py",
           "- 2 * trace_sqrt)", "+ 2 * trace_sqrt)",
           tests_of("test_score.py", "test_frechet_distance_matches_scipy_sqrtm_formula")),
    Mutant("is_marginal_unnormalised", "scoring", "score/metrics.py",
           "log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))",
           "log_marginal = torch.logsumexp(part, dim=0)",
           tests_of("test_score.py", "test_inception_score_matches_numpy_and_pytorch_gan_metrics")),
    Mutant("quantize_truncates", "scoring", "score/metrics.py",
           "(images.clamp(0, 1) * 255 + 0.5).floor()", "(images.clamp(0, 1) * 255).floor()",
           tests_of("test_score.py", "test_8_bit_rounding_is_that_of_torchvision_save_image")),
    Mutant("nofid_quantize_ignored", "scoring", "evaluate.py",
           "quantize=scoring.fid_quantize, dataset=dataset.dataset", "quantize=True, dataset=dataset.dataset",
           tests_of("test_cli_paths.py", "test_saved_samples_are_the_same_in_every_format_and_on_two_processes")),
    Mutant("sample_shards_numbered_from_0", "scoring", "evaluate.py",
           "save_images(images.cpu(), config.actions.save_samples, start=i * batch)",
           "save_images(images.cpu(), config.actions.save_samples)",
           tests_of("test_cli_paths.py", "test_saved_samples_are_the_same_in_every_format_and_on_two_processes")),
    Mutant("bpd_noise_per_process", "scoring", "evaluate.py",
           "generator(device, config.run.seed, BPD_NOISE, first_batch + n)",
           "generator(device, config.run.seed, BPD_NOISE, n)",
           tests_of("test_cli_paths.py",
                    "test_bits_per_dim_on_two_processes_equals_one_and_looking_inside_writes_its_images")),
    # ---- checkpoints
    Mutant("rng_not_restored_on_resume", "checkpoints", "train.py",
           'set_rng_state(saved["rng"][rank])', "pass",
           tests_of("test_main.py", "test_resumed_run_ends_with_the_same_weights")),
    Mutant("step_not_restored_on_resume", "checkpoints", "train.py",
           'self.step, self.x_T = int(saved["step"]), saved["x_T"]', 'self.x_T = saved["x_T"]',
           tests_of("test_main.py", "test_resumed_run_ends_with_the_same_weights")),
    Mutant("unrecorded_layout_is_official", "checkpoints", "checkpoint.py",
           '    return "port"\n', '    return "official"\n',
           tests_of("test_pretrained.py", "test_a_checkpoint_without_layout_loads_as_the_seed_port")),
    # ---- configuration
    Mutant("resume_lets_the_diffusion_change", "configuration", "config.py",
           "for section in (ModelConfig, DiffusionConfig)", "for section in (ModelConfig,)",
           tests_of(CONFIG, "test_resume_refuses_a_new_schedule_or_layout_and_lets_the_rest_change")),
    Mutant("store_forgets_the_diffusion", "configuration", "evaluate.py",
           '"diffusion": dataclasses.asdict(config.diffusion)', '"diffusion": None',
           tests_of(CONFIG, "test_every_field_of_the_model_diffusion_and_sampling_reaches_the_evaluation_store")),
    Mutant("old_layout_name_refused", "configuration", "model.py",
           'LAYOUT_ALIASES = {"seed": "port"}', "LAYOUT_ALIASES = {}",
           tests_of(CONFIG, "test_a_flagfile_written_before_the_typed_configuration_loads_unchanged")),
    Mutant("flagfile_bool_inverted", "configuration", "config.py",
           'return [f"--{name}" if value else f"--no{name}"]', 'return [f"--no{name}" if value else f"--{name}"]',
           tests_of(CONFIG, "test_flagfile_text_is_what_absl_writes_and_reads_back_the_same_configuration")),
    Mutant("list_flags_joined_by_commas", "configuration", "config.py",
           "        if name in MULTI_FLAGS:\n", "        if False:\n",
           tests_of(CONFIG, "test_flagfile_text_is_what_absl_writes_and_reads_back_the_same_configuration")),
]


def copy_repository(destination):
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for path in [p for p in listed if p] + EXTRA_FILES:
        source = os.path.join(ROOT, path)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(destination, path)) or destination, exist_ok=True)
            shutil.copy2(source, os.path.join(destination, path))


def run_tests(copy, tests, timeout):
    """(exit status, the first failing test or an excerpt of the output, seconds)."""
    start = time.time()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                cwd=copy, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        return "timeout", f"no result in {timeout} s", time.time() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.MULTILINE)
    detail = failed[0] if failed else result.stdout.strip().splitlines()[-1:] or [""]
    return result.returncode, detail if failed else detail[0], time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only mutants whose names contain one of these")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-clean", action="store_true", help="skip the clean run of the tests")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.names or any(n in m.name for n in args.names)]
    if args.list:
        for m in chosen:
            print(f"{m.area:12} {m.name:34} {m.path:18} {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="ddpm-mutants-") as copy:
        copy_repository(copy)
        for m in chosen:  # every mutant must apply to the code as it is now
            count = open(os.path.join(copy, m.path)).read().count(m.old)
            if count != 1:
                print(f"mutant {m.name}: its text occurs {count} times in {m.path}, not once: update it")
                return 2
        if not args.no_clean:
            tests = sorted({test for m in chosen for test in m.tests})
            status, detail, seconds = run_tests(copy, tests, args.timeout * 2)
            print(f"clean copy: {len(tests)} test selections, exit status {status} in {seconds:.0f} s")
            if status != 0:
                print(f"the tests fail without a mutant ({detail}): fix that first")
                return 1
        rows, survivors = [], 0
        for m in chosen:
            path = os.path.join(copy, m.path)
            original = open(path).read()
            with open(path, "w") as file:
                file.write(original.replace(m.old, m.new))
            try:
                status, detail, seconds = run_tests(copy, m.tests, args.timeout)
            finally:
                with open(path, "w") as file:
                    file.write(original)
            caught = status not in (0, 5)  # 5: no test collected
            survivors += not caught
            verdict = detail.replace("tests/", "") if caught else f"NOT CAUGHT ({detail})"
            rows.append((m.area, m.name, m.path, verdict))
            print(f"{m.name}: {verdict} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    print("\n| area | mutant | file | caught by |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{len(rows) - survivors} of {len(rows)} mutants caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
