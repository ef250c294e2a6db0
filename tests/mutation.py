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
CONVERT = "test_convert.py"
RECIPES = "test_recipes.py"
MISFIT = "test_weights_that_are_not_exactly_the_configured_networks_are_refused_before_it_is_allocated"
UNTRUSTED = "test_untrusted_files.py"
ENDS = "test_schedule_ends.py"
NEW_SAMPLER = "test_new_sampler.py"
GUIDANCE = "test_guidance.py"
EDM = "test_edm.py"
METRICS = "test_distribution_metrics.py"
EVAL_METRICS = "test_eval_metrics.py"
FP16 = "test_fp16.py"
FP16_OVERFLOW = "test_an_overflow_is_skipped_backs_the_scale_off_and_is_not_a_bad_step"
FP16_RESUME = "test_fp16_training_resumes_its_loss_scale_exactly"
STREAMED_METRICS = "test_every_metric_of_the_streamed_eval_equals_the_metrics_of_its_saved_samples"
LOCK_TEST = "test_the_lock_follows_no_link_and_writes_nothing_but_its_own_regular_file"
SIZES_TEST = "test_sizes_that_cannot_fit_are_one_line_with_the_bytes_before_anything_is_built"
SIZES_T = "--T 1,000,000 needs at least 389.1 MB for the schedule alone"

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
    Mutant("noise_added_at_the_last_step", "diffusion", "steps.py",
           "if i == 0 or std is None:", "if std is None:",
           tests_of("test_samplers.py", "test_default_sampler_is_algorithm_2")),
    Mutant("ddim_sigma_eta_squared", "diffusion", "steps.py",
           "sigma = self.eta * torch.sqrt(", "sigma = self.eta ** 2 * torch.sqrt(",
           tests_of("test_samplers.py", "test_ddim_matches_the_update_of_song_et_al")),
    Mutant("likelihood_bin_too_wide", "diffusion", "diffusion.py",
           "upper = inv_std * (centered + 1.0 / 255.0)", "upper = inv_std * (centered + 2.0 / 255.0)",
           tests_of("test_likelihood.py", "test_discretized_gaussian_log_likelihood_matches_scipy")),
    Mutant("cosine_offset_tenfold", "diffusion", "diffusion.py",
           "COSINE_OFFSET = 0.008", "COSINE_OFFSET = 0.08",
           tests_of("test_diffusion.py", "test_every_schedule_is_the_official_one",
                    "test_cosine_schedule_equals_diffusers_squaredcos_cap_v2")),
    Mutant("chain_skips_the_last_step", "diffusion", "sampling.py",
           "for i in reversed(range(self.timesteps.index(t) + 1)):",
           "for i in reversed(range(1, self.timesteps.index(t) + 1)):",
           tests_of("test_samplers.py", "test_the_loop_visits_each_kept_timestep_once_in_descending_order")),
    Mutant("chain_not_reset", "diffusion", "sampling.py",
           "self.step.reset()", "pass",
           tests_of("test_samplers.py", "test_a_registered_stateful_step_is_reset_once_per_chain")),
    Mutant("ddim_eps_always_from_clipped_x0", "diffusion", "steps.py",
           "        elif self.mean_type == \"epsilon\":\n            eps = output\n",
           "        elif self.mean_type == \"epsilon\":\n            eps = self.diffusion.predict_eps_from_xstart(x_t, t, x_0)\n",
           tests_of("test_samplers.py", "test_one_ddim_step_equals_diffusers_ddim_scheduler")),
    Mutant("uniform_spacing_of_whole_strides", "diffusion", "sampling.py",
           "return [k * T // steps for k in range(steps)]", "return [k * (T // steps) for k in range(steps)]",
           tests_of("test_samplers.py", "test_timesteps_follow_the_official_ddim_definitions")),
    Mutant("logsnr_spacing_floors", "diffusion", "sampling.py",
           "kept = np.rint(np.interp(", "kept = np.floor(np.interp(",
           tests_of("test_samplers.py", "test_logsnr_timesteps_equal_diffusers_lu_lambdas")),
    Mutant("logsnr_repeats_kept", "diffusion", "sampling.py",
           "kept[k] = max(kept[k], kept[k - 1] + 1)", "kept[k] = max(kept[k], kept[k - 1])",
           tests_of("test_samplers.py", "test_logsnr_timesteps_are_uniform_in_log_snr_and_one_per_evaluation")),
    # ---- the solvers (DPM-Solver++, its SDE variant, singlestep DPM-Solver, UniPC)
    Mutant("dpmpp_second_order_unhalved", "solvers", "solvers.py",
           "return x if d1 is None else x - 0.5 * alpha_t * phi * d1",
           "return x if d1 is None else x - alpha_t * phi * d1",
           tests_of("test_solvers.py", "test_every_step_equals_diffusers")),
    Mutant("dpmpp_no_lower_order_final", "solvers", "solvers.py",
           "return min(order, 2) if i == 1 and len(self.timesteps) < 15 else order", "return order",
           tests_of("test_solvers.py", "test_every_step_equals_diffusers")),
    Mutant("sde_noise_std_unrooted", "solvers", "solvers.py",
           "self.sigma[t] * math.sqrt(decay)", "self.sigma[t] * decay",
           tests_of("test_solvers.py", "test_every_step_equals_diffusers")),
    Mutant("singlestep_starts_at_every_step", "solvers", "solvers.py",
           "        if order == 1:\n            self.start = x_t", "        self.start = x_t",
           tests_of("test_solvers.py", "test_every_step_equals_diffusers")),
    Mutant("singlestep_last_step_not_first_order", "solvers", "solvers.py",
           "    orders[-1] = 1\n    return orders", "    return orders",
           tests_of("test_solvers.py", "test_singlestep_orders_are_diffusers_order_list")),
    Mutant("unipc_without_corrector", "solvers", "solvers.py",
           "        if self.last is not None:\n            x_s, order = self.last",
           "        if False:\n            x_s, order = self.last",
           tests_of("test_solvers.py", "test_every_step_equals_diffusers")),
    Mutant("unipc_weights_of_b_h_equal_h", "solvers", "solvers.py",
           "    b_h = math.expm1(hh)\n", "    b_h = hh\n",
           tests_of("test_solvers.py", "test_every_step_equals_diffusers")),
    Mutant("solvers_never_clip", "solvers", "solvers.py",
           "self.mean_type,\n                                             self.clip_denoised)",
           "self.mean_type,\n                                             False)",
           tests_of("test_solvers.py", "test_every_step_equals_diffusers")),
    Mutant("solver_history_kept_across_chains", "solvers", "solvers.py",
           "        \"\"\"A new chain: forget the earlier x0_hat (and their points).\"\"\"\n        self.history = []",
           "        \"\"\"A new chain: forget the earlier x0_hat (and their points).\"\"\"",
           tests_of("test_solvers.py", "test_each_chain_starts_afresh")),
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
    Mutant("folders_do_not_flip", "data", "datasets.py",
           '"folder": (True,', '"folder": (False,',
           tests_of("test_flips.py", "test_an_image_folder_flips_by_default")),
    Mutant("device_batches_unscaled", "data", "datasets.py",
           "return to_signed_unit(dataset.images)", "return dataset.images",
           tests_of(LOOP, "test_batches_on_the_device_are_the_loaders_batches")),
    # ---- fast path
    Mutant("autocast_float16", "fast path", "speed.py",
           'AUTOCAST = {"bf16": torch.bfloat16,', 'AUTOCAST = {"bf16": torch.float16,',
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
           "build_trainer(speed.wrap(ddp_net, fast), config.diffusion, config.training)",
           "build_trainer(ddp_net, config.diffusion, config.training)",
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
           "save_images(images.cpu(), path, start=i * batch)", "save_images(images.cpu(), path)",
           tests_of("test_cli_paths.py", "test_saved_samples_are_the_same_in_every_format_and_on_two_processes")),
    Mutant("bpd_noise_per_process", "scoring", "inspection.py",
           "generator(device, config.run.seed, BPD_NOISE, first_batch + n)",
           "generator(device, config.run.seed, BPD_NOISE, n)",
           tests_of("test_cli_paths.py",
                    "test_bits_per_dim_on_two_processes_equals_one_and_looking_inside_writes_its_images")),
    Mutant("eval_noise_seeded_by_rank", "evaluation", "evaluate.py",
           "noise = generator(device, config.run.seed, EVAL_NOISE, i)",
           "noise = generator(device, config.run.seed, EVAL_NOISE, i + distributed.rank())",
           tests_of("test_evaluation.py", "test_each_process_draws_the_batches_one_process_would")),
    Mutant("store_deletes_other_stores", "evaluation", "store.py",
           "        others = other_stores(self.root, self.key)\n",
           "        others = other_stores(self.root, self.key)\n"
           "        for path, _, _ in others:\n            __import__('shutil').rmtree(path)\n",
           tests_of("test_evaluation.py",
                    "test_a_quick_eval_keeps_other_stores_and_foreign_files_in_a_symlinked_eval_state")),
    Mutant("store_removes_eval_state_through_its_symlink", "evaluation", "store.py",
           "        if not os.path.islink(self.root) and not os.listdir(self.root):\n            os.rmdir(self.root)",
           "        if not os.listdir(self.root):\n            os.rmdir(os.path.realpath(self.root))",
           tests_of("test_evaluation.py",
                    "test_a_symlinked_eval_state_and_the_folder_it_points_to_outlive_the_store")),
    Mutant("finished_batches_unchecked", "evaluation", "store.py",
           "            why = self.read(i)[1]\n", "            why = None\n",
           tests_of("test_evaluation.py",
                    "test_malformed_finished_batches_are_drawn_again_to_the_uninterrupted_results")),
    Mutant("checkpoint_hashed_by_path", "evaluation", "checkpoint.py",
           'state.get("step"), sha256[:12]', 'state.get("step"), short_sha256(path)',
           tests_of("test_evaluation.py",
                    "test_the_recorded_hash_is_that_of_the_checkpoint_loaded_while_a_run_saves_another")),
    Mutant("checkpoint_loaded_by_path", "checkpoints", "checkpoint.py",
           "torch.load(io.BytesIO(content), map_location", "torch.load(path, map_location",
           tests_of("test_evaluation.py",
                    "test_the_recorded_hash_is_that_of_the_checkpoint_loaded_while_a_run_saves_another")),
    # ---- checkpoints
    Mutant("rng_not_restored_on_resume", "checkpoints", "train.py",
           'set_rng_state(saved["rng"][rank])', "pass",
           tests_of("test_main.py", "test_resumed_run_ends_with_the_same_weights")),
    Mutant("step_not_restored_on_resume", "checkpoints", "train.py",
           'self.step, self.x_T = step_of(saved["step"], path), saved["x_T"]', 'self.x_T = saved["x_T"]',
           tests_of("test_main.py", "test_resumed_run_ends_with_the_same_weights")),
    Mutant("unrecorded_layout_is_official", "checkpoints", "checkpoint.py",
           '    return "port"\n', '    return "official"\n',
           tests_of("test_pretrained.py", "test_a_checkpoint_without_layout_loads_as_the_seed_port")),
    Mutant("truncated_lmdb_opened", "data", "datasets.py",
           "        check_not_truncated(path, env)\n", "",
           tests_of("test_datasets.py", "test_a_truncated_database_is_refused_at_open")),
    Mutant("fifo_counts_as_an_image", "data", "datasets.py",
           "and os.path.isfile(path := os.path.join(folder, name))", "and (path := os.path.join(folder, name))",
           tests_of("test_datasets.py", "test_only_regular_files_count_as_images")),
    # ---- processes: the start of a job
    # (start_outcomes_not_exchanged, which removed job.passed(), is retired: its effect cannot be
    # seen, since a rank that leaves its start-up early blocks where the process group forms and
    # learns of the other's failure there, with the same line and the same files taken back)
    Mutant("start_failure_not_posted", "processes", "distributed.py",
           "            job.failed(one_line(error), stay=isinstance(error, Exception))", "            pass",
           tests_of("test_multinode.py", "test_a_node_that_fails_at_start_up_ends_the_other")),
    Mutant("start_silence_never_ends_the_wait", "processes", "distributed.py",
           "return [rank for rank in ranks if now - self.heard[rank][1] > limit]", "return []",
           tests_of("test_multinode.py", "test_start_up_gives_up_on_a_peer_that_never_comes")),
    Mutant("store_connect_without_deadline", "processes", "distributed.py",
           "            if time.monotonic() > deadline:\n", "            if False:\n",
           tests_of("test_multinode.py", "test_start_up_gives_up_on_a_peer_that_never_comes")),
    Mutant("store_wait_blocks_signals", "processes", "distributed.py",
           "            if reachable(host, port):\n", "            if True:\n",
           tests_of("test_multinode.py", "test_a_stop_signal_ends_a_process_that_waits_for_a_peer")),
    # ---- processes: nodes agree on one configuration (issue 24, item 5)
    Mutant("flags_compared_only_on_rank_0", "processes", "distributed.py",
           "        if line:\n            raise FlagsDiffer(line)", "        if line and self.rank == 0:\n            raise FlagsDiffer(line)",
           tests_of("test_multinode.py", "test_nodes_started_with_different_flags_end_before_anything_is_written")),
    Mutant("rank_0_writes_before_every_rank_agreed", "processes", "distributed.py",
           'self.store.add("agreed", 0) >= self.world_size - 1', 'self.store.add("agreed", 0) >= 0',
           tests_of("test_multinode.py", "test_nodes_started_with_different_flags_end_before_anything_is_written")),
    Mutant("actions_not_compared_across_nodes", "processes", "main.py",
           "if name not in PER_NODE_FLAGS}", "if name not in PER_NODE_FLAGS + config.ACTIONS}",
           tests_of("test_multinode.py", "test_nodes_started_with_different_flags_end_before_anything_is_written")),
    Mutant("network_and_diffusion_not_compared_across_nodes", "processes", "main.py",
           "if name not in PER_NODE_FLAGS}", "if name not in PER_NODE_FLAGS + config.FIXED_ON_RESUME}",
           tests_of("test_multinode.py", "test_nodes_started_with_different_flags_end_before_anything_is_written")),
    Mutant("data_root_must_agree_across_nodes", "processes", "main.py",
           'PER_NODE_FLAGS = ("data_root", "num_workers")', 'PER_NODE_FLAGS = ("num_workers",)',
           tests_of("test_multinode.py", "test_a_node_that_fails_at_start_up_ends_the_other")),
    Mutant("start_up_files_not_taken_back", "processes", "main.py",
           "            made.take_back()\n", "            pass\n",
           tests_of("test_reliability.py", "test_a_data_error_at_start_leaves_no_logdir")),
    Mutant("events_file_before_the_first_step", "processes", "train.py",
           "self.writer, self.real = None, None",
           "self.writer, self.real = SummaryWriter(self.logdir) if is_main else None, None",
           tests_of("test_reliability.py", "test_a_data_error_at_start_leaves_no_logdir")),
    Mutant("stop_while_loading_raises", "processes", "signals.py",
           "signal.signal(signum, lambda signum, frame: exit_stopped(signum))",
           "signal.signal(signum, raise_stopped)",
           tests_of("test_reliability.py", "test_ctrl_c_while_a_command_loads_is_one_line[main.py]")),
    Mutant("convert_loads_with_default_signals", "processes", "convert.py",
           "if __name__ == \"__main__\":  # Ctrl-C while the modules below load: one line, not a traceback\n"
           "    signals.exit_at_once()\n", "",
           tests_of("test_reliability.py", "test_ctrl_c_while_a_command_loads_is_one_line[convert.py]")),
    Mutant("score_package_loads_torch_first", "processes", "score/__init__.py",
           "import importlib\n", "import importlib\nimport torch  # noqa\n",
           tests_of("test_reliability.py", "test_ctrl_c_while_a_command_loads_is_one_line[score.fid_cache]")),
    Mutant("sighup_ends_training_unsaved", "processes", "signals.py",
           "SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)", "SIGNALS = (signal.SIGINT, signal.SIGTERM)",
           tests_of("test_main.py", "test_a_stop_signal_saves_a_checkpoint_to_resume_from[SIGHUP]")),
    # ---- the ends of the schedule, and what is never written or scored
    Mutant("jsd_chain_visits_abar_zero", "diffusion", "sampling.py",
           "    usable = usable_steps(abar)\n",
           "    usable = T\n",
           tests_of(ENDS, "test_no_sampler_calls_the_network_where_abar_is_zero_and_every_sample_is_finite")),
    Mutant("one_step_spaced_from_t_0", "diffusion", "sampling.py",
           "    if steps == 1:\n        return [usable - 1]\n", "",
           tests_of(ENDS, "test_one_step_starts_at_the_last_t_with_abar_above_zero_and_gives_its_x0_hat")),
    Mutant("jsd_strides_respaced_over_t_prime", "diffusion", "sampling.py",
           "for t in spaced_in_time(T, steps, skip_type)", "for t in spaced_in_time(usable, steps, skip_type)",
           tests_of(ENDS, "test_jsd_keeps_the_strided_timesteps_that_never_reached_its_last_step")),
    Mutant("jsd_full_chain_taken_for_strided", "diffusion", "steps.py",
           "strided = timesteps != list(range(usable))", "strided = len(timesteps) < len(betas)",
           tests_of(ENDS, "test_no_sampler_calls_the_network_where_abar_is_zero_and_every_sample_is_finite")),
    Mutant("epsilon_bound_allowed_at_abar_zero", "diffusion", "diffusion.py",
           "if mean_type == \"epsilon\" and self.alphas_bar[-1] == 0:", "if False:",
           tests_of(ENDS, "test_a_bound_or_chain_with_an_undefined_term_is_refused_in_one_line")),
    Mutant("every_bound_refused_at_abar_zero", "diffusion", "diffusion.py",
           "if mean_type == \"epsilon\" and self.alphas_bar[-1] == 0:", "if self.alphas_bar[-1] == 0:",
           tests_of(ENDS, "test_what_is_defined_at_the_ends_stays_allowed_and_finite")),
    Mutant("bound_allowed_with_T_1", "diffusion", "diffusion.py",
           "        if self.T < 2:\n            raise ValueError(f\"{what} needs T >= 2",
           "        if False:\n            raise ValueError(f\"{what} needs T >= 2",
           tests_of(ENDS, "test_a_bound_or_chain_with_an_undefined_term_is_refused_in_one_line")),
    Mutant("bound_losses_unchecked", "diffusion", "diffusion.py",
           "        if loss_type != \"mse\":\n            self.check_bound(",
           "        if False:\n            self.check_bound(",
           tests_of(ENDS, "test_a_bound_or_chain_with_an_undefined_term_is_refused_in_one_line")),
    Mutant("bpd_bound_unchecked", "configuration", "config.py",
           "            if self.actions.bpd:  # every term of the bound", "            if False:  # every term of the bound",
           tests_of(ENDS, "test_a_bound_or_chain_with_an_undefined_term_is_refused_in_one_line")),
    Mutant("nan_eval_batches_saved", "evaluation", "evaluate.py",
           "        reports.require_finite(images, f\"sample batch {i}\",",
           "        (lambda *args: None)(images, f\"sample batch {i}\",",
           tests_of(ENDS, "test_nan_weights_with_noscore_save_samples_are_refused_and_nothing_is_written")),
    Mutant("nan_never_counted", "evaluation", "reports.py",
           "    if bad:\n        raise NonFiniteSamples", "    if False:\n        raise NonFiniteSamples",
           tests_of(ENDS, "test_nan_samples_make_no_grid_strip_or_interpolation")),
    Mutant("nan_progressive_strips_written", "evaluation", "reports.py",
           "    require_finite(torch.cat([progressive[name]", "    (lambda *args: None)(torch.cat([progressive[name]",
           tests_of(ENDS, "test_nan_samples_make_no_grid_strip_or_interpolation")),
    Mutant("nan_interpolation_written", "evaluation", "reports.py",
           "    require_finite(mixed, ", "    (lambda *args: None)(mixed, ",
           tests_of(ENDS, "test_nan_samples_make_no_grid_strip_or_interpolation")),
    Mutant("nan_training_grid_written", "evaluation", "train.py",
           "        require_finite(images, f\"the sample grid of step {step}\", \"it was not written\")\n", "",
           tests_of(ENDS, "test_nan_samples_make_no_grid_strip_or_interpolation")),
    Mutant("record_names_the_order_asked", "solvers", "solvers.py",
           "return {\"solver_order\": self.highest_order}", "return {\"solver_order\": self.order}",
           tests_of(ENDS, "test_the_record_names_the_highest_order_any_step_used")),
    Mutant("recorded_order_skips_the_warm_up", "solvers", "solvers.py",
           "return max(self.step_order(i, steps - i) for i in range(steps))",
           "return max(self.step_order(i, self.order) for i in range(steps))",
           tests_of(ENDS, "test_the_record_names_the_highest_order_any_step_used")),
    # ---- untrusted files: the lock, the readers, the store (issue 24)
    Mutant("lock_follows_a_link", "files", "lock.py",
           "os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK", "os.O_RDWR | os.O_CREAT | os.O_NONBLOCK",
           tests_of(UNTRUSTED, f"{LOCK_TEST}[link]")),
    Mutant("lock_writes_through_a_hard_link", "files", "lock.py",
           "if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:", "if not stat.S_ISREG(info.st_mode):",
           tests_of(UNTRUSTED, f"{LOCK_TEST}[hard link]")),
    Mutant("reader_opens_any_kind_of_file", "files", "files.py",
           "    if not stat.S_ISREG(info.st_mode):\n        why", "    if False:\n        why",
           tests_of(UNTRUSTED, "test_no_reader_opens_what_is_not_a_regular_file")),
    Mutant("reader_open_waits_for_a_fifo", "files", "files.py",
           "flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC", "flags = os.O_RDONLY | os.O_CLOEXEC",
           tests_of(UNTRUSTED, "test_no_reader_opens_what_is_not_a_regular_file")),
    Mutant("text_read_unbounded", "files", "files.py",
           "return read_regular(path, TEXT_LIMIT).decode", "return read_regular(path).decode",
           tests_of(UNTRUSTED, "test_a_text_file_past_its_bound_is_refused_without_reading_it_whole")),
    Mutant("refusal_invites_weights_only_false", "files", "checkpoint.py",
           ' and "weights_only" not in line and ', " and ",
           tests_of(UNTRUSTED, "test_a_refused_pickled_bin_runs_nothing_and_does_not_invite_weights_only_false")),
    Mutant("sixteen_bit_images_clipped", "data", "datasets.py",
           "    image = to_8_bits(image)\n", "",
           tests_of(UNTRUSTED, "test_16_bit_grayscale_images_are_scaled_to_8_bits_not_clipped")),
    Mutant("store_follows_a_link", "evaluation", "store.py",
           "with files.open_regular(self.path(i), follow_links=False) as file:",
           "with files.open_regular(self.path(i)) as file:",
           tests_of("test_evaluation.py", "test_entries_the_store_did_not_write_are_never_read_as_batches")),
    Mutant("store_checks_every_batch_name", "evaluation", "store.py",
           "for i in (i for i in found if i in batches):", "for i in (i for i in batches if i in found):",
           tests_of("test_evaluation.py", "test_finished_batches_are_found_in_one_listing_of_the_store")),
    Mutant("store_key_ignores_the_checkpoint", "evaluation", "evaluate.py",
           '"checkpoint": ckpt_sha256,', '"checkpoint": None,',
           tests_of("test_evaluation.py",
                    "test_a_new_checkpoint_between_an_interrupted_and_a_resumed_eval_draws_every_batch_again")),
    # ---- sizes and counts before any work (issue 24)
    Mutant("schedule_built_unmeasured", "configuration", "config.py",
           "        memory.check_schedule(self.T)", "        pass",
           tests_of("test_reliability.py", f"{SIZES_TEST}[values1-{SIZES_T}-67108864]")),
    Mutant("run_memory_unmeasured", "configuration", "main.py",
           "    memory.check(run_config, world_size, device_type)\n", "",
           tests_of("test_reliability.py", f"{SIZES_TEST}[values2-training a UNet of --ch 3200000-17179869184]")),
    Mutant("network_counted_in_elements", "configuration", "memory.py",
           "return sum(tensor.numel() * tensor.element_size()", "return sum(tensor.numel()",
           tests_of("test_reliability.py", "test_the_memory_estimate_is_a_lower_bound_of_the_network_built")),
    Mutant("save_samples_path_unchecked", "configuration", "main.py",
           "        check_samples_path(actions.save_samples)\n", "        pass\n",
           tests_of("test_reliability.py", "test_save_samples_onto_what_cannot_hold_them_is_one_line_before_sampling")),
    Mutant("negative_step_resumed", "checkpoints", "train.py",
           "isinstance(value, bool) or value < 0:", "isinstance(value, bool):",
           tests_of("test_reliability.py", "test_a_checkpoint_whose_step_is_no_count_of_steps_is_one_line")),
    Mutant("finished_run_claims_a_save", "checkpoints", "train.py",
           "    if state.step >= training.total_steps:  # a resumed run", "    if False:  # a resumed run",
           tests_of("test_reliability.py", "test_a_resume_already_past_total_steps_trains_and_writes_nothing")),
    # ---- convert.py: untrusted diffusers files, all-or-nothing writes
    Mutant("convert_reshapes_same_count_weights", "convert", "convert.py",
           "        if tuple(tensor.shape) not in allowed:", "        if tensor.numel() != math.prod(shape):",
           tests_of(CONVERT, f"{MISFIT}[same_count_other_shape]")),
    Mutant("convert_allocates_before_the_check", "convert", "convert.py",
           'with torch.device("meta"):', 'with torch.device("cpu"):', tests_of(CONVERT, f"{MISFIT}[gigabytes]")),
    Mutant("convert_config_kinds_unchecked", "convert", "diffusers_format.py",
           "    check_fields(config, UNET_FIELDS, REQUIRED_UNET_FIELDS)\n", "",
           tests_of(CONVERT, "test_a_malformed_config_is_one_line_naming_the_field_before_anything_is_built_or_read")),
    Mutant("convert_replaces_a_run_without_force", "convert", "convert.py",
           "if os.path.lexists(path) and not force:", "if False:",
           tests_of(CONVERT, "test_a_logdir_holding_a_run_is_refused_without_force_and_its_files_replaced_with_it")),
    Mutant("convert_temporary_folder_kept", "convert", "convert.py",
           "for path in [stage] + ([] if finished else made[::-1]):", "for path in ([] if finished else made[::-1]):",
           tests_of(CONVERT, "test_a_write_that_fails_midway_leaves_the_logdir_as_it_was")),
    Mutant("convert_made_folders_kept", "convert", "convert.py",
           "[stage] + ([] if finished else made[::-1])", "[stage]",
           tests_of(CONVERT, "test_a_write_that_fails_midway_leaves_the_logdir_as_it_was")),
    Mutant("convert_stop_signals_not_handled", "convert", "convert.py",
           "    signals.stop_at_once()", "    pass",
           tests_of(CONVERT, "test_sigterm_during_an_import_leaves_nothing_and_exits_143")),
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
    # ---- the recipes of issue 20 (Nichol & Dhariwal 2021, Min-SNR, EMA warm-up)
    Mutant("learned_range_frac_is_v", "recipes", "diffusion.py",
           "frac = (v + 1.0) / 2.0", "frac = v",
           tests_of(RECIPES, "test_learned_range_log_variance_is_eq_15")),
    Mutant("hybrid_gradient_not_stopped", "recipes", "diffusion.py",
           "frozen = torch.cat([mean_output.detach(), var_output], dim=1)",
           "frozen = torch.cat([mean_output, var_output], dim=1)",
           tests_of(RECIPES, "test_hybrid_gradients_reach_the_mean_through_l_simple_and_the_variance_through_l_vlb")),
    Mutant("hybrid_bound_not_times_T", "recipes", "diffusion.py",
           "mean_flat(mse) + self.hybrid_lambda * self.T * vb", "mean_flat(mse) + self.hybrid_lambda * vb",
           tests_of(RECIPES, "test_hybrid_loss_is_l_simple_plus_lambda_T_times_the_bound_term")),
    Mutant("importance_weights_not_1_over_T_p", "recipes", "diffusion.py",
           "return 1.0 / (self.T * probabilities.to(t.device)[t])", "return 1.0 / probabilities.to(t.device)[t]",
           tests_of(RECIPES, "test_the_reweighted_loss_is_unbiased")),
    Mutant("importance_without_uniform_mix", "recipes", "diffusion.py",
           "p = (1.0 - self.UNIFORM_WEIGHT) * p / p.sum() + self.UNIFORM_WEIGHT / self.T", "p = p / p.sum()",
           tests_of(RECIPES, "test_importance_probabilities_are_the_second_moment_formula")),
    Mutant("importance_history_not_in_checkpoint", "recipes", "train.py",
           "        if self.t_sampler is not None:\n            state[\"t_history\"]",
           "        if False:\n            state[\"t_history\"]",
           tests_of(RECIPES, "test_importance_sampling_and_every_recipe_resume_exactly")),
    Mutant("importance_history_of_local_losses", "recipes", "train.py",
           "gathered = distributed.all_gather_cat(torch.cat(recorded)).cpu()", "gathered = torch.cat(recorded).cpu()",
           tests_of(RECIPES, "test_importance_sampling_on_two_processes_draws_what_one_does")),
    Mutant("min_snr_min_max_swapped", "recipes", "diffusion.py",
           "return (gamma / snr).clamp(max=1.0)", "return (gamma / snr).clamp(min=1.0)",
           tests_of(RECIPES, "test_min_snr_weights_are_their_float64_recomputation")),
    Mutant("min_snr_xprev_weight_without_c1", "recipes", "diffusion.py",
           "return snr.clamp(max=gamma) / self.posterior_mean_coef1 ** 2", "return snr.clamp(max=gamma)",
           tests_of(RECIPES, "test_min_snr_weights_are_their_float64_recomputation")),
    Mutant("ema_warmup_off_by_one", "recipes", "train.py",
           "(1.0 + k) / (10.0 + k)", "(2.0 + k) / (11.0 + k)",
           tests_of(RECIPES, "test_ema_warmup_is_tensorflows_num_updates_rule_through_the_training_step")),
    # ---- one place knows a sampler: its declarations reach the flags, the checks and the record
    Mutant("sampler_option_range_unchecked", "samplers", "sampling.py",
           "        if problem:\n            raise ValueError(problem)", "        if False:\n            raise ValueError(problem)",
           tests_of(NEW_SAMPLER, "test_the_flags_take_a_registered_sampler_and_its_options_from_its_class")),
    Mutant("unused_eta_ignored", "samplers", "sampling.py",
           "if flag not in taken and values[flag] != OPTION_DEFAULTS[flag]:", "if False:",
           tests_of(NEW_SAMPLER, "test_the_flags_take_a_registered_sampler_and_its_options_from_its_class")),
    Mutant("solver_default_order_not_the_samplers", "samplers", "sampling.py",
           "order = values[\"solver_order\"] or step_class.DEFAULT_ORDER", "order = values[\"solver_order\"] or 2",
           tests_of("test_evaluation.py",
                    "test_the_protocol_record_names_the_spacing_used_the_solver_order_and_ddims_eps")),
    Mutant("sampler_record_fields_dropped", "samplers", "evaluate.py",
           "record.update(sampler.step.record())", "record.update({})",
           tests_of(NEW_SAMPLER, "test_a_registered_sampler_runs_through_a_resumable_eval_with_its_protocol_record")),
    Mutant("sampler_words_not_the_samplers", "samplers", "evaluate.py",
           "SAMPLERS.get(record[\"sampler\"], SamplerStep).describe(record)", "SamplerStep.describe(record)",
           tests_of(NEW_SAMPLER, "test_a_registered_sampler_runs_through_a_resumable_eval_with_its_protocol_record")),
    # ---- class-conditional models and classifier-free guidance (issue 26)
    Mutant("class_embedding_not_added", "guidance", "model.py",
           "temb = temb + (table[y] if not y.is_floating_point() else y.to(table.dtype) @ table)",
           "temb = temb + 0.0 * (table[y] if not y.is_floating_point() else y.to(table.dtype) @ table)",
           tests_of(GUIDANCE, "test_a_zero_class_embedding_is_the_unconditional_network_and_a_label_adds_to_the_time_embedding")),
    Mutant("null_label_never_used", "guidance", "sampling.py",
           "null = torch.full_like(labels, self.num_classes)", "null = labels.clone()",
           tests_of(GUIDANCE, "test_the_guided_output_is_the_float64_combination_and_the_step_clips_after_it")),
    Mutant("guidance_sign", "guidance", "sampling.py",
           "mean_u + w * (mean_c - mean_u)", "mean_c + w * (mean_u - mean_c)",
           tests_of(GUIDANCE, "test_the_guided_output_is_the_float64_combination_and_the_step_clips_after_it")),
    Mutant("guided_variance_of_the_unconditional_branch", "guidance", "sampling.py",
           "conditional[:, channels:]], dim=1)", "unconditional[:, channels:]], dim=1)",
           tests_of(GUIDANCE, "test_the_guided_output_is_the_float64_combination_and_the_step_clips_after_it")),
    Mutant("scale_one_asks_no_label", "guidance", "sampling.py",
           "return net(x_t, t, labels if w else null).to(x_t.dtype)", "return net(x_t, t, null).to(x_t.dtype)",
           tests_of(GUIDANCE, "test_scale_one_asks_the_conditional_branch_alone_and_zero_the_unconditional_one")),
    Mutant("draws_sorted_by_class", "guidance", "sampling.py",
           "    return j % num_classes", "    return j * num_classes // (first + count)",
           tests_of(GUIDANCE, "test_balanced_draws_hold_each_class_equally_whatever_the_batches")),
    Mutant("labels_shuffled_against_their_images", "guidance", "evaluate.py",
           "labels=None if labels is None else labels.to(device))", "labels=None if labels is None else labels.flip(0).to(device))",
           tests_of(GUIDANCE, "test_samples_and_their_labels_stay_together_through_the_evaluation")),
    Mutant("grid_rows_not_classes", "guidance", "evaluate.py",
           "unflatten(0, (per_row, cycle)).transpose(0, 1)", "unflatten(0, (cycle, per_row))",
           tests_of(GUIDANCE, "test_samples_and_their_labels_stay_together_through_the_evaluation")),
    Mutant("labels_never_dropped", "guidance", "train.py",
           "y = torch.where(dropped[part], classes, y) if classes else None", "y = y if classes else None",
           tests_of(GUIDANCE, "test_label_dropout_is_the_same_on_any_number_of_processes_and_micro_batches")),
    Mutant("label_dropout_drawn_per_process", "guidance", "train.py",
           "dropped = label_drops(config.run.seed, state.step,", "dropped = label_drops(config.run.seed + rank, state.step,",
           tests_of(GUIDANCE, "test_label_dropout_is_the_same_on_any_number_of_processes_and_micro_batches")),
    Mutant("label_drops_of_the_first_share", "guidance", "train.py",
           "y = torch.where(dropped[part], classes, y)", "y = torch.where(dropped[:micro_batch], classes, y)",
           tests_of("test_main.py", "test_two_processes_equal_one")),
    Mutant("device_labels_of_other_images", "guidance", "batches.py",
           "None if labels is None else labels[indices]", "None if labels is None else labels[indices.flip(0)]",
           tests_of("test_datasets.py", "test_each_image_keeps_its_label_on_both_training_paths")),
    Mutant("export_class_count_without_the_no_label_row", "guidance", "convert.py",
           'unet_config["num_class_embeds"] = unet.num_classes + 1', 'unet_config["num_class_embeds"] = unet.num_classes',
           tests_of(CONVERT, "test_a_model_exports_with_a_row_per_class_and_the_no_label_one_and_imports_back")),
    Mutant("import_reads_every_row_as_a_class", "guidance", "diffusers_format.py",
           'flags["num_classes"] = config["num_class_embeds"] - 1', 'flags["num_classes"] = config["num_class_embeds"]',
           tests_of(CONVERT, "test_a_conditional_model_imports_as_the_same_network_its_last_label_the_no_label_entry")),
    Mutant("conditional_demo_recipe_drifts", "guidance", "config/digits_cond.cfg",
           "--ema_decay=0.999", "--ema_decay=0.9999",
           tests_of(GUIDANCE, "test_the_conditional_demo_is_the_digits_demo_with_labels")),
    Mutant("label_dropout_from_the_timestep_stream", "guidance", "streams.py",
           "gen = generator(device, seed, LABEL_DROP, step)", "gen = generator(device, seed, TIMESTEP_NOISE, step)",
           tests_of(GUIDANCE, "test_labels_are_dropped_at_the_asked_rate_from_a_stream_of_the_step",
                    "test_label_dropout_is_the_same_on_any_number_of_processes_and_micro_batches")),
    # ---- Karras et al.'s samplers and spacing (issue 27)
    Mutant("heun_without_its_correction", "edm", "edm.py",
           "        if sigma_next > 0:\n            t_next", "        if False:\n            t_next",
           tests_of(EDM, "test_heun_is_algorithm_1", "test_heun_converges_at_second_order_on_gaussian_data")),
    Mutant("heun_churn_not_divided_by_the_steps", "edm", "edm.py",
           "min(self.churn / len(self.timesteps), ", "min(self.churn, ",
           tests_of(EDM, "test_heun_with_churn_is_algorithm_2")),
    Mutant("churn_asks_the_kept_timestep", "edm", "edm.py",
           "            t_hat = self.nearest_timestep(sigma_hat)\n", "",
           tests_of(EDM, "test_heun_with_churn_is_algorithm_2")),
    Mutant("denoiser_input_unscaled", "edm", "edm.py",
           "network(x / math.sqrt(1.0 + sigma_hat ** 2), t_hat)", "network(x, t_hat)",
           tests_of(EDM, "test_heun_is_algorithm_1")),
    Mutant("euler_ancestral_up_and_down_swapped", "edm", "edm.py",
           "sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)\n        x_next = x + (sigma_down - sigma)",
           "sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)\n        x_next = x + (sigma_up - sigma)",
           tests_of(EDM, "test_euler_ancestral_is_k_diffusions_step")),
    Mutant("edm_output_read_as_eps", "edm", "edm.py",
           '        if self.mean_type == "epsilon":\n            eps = output', '        if True:\n            eps = output',
           tests_of(EDM, "test_every_mean_type_is_sampled_through_its_own_x0_prediction")),
    Mutant("heun_one_step_per_evaluation", "edm", "edm.py",
           "return (evaluations + 1) // 2", "return evaluations",
           tests_of(EDM, "test_heun_is_algorithm_1")),
    Mutant("churn_ignored_by_other_samplers", "edm", "sampling.py",
           'REFUSED_UNLESS_TAKEN = ("eta", "churn")', 'REFUSED_UNLESS_TAKEN = ("eta",)',
           tests_of(EDM, "test_options_that_cannot_work_are_one_line_and_heuns_record_counts_its_evaluations")),
    Mutant("heun_record_claims_the_steps_asked", "edm", "edm.py",
           "        return 2 * len(self.timesteps) - 1", "        return 2 * len(self.timesteps)",
           tests_of(EDM, "test_options_that_cannot_work_are_one_line_and_heuns_record_counts_its_evaluations")),
    Mutant("churn_noise_unscaled", "edm", "edm.py",
           "* self.churn_noise * noise", "* noise",
           tests_of("test_k_diffusion.py", "test_every_step_equals_k_diffusion")),
    Mutant("karras_ramp_of_the_root_not_the_sigma", "edm", "sampling.py",
           "return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho",
           "return sigma_max + ramp * (sigma_min - sigma_max)",
           tests_of("test_k_diffusion.py", "test_karras_sigmas_equal_get_sigmas_karras")),
    Mutant("edm_variance_half_read_as_mean", "edm", "edm.py",
           "        if self.var_type in LEARNED_VARIANCES:\n            output, _ = split_learned_variance(output, x)\n",
           "        if self.var_type in LEARNED_VARIANCES:\n            output = output[:, :1] + output[:, 1:]\n",
           tests_of(EDM, "test_a_learned_variance_is_ignored_and_only_its_mean_half_sampled")),
    Mutant("karras_spacing_unrecorded", "edm", "evaluate.py",
           '    if sampler.skip_type == "karras":\n        record.update(', '    if False:\n        record.update(',
           tests_of(EDM, "test_the_protocol_record_names_the_karras_spacing_and_heuns_evaluations")),
    Mutant("karras_nearest_in_sigma", "edm", "diffusion.py",
           "return np.abs(np.log(levels)[None, :] - np.log(np.atleast_1d(targets))[:, None]).argmin(axis=1)",
           "return np.abs(levels[None, :] - np.atleast_1d(targets)[:, None]).argmin(axis=1)",
           tests_of(EDM, "test_karras_sigmas_are_eq_5_and_the_spacing_the_nearest_training_steps")),
    Mutant("karras_ramp_reversed", "edm", "sampling.py",
           "ramp = np.linspace(0.0, 1.0, count)", "ramp = np.linspace(1.0, 0.0, count)",
           tests_of(EDM, "test_karras_sigmas_are_eq_5_and_the_spacing_the_nearest_training_steps")),
    # ---- metrics beyond FID (issue 27)
    Mutant("neighbour_radius_counts_the_point_itself", "metrics", "score/distribution.py",
           ".kthvalue(k + 1, dim=1)", ".kthvalue(k, dim=1)",
           tests_of(METRICS, "test_precision_recall_density_coverage_equal_prdc")),
    Mutant("precision_and_recall_swapped", "metrics", "score/distribution.py",
           'return {"precision": precise.double().mean().item(), "recall": recalled.double().mean().item(),',
           'return {"precision": recalled.double().mean().item(), "recall": precise.double().mean().item(),',
           tests_of(METRICS, "test_precision_recall_density_coverage_equal_prdc")),
    Mutant("closed_balls", "metrics", "score/distribution.py",
           "inside = distances < real_dc[i:i + BLOCK, None]", "inside = distances <= real_dc[i:i + BLOCK, None]",
           tests_of(METRICS, "test_identical_sets_and_far_apart_sets_are_the_extremes")),
    Mutant("blocks_offset", "metrics", "score/distribution.py",
           "recalled[i:i + BLOCK] = (distances < fake_pr[None, :]).any(dim=1)",
           "recalled[:len(distances)] |= (distances < fake_pr[None, :]).any(dim=1)",
           tests_of(METRICS, "test_blocks_change_nothing")),
    Mutant("kid_biased_mmd", "metrics", "score/distribution.py",
           "within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))",
           "within = (k_xx.sum() + k_yy.sum()) / m ** 2",
           tests_of(METRICS, "test_the_unbiased_mmd_of_a_hand_made_case")),
    Mutant("kid_kernel_without_the_dimension", "metrics", "score/distribution.py",
           "return (a @ b.T / a.shape[1] + 1.0) ** 3", "return (a @ b.T + 1.0) ** 3",
           tests_of(METRICS, "test_kid_equals_torchmetrics_on_the_same_subsets")),
    Mutant("kid_sample_std", "metrics", "score/distribution.py",
           'values.std(unbiased=False).item()', 'values.std().item()',
           tests_of(METRICS, "test_kid_equals_torchmetrics_on_the_same_subsets")),
    Mutant("non_finite_features_scored", "metrics", "score/distribution.py",
           "    if not torch.isfinite(features).all():", "    if False:",
           tests_of(METRICS, "test_features_that_are_not_finite_or_do_not_fit_are_one_line")),
    Mutant("sfid_from_the_next_block", "metrics", "score/inception.py",
           "net.Mixed_6d.branch1x1.register_forward_hook", "net.Mixed_6e.branch1x1.register_forward_hook",
           tests_of("test_score.py", "test_sfid_features_are_the_tf_graphs_mixed_6_conv_found_by_running_the_network")),
    Mutant("sfid_in_channels_first_order", "metrics", "score/inception.py",
           "return feature_map[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)",
           "return feature_map[:, :SPATIAL_CHANNELS].flatten(1)",
           tests_of("test_score.py", "test_sfid_features_are_the_tf_graphs_mixed_6_conv_found_by_running_the_network")),
    Mutant("digits_spatial_after_the_pooling", "metrics", "score/digits.py",
           "grid = self.body[:4](x)", "grid = self.body[:5](x)",
           tests_of("test_score.py", "test_the_digits_spatial_stand_in_is_the_last_convolution_before_pooling")),
    Mutant("moments_forget_the_shift", "metrics", "score/metrics.py",
           "return self.shift + mean, (sigma + sigma.T) / 2", "return mean, (sigma + sigma.T) / 2",
           tests_of(EVAL_METRICS, "test_moments_of_batches_equal_the_statistics_of_all_features")),
    Mutant("moments_biased_covariance", "metrics", "score/metrics.py",
           "sigma = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)",
           "sigma = (self.outer - self.count * torch.outer(mean, mean)) / self.count",
           tests_of(EVAL_METRICS, "test_moments_of_batches_equal_the_statistics_of_all_features")),
    Mutant("moments_count_not_reduced", "metrics", "score/metrics.py",
           "for tensor in (count, self.total, self.outer):", "for tensor in (self.total, self.outer):",
           tests_of("test_score.py", "test_two_gloo_ranks_match_one_process")),
    Mutant("pr_and_dc_neighbours_swapped", "metrics", "score/scorer.py",
           "K_PRECISION_RECALL, K_DENSITY_COVERAGE = 3, 5", "K_PRECISION_RECALL, K_DENSITY_COVERAGE = 5, 3",
           tests_of(EVAL_METRICS, STREAMED_METRICS)),
    Mutant("sfid_against_itself", "metrics", "score/scorer.py",
           'scores["sFID"] = frechet_distance(*spatial, *self.reference_spatial)',
           'scores["sFID"] = frechet_distance(*self.reference_spatial, *self.reference_spatial)',
           tests_of(EVAL_METRICS, STREAMED_METRICS)),
    Mutant("store_spatial_from_the_pool_features", "metrics", "evaluate.py",
           'moments.add(part["spatial"])', 'moments.add(part["spatial"][:1].expand(len(part["spatial"]), -1))',
           tests_of(EVAL_METRICS, STREAMED_METRICS)),
    Mutant("metrics_flag_not_passed_on", "metrics", "evaluate.py",
           "                          metrics=scoring.metrics)", "                          )",
           tests_of(EVAL_METRICS, STREAMED_METRICS)),
    Mutant("eval_scores_not_in_tensorboard", "metrics", "evaluate.py",
           "            tag=\"eval/\")", "            tag=\"eval\")",
           tests_of(EVAL_METRICS, STREAMED_METRICS)),
    Mutant("older_file_silently_scored", "metrics", "score/scorer.py",
           "        if missing and is_main_process():", "        if False:",
           tests_of(EVAL_METRICS, "test_an_older_statistics_file_scores_fid_and_is_and_says_what_it_cannot_in_one_line")),
    Mutant("reference_features_not_checked", "metrics", "score/metrics.py",
           "if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all()]",
           "if not np.issubdtype(array.dtype, np.number)]",
           tests_of(EVAL_METRICS, "test_reference_features_that_do_not_fit_or_are_not_finite_are_refused")),
    Mutant("fid_cache_subset_seed_ignored", "metrics", "score/fid_cache.py",
           "generator=torch.Generator().manual_seed(seed))[:num_features]",
           "generator=torch.Generator().manual_seed(0))[:num_features]",
           tests_of("test_score.py", "test_fid_cache_keeps_a_seeded_subset_of_features_and_the_spatial_statistics")),
    Mutant("metrics_names_unchecked", "metrics", "config.py",
           "require(self.metrics and not unknown and len(set(self.metrics)) == len(self.metrics),",
           "require(not unknown,",
           tests_of(EVAL_METRICS, "test_metric_names_are_checked_before_anything_runs")),
    Mutant("idle_rank_concatenates_nothing", "metrics", "evaluate.py",
           "features, logits = [torch.empty(0, widths[0])], [torch.empty(0, widths[1])]", "features, logits = [], []",
           tests_of(EVAL_METRICS, "test_a_process_without_batches_brings_empty_features")),
    # ---- fp16 and the precision chosen by the device (issue 28)
    Mutant("bf16_chosen_from_volta_on", "fp16", "speed.py",
           "NATIVE_BF16 = (8, 0)", "NATIVE_BF16 = (7, 0)",
           tests_of("test_speed.py", "test_the_precision_left_unset_is_the_devices")),
    Mutant("resumed_precision_ignored", "fp16", "speed.py",
           "precision=fast.precision or precision or device_precision(device_type)[0],",
           "precision=fast.precision or device_precision(device_type)[0],",
           tests_of("test_speed.py", "test_the_precision_left_unset_is_the_devices")),
    Mutant("fp16_autocasts_to_bf16", "fp16", "speed.py",
           'AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}',
           'AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.bfloat16}',
           tests_of("test_speed.py", "test_fp16_train_step_matches_fp32")),
    Mutant("gradients_clipped_scaled", "fp16", "train.py",
           "        scaling.scaler.unscale_(optimizer)\n", "        pass\n",
           tests_of(FP16, "test_a_scaled_step_is_the_unscaled_step_exactly")),
    Mutant("overflow_counted_as_a_bad_step", "fp16", "train.py",
           "bad = ~torch.isfinite(loss) | (skipped & (scaling.scaler._scale < 1))", "bad = skipped",
           tests_of(FP16, FP16_OVERFLOW)),
    Mutant("a_collapsed_scale_never_stops_training", "fp16", "train.py",
           "bad = ~torch.isfinite(loss) | (skipped & (scaling.scaler._scale < 1))", "bad = ~torch.isfinite(loss)",
           tests_of(FP16, FP16_OVERFLOW)),
    Mutant("warmup_counts_skipped_steps", "fp16", "train.py",
           "            if applied:\n                scheduler.step()", "            scheduler.step()",
           tests_of(FP16, FP16_OVERFLOW)),
    Mutant("scale_never_updated", "fp16", "train.py",
           "    scaling.scaler.update()\n", "    pass\n",
           tests_of(FP16, FP16_OVERFLOW)),
    Mutant("loss_scale_not_saved", "fp16", "train.py",
           '            state["loss_scale"] = self.scaling.state_dict()', "            pass",
           tests_of(FP16, FP16_RESUME)),
    Mutant("loss_scale_not_restored", "fp16", "train.py",
           'self.scaling.load_state_dict(saved["loss_scale"], path)  # else it starts at 65,536', "pass",
           tests_of(FP16, FP16_RESUME)),
    Mutant("importance_history_sees_an_overflow", "fp16", "train.py",
           "if torch.isfinite(gathered).all() and not skipped:", "if torch.isfinite(gathered).all():",
           tests_of(RECIPES, "test_an_fp16_overflow_leaves_the_loss_history_as_it_was")),
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
        # -n 0: one process (pytest.ini runs the suite on every core)
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider",
                                 *tests],
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
