"""Every Accelerate config is validated by Accelerate's own loader and launcher; the launch scripts run.

The cpu / cpu_ddp runs live in tests/test_train.py; here multi_node.yaml really runs (two "nodes" on CPU, started
by the SLURM script with a stand-in srun), torchrun.sh runs, and the FSDP wrap policy is checked on the tiny model.
FSDP and DeepSpeed need GPUs (and the deepspeed package), so they are validated, not run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from types import SimpleNamespace

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from conftest import REPO, run_cli, tiny_train_args
from peft_agnews.config import TrainConfig
from peft_agnews.model import apply_lora, load_base_model
from peft_agnews.train import use_lora_wrap_policy

CONFIGS = REPO / "accelerate_configs"
# name: (distributed type, total processes, machines, mixed precision, use_cpu)
EXPECTED = {
    "cpu.yaml": (DistributedType.NO, 1, 1, "no", True),
    "cpu_ddp.yaml": (DistributedType.MULTI_GPU, 2, 1, "no", True),
    "single_gpu.yaml": (DistributedType.NO, 1, 1, "fp16", False),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 2, 1, "bf16", False),
    "multi_node.yaml": (DistributedType.MULTI_GPU, 16, 2, "bf16", False),
    "fsdp.yaml": (DistributedType.FSDP, 2, 1, "bf16", False),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 2, 1, "bf16", False),
}


def launch_args(name: str, *flags: str):
    """What `accelerate launch --config_file <name> [flags] train.py` resolves to (Accelerate's own validation)."""
    parsed = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), *flags, "train.py"])
    args, defaults, _ = _validate_launch_command(parsed)
    return args, defaults


def test_every_config_file_is_known_and_documented():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name in EXPECTED:
        header = [line for line in (CONFIGS / name).read_text().splitlines() if line.startswith("#")]
        # Each file says what it is for and how to launch it.
        assert len(header) >= 2 and any("launch" in line for line in header), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_is_valid_for_accelerate(name):
    distributed, processes, machines, precision, use_cpu = EXPECTED[name]
    config = load_config_from_file(str(CONFIGS / name))  # refuses unknown keys and unknown distributed types
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.num_processes, config.num_machines) == (distributed, processes, machines)
    assert (config.mixed_precision, config.use_cpu) == (precision, use_cpu)
    assert config.num_processes % config.num_machines == 0
    args, _ = launch_args(name)
    assert args.num_processes == processes and args.mixed_precision == precision
    assert args.use_fsdp == (distributed == DistributedType.FSDP)
    assert args.use_deepspeed == (distributed == DistributedType.DEEPSPEED)
    # Several processes are started only by the torchrun-style launchers (see cpu_ddp.yaml's comment).
    assert args.multi_gpu == (distributed == DistributedType.MULTI_GPU)


def test_multi_node_config_takes_its_rendezvous_from_the_command_line():
    assert load_config_from_file(str(CONFIGS / "multi_node.yaml")).main_process_ip is None  # no host baked in
    port = free_port()
    args, _ = launch_args("multi_node.yaml", "--machine_rank", "1", "--main_process_ip", "10.0.0.7",
                          "--main_process_port", str(port))
    env = prepare_multi_gpu_env(args)
    # torchrun's arguments on this machine: 2 nodes x 8 processes, this one is node 1, rendezvous at node 0.
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    # What `accelerate launch` hands torchrun (static rendezvous at node 0's address, no master_addr of its own).
    assert args.rdzv_endpoint == f"10.0.0.7:{port}" and args.rdzv_backend == "static"
    assert not hasattr(args, "master_addr")
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_fsdp_config_builds_accelerates_fsdp_plugin(monkeypatch):
    args, _ = launch_args("fsdp.yaml", "--main_process_port", str(free_port()))
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    # sync_module_states (implied by cpu_ram_efficient_loading) asks for the current GPU at construction;
    # everything else is checked as configured.
    assert env["FSDP_SYNC_MODULE_STATES"] == env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    plugin = FullyShardedDataParallelPlugin()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert plugin.fsdp_version == 1 and plugin.sharding_strategy.name == "FULL_SHARD"
    assert plugin.transformer_cls_names_to_wrap is None  # the model's own _no_split_modules decide
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.use_orig_params


