"""Fine-tune a sequence classifier with LoRA under Accelerate: the recipe, top to bottom.

    accelerate launch peft_agnews/train.py [--config FILE.yaml] [--option value ...]

`run`: start_run (seed, output folder, checkpoint to resume) -> build_data -> build_model (+ plan) ->
build_optimisation (AdamW, schedule, prepare) -> [resume] -> fit (the loop: evaluate, checkpoint, stop early or on a
signal) -> finish (best adapter, test split, report, results.json).

Exit status: 0 done; 2 bad input or configuration; 3 non-finite loss or gradient; 75 stopped by SIGTERM/SIGINT
after writing a checkpoint (continue with `--resume_from_checkpoint latest`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed
from datasets import DatasetDict
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from peft.utils.other import fsdp_auto_wrap_policy

from peft_agnews.batching import eval_order, make_dataloaders, tokenize_splits
from peft_agnews.checkpointing import (
    FINGERPRINT_SUFFIX,
    OPTIONS_KEY,
    Checkpointer,
    CorruptCheckpointError,
    adapter_weights,
    load_adapter_weights,
    read_state,
    resolve_checkpoint,
    step_of,
    with_older_hint,
)
from peft_agnews.config import RESOLVED_OPTIONS, TrainConfig, mask_secret_arguments, parse_config
from peft_agnews.console import log_level, logger as log, progress_bar
from peft_agnews.data import classes_missing_from_training, fingerprint_rows, load_splits_and_validation_source
from peft_agnews.labels import class_names
from peft_agnews.errors import TrainingInterrupted, UsageError, first_line, run_command
from peft_agnews.hardware import resolve_mixed_precision
from peft_agnews.hub import push
from peft_agnews.runtime import accelerator_session, distributed_on_cpu
from peft_agnews.metrics import classification_metrics, classification_report, worst_misclassified
from peft_agnews.scoring import predict_logits, score_split
from peft_agnews import speed
from peft_agnews.artifacts import save_adapter, write_adapter_companions, write_json
from peft_agnews.loop_state import (
    StopSignal, TrainState, epoch_batches, nonfinite_error, step_health, stop_agreed, stop_when_launcher_dies,
)
from peft_agnews.figures import write_run_plots
from peft_agnews.model_card import write_adapter_card
from peft_agnews.heads import ours, research_head_warning
from peft_agnews.model import (
    apply_lora,
    trainable_breakdown,
    targets_without_lora,
    check_gradient_flow,
    count_parameters,
    check_max_length,
    hub_options,
    load_base_model,
    load_model_config,
    load_tokenizer,
    optimizer_param_groups,
)
from peft_agnews.objectives import classification_loss
from peft_agnews.plan import Plan, evaluates_at, make_optimizer, make_scheduler, saves_at
from peft_agnews.run_folder import RESULTS_FILE, check_output_dir, lock_output_dir, start_writing
from peft_agnews.trackers import report_to_notes, resolve_trackers, tensorboard_dir
from peft_agnews.tracking import RunLogger, ThroughputMeter, describe_run

# Rows in the end-of-run table of misclassified validation examples (most confident mistakes first).
MISCLASSIFIED_ROWS = 50
VALIDATION_REPORT = "eval_validation.json"  # figures.write_run_plots draws eval_<split>.json as eval_<split>.png


def run_precision(cfg: TrainConfig) -> str:
    """The precision this run computes in ('no', 'fp16', 'bf16'), `--mixed_precision auto` resolved."""
    on_cpu = distributed_on_cpu() or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available()
    precision = resolve_mixed_precision(cfg.mixed_precision, on_cpu)
    if precision == "fp16" and on_cpu:  # Accelerate autocasts fp16 on accelerators only: it would run fp32 silently
        raise UsageError("fp16 mixed precision needs a GPU (Accelerate has no fp16 autocast on CPU); on this machine "
                         "use --mixed_precision bf16 or no (or auto), or a launch config without fp16")
    return precision


def accelerator_options(cfg: TrainConfig) -> dict:
    """The training Accelerator's precision, accumulation and trackers (see `runtime.accelerator_session`).

    A half-precision base computes in bf16 by its own dtype: the Accelerator then adds no autocast."""
    precision = run_precision(cfg)
    return dict(
        mixed_precision="no" if cfg.half_precision_base else precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=resolve_trackers(cfg) or None,
        # TensorBoard writes under logging_dir (trackers.tensorboard_dir); nothing else reads these folders.
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(tensorboard_dir(Path(cfg.output_dir)))),
        # We step the scheduler once per real optimizer step ourselves: its length is counted in optimizer steps,
        # not multiplied by the process count as Accelerate's default stepping assumes.
        step_scheduler_with_optimizer=False,
    )


def use_lora_wrap_policy(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Under FSDP1, shard LoRA-aware (PEFT's policy): transformer layers (FSDP_TRANSFORMER_CLS_TO_WRAP, set by
    `accelerate launch` from the config, else the model's `_no_split_modules`) and every leaf with trainable
    weights become FSDP units, so frozen base weights and trained LoRA/head weights never share a flat parameter."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and plugin.fsdp_version == 1:
        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)


def run(cfg: TrainConfig) -> dict | None:
    """Train, evaluate, export. Returns results (None for a dry run)."""
    with log_level(cfg.log_level):
        session_options = accelerator_options(cfg)  # the trackers and precision, refused first when unusable
        # Before anything is created: the model's config (its own code refused unless --trust_remote_code), and
        # --max_length against its position table (a longer input would fail mid-training).
        model_config = load_model_config(cfg.model_name_or_path, "--model_name_or_path", cfg.trust_remote_code,
                                         **hub_options(cfg))
        check_max_length(model_config, cfg.max_length, cfg.model_name_or_path)
        with accelerator_session(cfg.num_threads, **session_options) as accelerator:
            # --global_batch_size: the micro-batch and accumulation follow from the process count, known only now.
            cfg = cfg.for_processes(accelerator.num_processes)
            accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
            lock = None if cfg.dry_run else lock_output_dir(cfg, accelerator)  # a dry run writes nothing
            try:
                return _run(cfg, accelerator)
            finally:
                if lock is not None:
                    lock.release()


@dataclass
class Data:
    """The tokenized splits and their loaders (not yet prepared), and the config with the class names known."""

    cfg: TrainConfig
    tokenizer: PreTrainedTokenizerBase
    splits: DatasetDict
    tokenized: DatasetDict
    loaders: dict[str, DataLoader]
    validation_source: str  # where the validation rows came from, in words (for the model card)


@dataclass
class Built:
    """The model with LoRA (and, when asked, a frozen prefix) and the run's plan."""

    model: PeftModel
    plan: Plan
    trainable_params: int
    total_params: int
    prefix: speed.FrozenPrefixLayers | None
    frozen_dtype: torch.dtype  # of the frozen prefix's cache: the half precision in use, else fp32
    compile_stats: speed.CompileStats | None = None  # graphs compiled and compile time since the model was built


