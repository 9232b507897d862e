"""scripts/slurm/opd_verl.sbatch under a fake Slurm (stub srun/scontrol/ray/python on PATH, 3 nodes)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "scripts" / "slurm" / "opd_verl.sbatch"
NODES = ["n1", "n2", "n3"]


def start(env, *args):
    """The script in its own process group (so a failing test can kill every stub it started)."""
    cmd = ["bash", str(SBATCH), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(proc, timeout=60):
    """(stdout, stderr) once the script exits; kills its whole process group if it overruns."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return out.decode(), err.decode()


def run(env, *args, timeout=60):
    proc = start(env, *args)
    out, err = finish(proc, timeout)
    return SimpleNamespace(returncode=proc.returncode, stdout=out, stderr=err)


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ray_starts(fake):
    """{node: argv of `ray ...`} for every `ray start` call."""
    out = {}
    for line in fake.calls("ray"):
        node = line.split()[1].removeprefix("node=")
        argv = fake.argv_of(line)
        if argv[0] == "start":
            out[node] = argv
    return out


def test_three_nodes_head_workers_wait_and_training_command(fake_slurm):
    fake = fake_slurm
    env = fake.env(NODES)
    proc = run(env, "exopd", "data.train_files=/shared/train.parquet", "actor_rollout_ref.model.path=/models/a b")
    assert proc.returncode == 0, proc.stderr + proc.stdout

    starts = ray_starts(fake)
    assert sorted(starts) == NODES
    head = starts["n1"]
    assert head[:2] == ["start", "--head"]
    for opt in ("--node-ip-address=10.1.2.3", "--port=6379", "--num-gpus=4", "--num-cpus=16", "--block"):
        assert opt in head
    assert "--temp-dir=/tmp/ray_42" in head
    for worker in ("n2", "n3"):
        argv = starts[worker]
        assert argv[:2] == ["start", "--address=10.1.2.3:6379"]
        assert "--num-gpus=4" in argv and "--num-cpus=16" in argv and "--block" in argv and "--head" not in argv

    # one srun step per node, one task each, its own log file
    sruns = [fake.argv_of(line) for line in fake.calls("srun")]
    ray_steps = [a for a in sruns if "ray" in a]
    assert len(ray_steps) == 3
    log_dir = fake.root / "submit" / "logs" / "opd_verl-42"
    for argv in ray_steps:
        assert "--nodes=1" in argv and "--ntasks=1" in argv and "--cpus-per-task=16" in argv
        node = next(a for a in argv if a.startswith("--nodelist=")).split("=", 1)[1]
        kind = "head" if node == "n1" else "worker"
        assert f"--output={log_dir}/ray-{kind}-{node}.log" in argv
        assert (log_dir / f"ray-{kind}-{node}.log").read_text().startswith(f"ray started on {node}")

    # the node-count wait asked the head's address
    assert any(line == "probe addr=10.1.2.3:6379" for line in fake.calls("probe"))

    (train,) = fake.calls("python")
    assert "RAY_ADDRESS=10.1.2.3:6379" in train
    assert f"FLAG={log_dir}/PREEMPT_REQUESTED" in train
    assert f"PWD={fake.root / 'submit'}" in train
    assert fake.argv_of(train) == [
        "-m",
        "opd_verl.main",
        "+recipe=exopd",
        "opd.cpu_demo=false",
        "trainer.nnodes=3",
        "trainer.n_gpus_per_node=4",
        "data.train_files=/shared/train.parquet",
        "actor_rollout_ref.model.path=/models/a b",
    ]
    assert "training driver output" in (log_dir / "driver.log").read_text()
    # Ray stopped on every node after training; the raylets saw the flag-file path
    assert sorted(line.split("=")[1] for line in fake.calls("ray-stopped")) == NODES
    assert all(f"FLAG={log_dir}/PREEMPT_REQUESTED" in line for line in fake.calls("ray"))
    assert not fake.calls("scontrol")


