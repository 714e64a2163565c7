"""launch/*.sh: shellcheck-clean; `tpu_train.sh --dry_run` prints a complete v5p-64 launch
whose worker command, run by a shell as the worker would, hands `prealign train` every
gin override exactly as typed (quotes, spaces, $); `gpu_train.sh --dry_run` in each mode."""

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
AWKWARD = ["--gin.seqio_data.data_dir='gs://my-bucket/data set'",
           "--gin.train.distributed={'heartbeat_timeout_seconds': 60}",
           "--gin.tasks.register.note=\"it's a \\\"test\\\" with $HOME, `x` & ;\""]
TPU = ["--project=my-project", "--zone=us-east5-a", "--tpu=prealign-v5p",
       "--accelerator_type=v5p-64", "--workdir=gs://my-bucket/runs/8b", "--create", "--spot",
       "--dry_run", "--gin_file=models/8b.gin", *AWKWARD]


def dry_run(script, args, env=None):
    done = subprocess.run([os.path.join(LAUNCH, script), *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, **(env or {})))
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines()
            if line and not line.startswith("#")]


def flag(argv, name):
    return next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}="))


def test_launch_scripts_pass_shellcheck():
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    scripts = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH) if f.endswith(".sh"))
    assert {"tpu_train.sh", "gpu_train.sh"} <= {os.path.basename(s) for s in scripts}
    done = subprocess.run([shellcheck, "--external-sources", *scripts], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout


def test_tpu_dry_run_is_a_complete_v5p_64_launch():
    create, wait, archive, scp, setup, train, follow = dry_run("tpu_train.sh", TPU)
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert create[5] == "prealign-v5p" and "--spot" in create
    assert flag(create, "accelerator-type") == "v5p-64"
    assert flag(create, "runtime-version") == "v2-alpha-tpuv5"
    assert wait[3:5] == ["queued-resources", "describe"]
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    assert archive[3:] == ["archive", "--format=tar.gz",
                           f"--output=/tmp/prealign-{commit}.tar.gz", "HEAD"]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    for ssh in (setup, train, follow):
        assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
        assert ssh[5] == "prealign-v5p"
        assert flag(ssh, "project") == "my-project" and flag(ssh, "zone") == "us-east5-a"
    assert flag(setup, "worker") == flag(train, "worker") == "all"
    assert flag(follow, "worker") == "0"
    installs = flag(setup, "command")
    assert "constraints.txt" in installs and "'jax[tpu]==0.10.2'" in installs
    assert "gcsfuse" not in installs  # the workers read and write gs:// directly
    assert "prealign-train.log" in flag(follow, "command")


def test_tpu_worker_command_delivers_every_override_as_typed(tmp_path):
    """Run the printed worker command with bash, as the TPU VM's shell would, with a
    `prealign` that records its arguments."""
    home = tmp_path / "home"
    (home / "prealign").mkdir(parents=True)
    stub = home / "prealign-venv" / "bin" / "prealign"
    stub.parent.mkdir(parents=True)
    stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stub.chmod(0o755)
    train = dry_run("tpu_train.sh", TPU)[5]
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    subprocess.run(["bash", "-c", flag(train, "command")], env=env, check=True, timeout=30)
    log, deadline = home / "prealign-train.log", time.time() + 30
    while not (log.exists() and log.read_text().endswith("\n")):  # written in background
        assert time.time() < deadline
        time.sleep(0.1)
    args = json.loads(log.read_text())
    assert args == ["train", "--workdir=gs://my-bucket/runs/8b",
                    "--gin_file=runs/pretrain.gin", "--gin_file=meshes/tpu_v5p-64.gin",
                    "--gin_file=models/8b.gin", *AWKWARD]
    assert (home / "prealign-train.pid").read_text().strip().isdigit()


def test_tpu_dry_run_without_a_mesh_file_uses_fsdp_and_needs_its_flags():
    train = dry_run("tpu_train.sh", [a.replace("v5p-64", "v5p-16") for a in TPU])[5]
    assert "--gin_file=meshes/fsdp.gin" in flag(train, "command")
    done = subprocess.run([os.path.join(LAUNCH, "tpu_train.sh"), "--dry_run",
                           "--project=p"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--zone is required" in done.stderr


@pytest.mark.parametrize("args, env, launcher, distributed", [
    ([], {}, [], "None"),
    (["--gpus_per_node=4"], {"SLURM_JOB_NUM_NODES": "2"},
     ["srun", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--kill-on-bad-exit=1"],
     "{'local_device_ids': [0, 1, 2, 3]}"),
    (["--coordinator=10.0.0.1:1234", "--num_processes=2", "--process_id=1"], {}, [],
     "{'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1, "
     "'local_device_ids': [0, 1, 2, 3, 4, 5, 6, 7]}"),
])
def test_gpu_dry_run_in_each_mode(args, env, launcher, distributed):
    env = dict({"SLURM_JOB_NUM_NODES": ""}, **env)
    (command,) = dry_run("gpu_train.sh", ["--workdir=/shared/runs/1b", "--dry_run",
                                          "--gin_file=models/1b.gin", *args, *AWKWARD], env)
    assert command[:len(launcher)] == launcher
    train = command[len(launcher):]
    assert train[0].endswith("/bin/prealign") and train[1] == "train"
    assert train[2:] == ["--workdir=/shared/runs/1b", "--gin_file=runs/pretrain.gin",
                         "--gin_file=meshes/gpu_8xh100.gin",
                         f"--gin.train.distributed={distributed}", "--gin_file=models/1b.gin",
                         *AWKWARD]