def test_deepspeed_config_resolves_to_zero2_environment():
    args, defaults = launch_args("deepspeed_zero2.yaml", "--main_process_port", str(free_port()))
    args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)  # set by launch_command
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert env["ACCELERATE_GRADIENT_CLIPPING"] == "1.0" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # Absent on purpose: DeepSpeed takes the trainer's accumulation (derived from --global_batch_size).
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env


@pytest.mark.parametrize("layer_classes", [None, "RobertaLayer"])
def test_fsdp_wrap_policy_is_lora_aware(tiny_model_dir, monkeypatch, layer_classes):
    """Blocks are units (the model's _no_split_modules, or fsdp_transformer_layer_cls_to_wrap, which `accelerate
    launch` exports as FSDP_TRANSFORMER_CLS_TO_WRAP), and so is every leaf with trainable weights."""
    if layer_classes:
        monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", layer_classes)
    else:
        monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    cfg = TrainConfig(model_name_or_path=str(tiny_model_dir), gradient_checkpointing=False)
    model = apply_lora(load_base_model(cfg), cfg)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=1, sync_module_states=False, auto_wrap_policy="transformer_based_wrap"
    )
    use_lora_wrap_policy(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), model)
    plugin.set_auto_wrap_policy(model)  # what accelerator.prepare does next: the LoRA-aware policy must survive it
    policy = plugin.auto_wrap_policy
    wrapped = {name for name, module in model.named_modules() if policy(module=module, recurse=False, nonwrapped_numel=0)}
    encoder = "base_model.model.roberta"
    blocks = {f"{encoder}.encoder.layer.{i}" for i in range(2)} | ({f"{encoder}.embeddings"} if not layer_classes else set())
    lora = {f"{encoder}.encoder.layer.{i}.attention.self.{proj}.lora_{ab}.default"
            for i in range(2) for proj in ("query", "value") for ab in "AB"}
    head = {f"base_model.model.classifier.modules_to_save.default.{n}" for n in ("dense", "out_proj")}
    assert wrapped == blocks | lora | head
    # No frozen leaf is a unit of its own; every trainable parameter lives in a wrapped module.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(any(n.startswith(w + ".") for w in wrapped) for n in trainable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- launch scripts -------------------------------------------------------------------------------------------

def test_train_local_refuses_a_missing_config():
    proc = run_cli(["bash", "launch/train_local.sh", "no-such.yaml", "--dry_run", "true"], timeout=60)
    assert proc.returncode == 2 and "must be an Accelerate config file" in proc.stderr