@dataclass
class Optimisation:
    """What `accelerator.prepare` returned: the wrapped model, optimizer, scheduler and loaders."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    val_loader: DataLoader


def _run(cfg: TrainConfig, accelerator: Accelerator) -> dict | None:
    wall_start = time.perf_counter()
    out, resume_from, tracker_run_ids = start_run(cfg, accelerator)
    data = build_data(cfg, accelerator)
    cfg = data.cfg
    built = build_model(cfg, data, accelerator, out)
    if cfg.dry_run:
        describe_trainable(cfg, built, accelerator)
        return None
    start_writing(out, fresh=resume_from is None, accelerator=accelerator)  # data and model are good: now write
    optim = build_optimisation(cfg, data, built, accelerator, out)
    # Each checkpoint is also a plain adapter: PEFT's files plus the tokenizer, labels.json and head.json.
    companions = partial(write_adapter_companions, tokenizer=data.tokenizer, label_names=cfg.label_names,
                         classifier_head=cfg.classifier_head,
                         multi_label_threshold=cfg.multi_label_threshold if cfg.multi_label else None)
    checkpointer = Checkpointer(accelerator, optim.model, out / "checkpoints", cfg.save_total_limit,
                                run_shape(cfg, data, built), fresh=resume_from is None, companions=companions)
    with latest_hint(cfg, resume_from):
        state = TrainState.restore(*checkpointer.load(resume_from)) if resume_from else TrainState()
    logger = start_logging(cfg, data, built, accelerator, out, state, tracker_run_ids, resumed=resume_from is not None)
    started = time.perf_counter()
    with StopSignal() as stop:  # also over the final evaluation: a signal there stops with a checkpoint too
        fit(cfg, built.plan, accelerator, optim, logger, checkpointer, state, stop)
        return finish(cfg, data, built, optim, accelerator, logger, state, out,
                      runtime=time.perf_counter() - started, wall_start=wall_start, stop=stop, checkpointer=checkpointer)


def start_run(cfg: TrainConfig, accelerator: Accelerator) -> tuple[Path, Path | None, dict[str, str]]:
    """Seed, check the output folder, and find the checkpoint to resume from: (output folder, checkpoint or None,
    the tracker run ids it recorded)."""
    if accelerator.is_main_process:
        for note in report_to_notes(cfg) + ([research_head_warning(cfg.classifier_head)] if ours(cfg.classifier_head) else []):
            print(note, file=sys.stderr)
    set_seed(cfg.seed)
    out = check_output_dir(cfg)
    resume_from = resolve_checkpoint(cfg.resume_from_checkpoint, out / "checkpoints", cfg.overwrite_output_dir, accelerator.print)
    # Read the checkpoint's JSON state now: a corrupt one fails before minutes of data and model loading.
    with latest_hint(cfg, resume_from):
        counters = read_state(resume_from)["counters"] if resume_from else {}
    run_ids = {"wandb": counters.get("tracker_run_id"), "mlflow": counters.get("mlflow_run_id")}
    return out, resume_from, {name: run_id for name, run_id in run_ids.items() if run_id}


def build_data(cfg: TrainConfig, accelerator: Accelerator) -> Data:
    """Validated, split, tokenized once (the main process fills the datasets cache, the others read it)."""
    tokenizer = load_tokenizer(cfg)
    with accelerator.main_process_first():
        splits, validation_source = load_splits_and_validation_source(cfg)
        tokenized = tokenize_splits(splits, tokenizer, cfg.max_length)
    # The class names are known now (--label_names, else the dataset's ClassLabel names).
    cfg = replace(cfg, label_names=class_names(splits["train"].features["label"]))
    for split, classes in classes_missing_from_training(splits).items():
        if accelerator.is_main_process:
            print(f"warning: class(es) {classes} appear in the {split} rows but in no training row: the model cannot "
                  "learn them; add training rows of those classes", file=sys.stderr)
    loaders = make_dataloaders(tokenized, tokenizer, cfg, accelerator.num_processes)
    return Data(cfg, tokenizer, splits, tokenized, loaders, validation_source)


def build_model(cfg: TrainConfig, data: Data, accelerator: Accelerator, out: Path) -> Built:
    """Base + LoRA within the parameter budget, and the plan (printed)."""
    model = apply_lora(load_base_model(cfg), cfg)
    unplaced = targets_without_lora(model, cfg.lora_target_modules)
    if unplaced and accelerator.is_main_process:
        print(f"warning: --lora_target_modules {unplaced} got no LoRA: outside --lora_layers {cfg.lora_layers} "
              "(LoRA goes inside the encoder's layers only) or excluded by --lora_exclude_modules", file=sys.stderr)
    # The speed options (PCG64 masks, the frozen prefix, the first-token last layer, the dtype of the frozen base,
    # torch.compile): see speed/__init__.py.
    precision = run_precision(cfg)
    compile_stats = speed.CompileStats.start() if cfg.torch_compile else None
    prefix = speed.apply(model, cfg, accelerator.num_processes, precision, say=log.info)
    trainable, total_params = count_parameters(model)
    half = speed.HALF.get(precision)
    splits = data.splits
    plan = Plan.build(cfg, len(splits["train"]), len(splits["validation"]), accelerator, precision,
                      test_examples=len(splits["test"]) if "test" in splits else 0)
    log.info(plan.describe(trainable, total_params))
    if prefix is not None:
        log.info(speed.describe_prefix(prefix, cfg, list(data.tokenized["train"]["length"]),
                                       model.get_base_model().config.hidden_size, half or torch.float32,
                                       out / speed.CACHE_DIR))
    return Built(model, plan, trainable, total_params, prefix, half or torch.float32, compile_stats)


def describe_trainable(cfg: TrainConfig, built: Built, accelerator: Accelerator) -> None:
    """--dry_run: the rank and the trainable parameters by module kind."""
    rank = built.model.peft_config["default"].r
    accelerator.print(f"LoRA rank {rank}" + (" (auto: largest that fits)" if cfg.lora_r == "auto" else "")
                      + f", budget {cfg.max_trainable_params:,}; trainable parameters by module:")
    for name, count in trainable_breakdown(built.model).items():
        accelerator.print(f"  {name:<40} {count:>12,}")


def build_optimisation(cfg: TrainConfig, data: Data, built: Built, accelerator: Accelerator, out: Path) -> Optimisation:
    """AdamW over the trainable parameters, the schedule, and `accelerator.prepare` (FSDP: LoRA-aware wrapping)."""
    if cfg.cache_frozen_prefix:
        speed.attach_cache(built.prefix, built.model, cfg, data.splits["train"], data.tokenized["train"],
                           built.frozen_dtype, out / speed.CACHE_DIR, accelerator)
    groups = optimizer_param_groups(built.model, cfg.weight_decay, cfg.head_learning_rate)
    optimizer = make_optimizer(cfg, groups, accelerator.device)
    scheduler = make_scheduler(cfg, optimizer, built.plan)
    use_lora_wrap_policy(accelerator, built.model)
    return Optimisation(*accelerator.prepare(
        built.model, optimizer, scheduler, data.loaders["train"], data.loaders["validation"]
    ))


def run_shape(cfg: TrainConfig, data: Data, built: Built) -> dict:
    """What a resumed run must share with this one: the shape, the rows of every split it trains and selects on
    (not just their count), and every option that changes the math."""
    fingerprints = {f"{name}{FINGERPRINT_SUFFIX}": fingerprint_rows(data.splits[name]["text"], data.splits[name]["label"])
                    for name in ("train", "validation")}
    # Compared as resolved here ('auto' -> bf16, sdpa, ...): the same math under another spelling resumes.
    resolved = {"mixed_precision": built.plan.mixed_precision,
                "attn_implementation": built.model.get_base_model().config._attn_implementation}
    options = {**cfg.resume_critical(), **{name: resolved[name] for name in RESOLVED_OPTIONS}}
    return {**built.plan.shape(cfg), **fingerprints, OPTIONS_KEY: options}


def start_logging(cfg: TrainConfig, data: Data, built: Built, accelerator: Accelerator, out: Path, state: TrainState,
                  tracker_run_ids: dict[str, str], resumed: bool) -> RunLogger:
    """metrics.jsonl and the tracker runs (the checkpoint's runs continued when resuming)."""
    logger = RunLogger(accelerator, out)
    data_sizes = {f"{name}_examples": len(split) for name, split in data.splits.items()}
    params = {"trainable_params": built.trainable_params, "total_params": built.total_params}
    logger.start(
        cfg, describe_run(cfg, accelerator, params=params, data=data_sizes, plan=asdict(built.plan)),
        resume_run_ids=tracker_run_ids, resume_step=state.step if resumed else None,
    )
    run_ids = {**tracker_run_ids, **logger.run_ids}
    state.tracker_run_id, state.mlflow_run_id = run_ids.get("wandb"), run_ids.get("mlflow")
    return logger


def finish(cfg: TrainConfig, data: Data, built: Built, optim: Optimisation, accelerator: Accelerator,
           logger: RunLogger, state: TrainState, out: Path, runtime: float, wall_start: float,
           stop: StopSignal, checkpointer: Checkpointer) -> dict:
    """The best weights back into the model, the test split, the misclassified table, then (main process) the
    adapter, the report and card, the tracker summary and results.json, last. A stop signal received by then
    stops the run as in the loop (checkpoint, exit 75) before anything is written."""
    model, plan = optim.model, built.plan
    # The deliverable is the best adapter, not the last one.
    unwrapped = accelerator.unwrap_model(model)
    last_weights = adapter_weights(unwrapped)
    load_adapter_weights(unwrapped, state.best_weights)
    results = {
        "trainable_params": built.trainable_params,
        "total_params": built.total_params,
        "best_step": state.best_step,
        "best_eval_accuracy": state.best_accuracy,
        # As the Trainer's state: the metric that picked the best step and its value there.
        "metric_for_best_model": cfg.metric_for_best_model,
        "best_metric": state.best_metric,
        f"best_eval_{cfg.metric_for_best_model}": state.best_metric,
        "global_step": state.step,
        "early_stopped": state.early_stopped,
        "skipped_optimizer_steps": state.skipped_steps,
        "train_runtime": runtime,
        "train_samples_per_second": state.samples_seen / runtime,
        "num_processes": plan.num_processes,
        "mixed_precision": plan.mixed_precision,
        "num_threads": plan.num_threads,
    }
    test = score_split(model, accelerator.prepare(data.loaders["test"]), accelerator, len(cfg.label_names),
                       cfg.multi_label_threshold) if "test" in data.loaders else None
    # The best evaluation's predictions (every process has them) feed the misclassified table, card and plots.
    # A resumed run whose best step came before the interruption scores the restored best weights once more.
    if state.best_predictions is None:
        state.best_predictions = predict_logits(model, optim.val_loader, accelerator)
    if stop_agreed(accelerator, stop):
        load_adapter_weights(unwrapped, last_weights)  # a checkpoint holds the last step's weights, as in the loop
        raise stopped_after_training(stop, checkpointer, state)
    if test is not None:
        scores = ("accuracy", "f1_macro", "loss") + (("f1_micro",) if cfg.multi_label else ())
        results.update({f"test_{key}": test[key] for key in scores} | {"test_examples": test["num_examples"]})
        logger.log_evaluation("test", test, cfg.label_names, step=state.step)
    validation = {**classification_report(*state.best_predictions, cfg.label_names, cfg.multi_label_threshold),
                  "source": data.validation_source}
    if accelerator.is_main_process:
        ordered = data.splits["validation"].select(eval_order(data.tokenized["validation"]))
        rows = worst_misclassified(
            *state.best_predictions, list(ordered["text"]), list(ordered["label"]), cfg.label_names, MISCLASSIFIED_ROWS,
            cfg.multi_label_threshold,
        )
        logger.log_table("eval/misclassified", rows, step=state.step)
    results["wall_time_seconds"] = time.perf_counter() - wall_start
    if built.compile_stats is not None:  # compile time is inside train_runtime and wall_time_seconds: reported apart
        results.update(built.compile_stats.report())
        log.info(f"torch.compile: {results['compiled_graphs']} graph(s) compiled in {results['compile_seconds']:.1f} s")
    # Sharded (FSDP) weights must be gathered by every process; otherwise this is the model's own state dict.
    full_state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_adapter(unwrapped, data.tokenizer, cfg.label_names, out / "adapter", state_dict=full_state,
                     classifier_head=cfg.classifier_head,
                     multi_label_threshold=cfg.multi_label_threshold if cfg.multi_label else None)
        write_json(out / VALIDATION_REPORT, validation)
        write_run_plots(out, reports=[VALIDATION_REPORT])  # not the eval_*.json other commands put there
        write_adapter_card(out / "adapter", cfg, results, validation)
        logger.finish_run(results, out / "adapter", metadata={"config": cfg.to_dict()}, step=state.step)
        write_json(out / RESULTS_FILE, results)  # last: its presence marks a finished run
        if cfg.push_to_hub:
            push_adapter(cfg, out / "adapter")
    log.info(f"best validation {cfg.metric_for_best_model} {state.best_metric:.4f} at step {state.best_step}; "
             f"adapter in {out / 'adapter'}")
    accelerator.wait_for_everyone()
    return results


def push_adapter(cfg: TrainConfig, adapter_dir: Path) -> None:
    """--push_to_hub: the finished adapter folder (weights, card, tokenizer, labels) as one commit, as the Trainer's
    push at the end of training. A failure leaves the finished run in place and says how to push it later."""
    try:
        push(adapter_dir, cfg.hub_model_id, private=cfg.hub_private_repo, commit_message="End of training")
    except Exception as err:  # network, authentication, permissions: huggingface_hub raises many types
        raise UsageError(
            f"training finished ({adapter_dir}) but the push to {cfg.hub_model_id} failed: {first_line(err)}; push it "
            f"later with peft-agnews export --adapter_dir {adapter_dir} --output_dir <folder> --push_to_hub "
            f"--hub_model_id {cfg.hub_model_id}"
        ) from None


def stopped_after_training(stop: StopSignal, checkpointer: Checkpointer, state: TrainState) -> TrainingInterrupted:
    """A stop signal during the final evaluation: the finished training's checkpoint (written now unless the last
    step has one), and the note the command exits 75 with. Resuming redoes only the final evaluation."""
    last = checkpointer.last_saved  # the checkpoint resumed from may lie in another folder, where latest looks not
    if last is None or last.parent != checkpointer.folder or step_of(last) != state.step:
        last = checkpointer.save(state.step, state.counters(), state.best_weights)
    return TrainingInterrupted(
        f"stopped by {stop.received or 'a signal on another process'} during the final evaluation (training had "
        f"finished at step {state.step}); checkpoint {last}; finish with --resume_from_checkpoint latest"
    )


@contextmanager
def latest_hint(cfg: TrainConfig, checkpoint: Path | None) -> Iterator[None]:
    """A corrupt checkpoint that `latest` picked: the error also names the older one to pass instead."""
    try:
        yield
    except CorruptCheckpointError as err:
        if cfg.resume_from_checkpoint != "latest" or checkpoint is None:
            raise
        raise with_older_hint(err, checkpoint) from None


def fit(cfg: TrainConfig, plan: Plan, accelerator: Accelerator, optim: Optimisation, logger: RunLogger,
        checkpointer: Checkpointer, state: TrainState, stop: StopSignal) -> TrainState:
    """The loop: accumulate, clip, check, step; log, evaluate, checkpoint and stop on optimizer-step boundaries.

    `state` is fresh or restored from a checkpoint: the loop continues at its epoch and batch position.
    """
    model, optimizer, scheduler, train_loader = optim.model, optim.optimizer, optim.scheduler, optim.train_loader
    preflight_pending = state.step == 0
    loss_sum = torch.zeros((), device=accelerator.device)
    micro_batches = 0
    grad_norm = None
    throughput = ThroughputMeter(accelerator)
    progress = progress_bar(accelerator.is_local_main_process, total=plan.total_steps, initial=state.step, desc="train")
    model.train()
    for epoch in range(state.epoch, plan.num_epochs):
        if state.step >= plan.total_steps or state.early_stopped:  # also when resuming a finished run
            break
        if epoch != state.epoch:
            state.epoch, state.batches_in_epoch = epoch, 0
        train_loader.set_epoch(epoch)
        for batch in epoch_batches(accelerator, train_loader, state.batches_in_epoch):
            with accelerator.accumulate(model):
                loss = classification_loss(model, batch, cfg.label_smoothing, cfg.rdrop_alpha)
                accelerator.backward(loss)
                loss_sum += loss.detach()  # summed on device: no host sync per micro-batch
                if accelerator.sync_gradients:
                    # An infinite limit measures the norm without clipping.
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
                    loss_ok, grads_ok, stop_requested = step_health(accelerator, model, loss_sum, grad_norm, stop)
                    # fp16: the grad scaler skips overflowing steps by design (counted below); otherwise stop
                    # before the optimizer writes NaN into the weights.
                    if not loss_ok or (not grads_ok and accelerator.scaler is None):
                        raise nonfinite_error("loss" if not loss_ok else "gradient", state.step + 1,
                                              checkpointer.last_saved, state.best_step)
                    if preflight_pending:
                        preflight_pending = not gradient_preflight(accelerator, model)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad()
            micro_batches += 1
            state.batches_in_epoch += 1
            state.samples_seen += len(batch["labels"])
            throughput.update(batch)
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            state.skipped_steps += int(accelerator.optimizer_step_was_skipped)
            progress.update(1)
            if state.step % cfg.logging_steps == 0:
                metrics = {
                    "train/loss": accelerator.reduce(loss_sum / micro_batches, "mean").item(),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/epoch": state.step / plan.steps_per_epoch,
                    **throughput.report(),
                }
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                if accelerator.scaler is not None:
                    metrics["train/skipped_steps"] = state.skipped_steps
                logger.log(metrics, step=state.step)
                progress.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                loss_sum.zero_()
                micro_batches = 0
            with throughput.paused():
                improved = evaluates_at(cfg, plan, state.step) and run_evaluation(
                    cfg, accelerator, model, optim.val_loader, logger, state)
                if saves_at(cfg, plan, state.step, improved) or stop_requested:
                    saved = checkpointer.save(state.step, state.counters(), state.best_weights)
                    if accelerator.is_main_process:
                        logger.log_checkpoint(saved, state.step, state.step / plan.steps_per_epoch)
            if stop_requested:
                raise TrainingInterrupted(
                    f"stopped by {stop.received or 'a signal on another process'} at step {state.step}; "
                    f"checkpoint {checkpointer.last_saved}; continue with --resume_from_checkpoint latest"
                )
            if 0 < cfg.early_stopping_patience <= state.evals_without_improvement:
                state.early_stopped = True
                log.info(f"early stopping at step {state.step}: no better validation {cfg.metric_for_best_model} "
                         f"in {state.evals_without_improvement} evaluations")
            if state.step >= plan.total_steps or state.early_stopped:
                break
    progress.close()
    state.samples_seen = int(accelerator.reduce(torch.tensor(state.samples_seen, device=accelerator.device), "sum"))
    return state


def gradient_preflight(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """Check gradient flow at the first optimizer step. Returns False when inconclusive (an fp16 overflow step,
    which the grad scaler skips); the check then runs again at the next step."""
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    if accelerator.scaler is not None and not all(torch.isfinite(g).all() for g in grads):
        return False
    check_gradient_flow(accelerator.unwrap_model(model))
    return True


def run_evaluation(cfg: TrainConfig, accelerator: Accelerator, model: torch.nn.Module, val_loader: DataLoader,
                   logger: RunLogger, state: TrainState) -> bool:
    """Score the validation split, log it, and keep the weights and predictions when --metric_for_best_model is the
    best so far (returned: whether it is)."""
    started = time.perf_counter()
    # Starting the loader's iterator draws a seed from torch's global generator, which every later dropout mask
    # comes from: an evaluation must leave it as it was, or how often the run evaluates changes the weights.
    with torch.random.fork_rng(devices=[]):
        logits, labels = predict_logits(model, val_loader, accelerator)
    metrics = classification_metrics(logits, labels, len(cfg.label_names), cfg.multi_label_threshold)
    metrics["samples_per_second"] = metrics["num_examples"] / (time.perf_counter() - started)
    logger.log_evaluation("eval", metrics, cfg.label_names, step=state.step)
    chosen = "" if cfg.metric_for_best_model in ("accuracy", "loss") else (
        f", {cfg.metric_for_best_model} {metrics[cfg.metric_for_best_model]:.4f}")
    log.info(f"step {state.step}: eval accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}{chosen}")
    improved = state.record_evaluation(state.step, metrics[cfg.metric_for_best_model], metrics["accuracy"],
                                       cfg.greater_is_better)
    if improved:
        state.best_weights = adapter_weights(accelerator.unwrap_model(model))
        state.best_predictions = (logits, labels)
    return improved


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry: errors become one line on stderr and the exit status in the module docstring."""
    stop_when_launcher_dies()
    args = list(sys.argv[1:] if argv is None else argv)
    # Trackers record the command line (W&B: in the run's metadata), `peft-agnews train ...` included: never a --token.
    sys.argv[:] = mask_secret_arguments(sys.argv)
    # e.g. a full disk while writing a checkpoint: the last complete one is intact
    return run_command(lambda args: run(parse_config(args)), args,
                       os_error_hint="fix that, then continue with --resume_from_checkpoint latest")


if __name__ == "__main__":
    sys.exit(cli())