def test_worker_that_never_joins_fails_clearly_in_bounded_time(fake_slurm):
    fake = fake_slurm
    env = fake.env(NODES, FAKE_NEVER_JOIN="n3", OPD_JOIN_TIMEOUT="3", OPD_JOIN_POLL="1")
    start = time.monotonic()
    proc = run(env, "opd", timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "only 2 of 3 nodes (8 of 12 GPUs) joined the Ray cluster within OPD_JOIN_TIMEOUT=3s" in proc.stderr
    assert elapsed < 30
    assert not fake.calls("python"), "training must not start"
    assert sorted(line.split("=")[1] for line in fake.calls("ray-stopped")) == NODES


@pytest.mark.parametrize(("sig", "requeue"), [(signal.SIGUSR1, "1"), (signal.SIGTERM, "0")])
def test_signal_reaches_training_then_ray_stops(fake_slurm, sig, requeue):
    fake = fake_slurm
    env = fake.env(NODES, FAKE_TRAIN_SECONDS="60", OPD_REQUEUE=requeue)
    proc = start(env, "exopd")
    try:
        wait_for(lambda: fake.calls("python"), what="training start")
        time.sleep(0.3)
        assert not fake.calls("ray-stopped")
        proc.send_signal(sig)
    finally:
        out, err = finish(proc, timeout=30)
    assert proc.returncode == 0, err
    name = sig.name.removeprefix("SIG")
    lines = fake.calls()
    # the trainer got the signal with the flag file already there, saved, exited; only then Ray stopped
    got = lines.index(f"train-signal {name} flagfile=yes")
    saved = lines.index("train-saved-checkpoint")
    stopped = [i for i, line in enumerate(lines) if line.startswith("ray-stopped")]
    assert got < saved < min(stopped) and len(stopped) == 3
    flag = fake.root / "submit" / "logs" / "opd_verl-42" / "PREEMPT_REQUESTED"
    assert flag.read_text().startswith(f"SIG{name} ")
    requeues = [fake.argv_of(line) for line in fake.calls("scontrol")]
    assert requeues == ([["requeue", "42"]] if requeue == "1" else [])
    assert f"received SIG{name}" in out


def test_signal_during_join_wait_stops_ray(fake_slurm):
    fake = fake_slurm
    env = fake.env(NODES, FAKE_NEVER_JOIN="n2", OPD_JOIN_TIMEOUT="60", OPD_JOIN_POLL="1")
    proc = start(env, "exopd")
    try:
        wait_for(lambda: fake.calls("probe"), what="join wait")
        proc.send_signal(signal.SIGTERM)
    finally:
        finish(proc, timeout=30)
    assert proc.returncode != 0
    assert not fake.calls("python")
    assert len(fake.calls("ray-stopped")) == 3


def test_training_failure_exit_code_is_returned(fake_slurm):
    fake = fake_slurm
    proc = run(fake.env(NODES, FAKE_TRAIN_RC="7"), "opd")
    assert proc.returncode == 7
    assert len(fake.calls("ray-stopped")) == 3


def test_apptainer_wrapping(fake_slurm):
    fake = fake_slurm
    env = fake.env(
        NODES[:2],
        OPD_CONTAINER="apptainer",
        OPD_CONTAINER_IMAGE="/images/opd_verl.sif",
        OPD_APPTAINER_ARGS="--bind=/shared --cleanenv=false",
        OPD_CHECKPOINT_DIR="/shared/ckpt",
    )
    proc = run(env, "iw_opd", "trainer.total_epochs=1")
    assert proc.returncode == 0, proc.stderr
    apptainer = [fake.argv_of(line) for line in fake.calls("apptainer")]
    prefix = ["exec", "--nv", "--bind=/shared", "--cleanenv=false", "/images/opd_verl.sif"]
    ray_runs = [a for a in apptainer if a[5] == "ray"]
    assert len(ray_runs) == 2 and all(a[:5] == prefix for a in ray_runs)
    trains = [a for a in apptainer if a[5:8] == ["python", "-m", "opd_verl.main"]]
    assert len(trains) == 1 and trains[0][:5] == prefix
    assert trains[0][8:] == [
        "+recipe=iw_opd",
        "opd.cpu_demo=false",
        "trainer.nnodes=2",
        "trainer.n_gpus_per_node=4",
        "trainer.default_local_dir=/shared/ckpt",
        "trainer.resume_mode=auto",
        "trainer.total_epochs=1",
    ]


def test_pyxis_wrapping(fake_slurm):
    fake = fake_slurm
    env = fake.env(
        NODES[:2],
        gpus=8,
        OPD_CONTAINER="pyxis",
        OPD_CONTAINER_IMAGE="/images/opd_verl.sqsh",
        OPD_PYXIS_ARGS="--container-mounts=/shared:/shared",
        SLURM_GPUS_ON_NODE="",
        SLURM_GPUS_PER_NODE="h100:8",
    )
    proc = run(env, "opd")
    assert proc.returncode == 0, proc.stderr
    sruns = [fake.argv_of(line) for line in fake.calls("srun")]
    wrapped = [a for a in sruns if "--container-image=/images/opd_verl.sqsh" in a]
    assert {("ray" in a, "opd_verl.main" in a) for a in wrapped} >= {(True, False), (False, True)}
    assert all("--container-mounts=/shared:/shared" in a for a in wrapped)
    (train,) = [a for a in wrapped if "opd_verl.main" in a]
    assert "trainer.n_gpus_per_node=8" in train and "--nodelist=n1" in train


@pytest.mark.parametrize(
    ("args", "extra", "message"),
    [
        ((), {}, "usage: sbatch"),
        (("opd",), {"SLURM_GPUS_ON_NODE": ""}, "no GPU count"),
        (("opd",), {"OPD_CONTAINER": "docker"}, "OPD_CONTAINER must be one of: none, apptainer, pyxis"),
        (("opd",), {"OPD_CONTAINER": "apptainer"}, "needs OPD_CONTAINER_IMAGE"),
        (("opd",), {"OPD_JOIN_TIMEOUT": "ten"}, "OPD_JOIN_TIMEOUT must be a non-negative integer"),
        (("opd",), {"SLURM_JOB_ID": ""}, "SLURM_JOB_ID is not set"),
        (("opd",), {"SLURM_NNODES": "2"}, "to 3 nodes, SLURM_NNODES=2"),
    ],
)
def test_bad_setup_fails_before_starting_anything(fake_slurm, args, extra, message):
    fake = fake_slurm
    proc = run(fake.env(NODES, **extra), *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not fake.calls("ray") and not fake.calls("python")