@pytest.mark.slow
def test_train_local_hands_the_config_and_options_to_the_trainer():
    proc = run_cli(["bash", "launch/train_local.sh", str(CONFIGS / "cpu.yaml"), "--help"], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--global_batch_size" in proc.stdout  # the trainer's own --help, reached through accelerate launch


def test_train_local_reports_a_failure_without_the_launchers_traceback(tmp_path):
    """A one-process `accelerate launch` turns the trainer's exit 2 into 1 plus a CalledProcessError traceback."""
    proc = run_cli(["bash", "launch/train_local.sh", str(CONFIGS / "cpu.yaml"), "--max_grad_norm", "-1",
                    "--output_dir", str(tmp_path / "out")], timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: invalid config: --max_grad_norm must be >= 0" in proc.stderr
    assert "CalledProcessError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_torchrun_script_runs_two_ranks_on_cpu(tiny_model_dir, synthetic_train_csv, tmp_path):
    out = tmp_path / "out"
    args = tiny_train_args(tiny_model_dir, synthetic_train_csv, out, max_train_steps=2, eval_steps=2,
                           global_batch_size=32)
    proc = run_cli(["bash", "launch/torchrun.sh", *args], timeout=300,
                   env={"NPROC": "2", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "effective batch 32 (= 16 per device x 1 accumulation x 2 process(es))" in proc.stdout
    assert json.loads((out / "results.json").read_text())["num_processes"] == 2


# A stand-in for SLURM: `srun` starts its command once per node (SLURM_NODEID 0..N-1) on this machine and forwards
# SIGTERM to them; `scontrol` resolves the node list to 127.0.0.1 and records requeues.
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
pids=()
trap 'interrupted=1; echo srun-forwarded-TERM >> "$STUB_LOG"; kill -TERM "${pids[@]}" 2>/dev/null' TERM
for ((node = 0; node < SLURM_NNODES; node++)); do
  if [[ -n ${FAKE_TASK:-} ]]; then SLURM_NODEID=$node bash -c "$FAKE_TASK" & else SLURM_NODEID=$node "$@" & fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  while :; do interrupted=0; wait "$pid"; s=$?; [[ $interrupted -eq 1 ]] || break; done
  (( s > status )) && status=$s
done
exit $status
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then echo 127.0.0.1; echo 127.0.0.2;
else echo "scontrol $*" >> "$STUB_LOG"; fi
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "stub.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_SUBMIT_DIR": str(REPO),
           "GPUS_PER_NODE": "1", "MAIN_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    return SimpleNamespace(env=env, log=log)


@pytest.mark.slow
def test_slurm_script_runs_multi_node_config_as_two_nodes(fake_slurm, tiny_model_dir, synthetic_train_csv, tmp_path):
    """Two `accelerate launch` (machine ranks 0 and 1) rendezvous through multi_node.yaml into one 2-rank job."""
    out = tmp_path / "out"
    args = tiny_train_args(tiny_model_dir, synthetic_train_csv, out, max_train_steps=2, eval_steps=2,
                           global_batch_size=32, mixed_precision="no")
    proc = run_cli(["bash", "launch/slurm_multinode.sbatch", *args], timeout=300, env=fake_slurm.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 node(s) x 1 process(es), main 127.0.0.1" in proc.stderr
    assert "effective batch 32 (= 16 per device x 1 accumulation x 2 process(es))" in proc.stdout
    assert json.loads((out / "results.json").read_text())["num_processes"] == 2
    adapter = out / "adapter"
    assert all(k.startswith("base_model.model.") for k in load_file(adapter / "adapter_model.safetensors"))
    PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4), adapter)
    assert not fake_slurm.log.exists(), "a finished run is not requeued"


def test_slurm_script_forwards_sigterm_and_requeues(fake_slurm, tmp_path):
    """SIGTERM to the batch script reaches every node's task; the script waits for them, then requeues."""
    marker = tmp_path / "task"
    # The task stands in for the trainer: on SIGTERM it "checkpoints" and exits with the documented status 75.
    task = f"trap 'kill $!; echo term-$SLURM_NODEID >> {marker}; exit 75' TERM; echo up-$SLURM_NODEID >> {marker}; " \
           "sleep 30 >/dev/null 2>&1 & wait"
    proc = subprocess.Popen(["bash", "launch/slurm_multinode.sbatch"], cwd=REPO, text=True,
                            env={**os.environ, **fake_slurm.env, "FAKE_TASK": task},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while time.time() < deadline and (not marker.exists() or marker.read_text().count("up-") < 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 75, stderr
    assert sorted(marker.read_text().split()) == ["term-0", "term-1", "up-0", "up-1"]
    assert "forwarding it to the trainer" in stderr
    assert fake_slurm.log.read_text().splitlines() == ["srun-forwarded-TERM", "scontrol requeue 4242"]
