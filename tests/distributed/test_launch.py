"""launch/: hostfile preflight, SLURM variables, the rendered sbatch job, script syntax."""
from __future__ import annotations

import socket
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launch.preflight import HostfileError, check_hostfile, main as preflight_main, parse_hostfile
from launch.slurm import compose, render_sbatch
from train.slurm_env import expand_nodelist, torch_env_from_slurm

REPO = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    with socket.socket() as s:      # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hostfile_parsing_matches_deepspeed_and_names_bad_lines(tmp_path):
    good = tmp_path / "hosts"
    good.write_text("# comment\n\nnode-01 slots=8\nnode-02   slots=4\n")
    assert [(h.name, h.slots) for h in parse_hostfile(good)] == [("node-01", 8), ("node-02", 4)]
    bad = tmp_path / "bad"
    bad.write_text("node-01 slots=8\nnode-02 gpus=8\nnode-01 slots=2\nnode-03 slots=0\n")
    with pytest.raises(HostfileError) as e:
        parse_hostfile(bad)
    msg = str(e.value)
    assert "line 2" in msg and "line 3" in msg and "first on line 1" in msg and "slots=0" in msg
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(HostfileError, match="no hosts"):
        parse_hostfile(empty)
    with pytest.raises(HostfileError, match="does not exist"):
        parse_hostfile(tmp_path / "missing")


def test_unreachable_hosts_fail_before_training(tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\nno-such-node.invalid slots=8\n127.0.0.2 slots=8\n")
    with pytest.raises(HostfileError) as e:
        check_hostfile(hosts, port=_closed_port(), timeout=1.0)
    msg = str(e.value)
    assert "2 of 3" in msg and "no-such-node.invalid (line 2): name does not resolve" in msg
    assert "127.0.0.2 (line 3): no TCP connection" in msg and "localhost" not in msg
    assert preflight_main(["--hostfile", str(hosts), "--port", str(_closed_port()),
                           "--timeout", "1"]) == 1
    assert "cannot be reached" in capsys.readouterr().err


def test_reachable_hosts_pass(tmp_path, capsys):
    with socket.socket() as server:
        server.bind(("127.0.0.2", 0))
        server.listen()
        hosts = tmp_path / "hosts"
        hosts.write_text("localhost slots=2\n127.0.0.2 slots=4\n")
        assert preflight_main(["--hostfile", str(hosts), "--port",
                               str(server.getsockname()[1])]) == 0
    assert "2 host(s), 6 slot(s)" in capsys.readouterr().out


def test_slurm_nodelist_and_rank_variables():
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("a-[9-11]") == ["a-9", "a-10", "a-11"]
    assert expand_nodelist("node7") == ["node7"]
    slurm = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16",
             "SLURM_JOB_NODELIST": "gpu[04-05]", "SLURM_JOB_ID": "123456",
             "SLURM_NTASKS_PER_NODE": "8(x2)"}
    assert torch_env_from_slurm(slurm) == {
        "RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "gpu04",
        "MASTER_PORT": str(20000 + 123456 % 20000), "LOCAL_WORLD_SIZE": "8"}
    torchrun = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    assert torch_env_from_slurm(torchrun) == {}
    with pytest.raises(RuntimeError, match="SLURM_PROCID"):
        torch_env_from_slurm({})


def test_rendered_sbatch_job():
    overrides = ["model=small", "deepspeed=zero2", "launch.nodes=4", "launch.gpus_per_node=8",
                 "launch.partition=gpu", "launch.extra_sbatch=[--exclusive]"]
    cfg, full = compose(overrides)
    assert full[0] == "launch=slurm" and cfg.launch.kind == "slurm"
    script = render_sbatch(cfg.launch, full)
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --exclusive", "#SBATCH --ntasks-per-node=1",
                 "--nproc_per_node 8", "--rdzv-backend c10d",
                 "-m train launch=slurm model=small deepspeed=zero2 launch.nodes=4"):
        assert line in script, line
    assert "account" not in script     # unset settings stay out
    result = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr
    with pytest.raises(Exception, match="nodez"):          # typos fail at composition
        compose(["launch.nodez=2"])
    local, _ = compose(["launch=local"])
    with pytest.raises(ValueError, match="launch.kind must be slurm"):
        render_sbatch(local.launch, [])


@pytest.mark.parametrize("script", ["wheelhouse.sh", "deepspeed_multinode.sh", "slurm.sbatch"])
def test_shell_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_deepspeed_wrapper_runs_the_preflight_first(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("no-such-node.invalid slots=8\n")
    result = subprocess.run(["bash", str(REPO / "launch" / "deepspeed_multinode.sh"), str(hosts)],
                            capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert result.returncode == 1 and "does not resolve" in result.stderr, result.stderr


def test_deepspeed_wrapper_names_the_setting_when_no_python(tmp_path):
    """Without $PYTHON, a repo .venv or python3 on PATH, the wrapper says what to set (exit 2)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=8\n")
    bash = shutil.which("bash")
    script = tmp_path / "launch" / "deepspeed_multinode.sh"      # a copy outside any checkout's .venv
    script.parent.mkdir()
    shutil.copy(REPO / "launch" / "deepspeed_multinode.sh", script)
    result = subprocess.run([bash, str(script), str(hosts)], capture_output=True, text=True,
                            env={"PATH": str(tmp_path / "empty")})
    assert result.returncode == 2 and "set PYTHON=" in result.stderr, result.stderr


def test_submitit_launcher_config_maps_the_launch_settings():
    cfg = OmegaConf.load(REPO / "conf" / "hydra" / "launcher" / "hybridlm_slurm.yaml")
    assert cfg.defaults == ["submitit_slurm"]
    raw = OmegaConf.to_container(cfg)
    assert raw["tasks_per_node"] == "${launch.gpus_per_node}" and raw["nodes"] == "${launch.nodes}"


def test_submitit_sweep_submits_one_slurm_array_job_per_sweep(tmp_path):
    """The real ``python -m train -m hydra/launcher=hybridlm_slurm ...`` with the submitit plugin
    (the ``slurm`` extra, part of ``dev``) up to the ``sbatch`` call (workers/submitit_dryrun.py
    captures it): the sweep becomes one array job of 2 tasks, each with the cluster shape taken
    from ``launch.*`` and its own overrides; nothing is run."""
    import json
    import sys

    out = tmp_path / "out"
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "distributed" / "workers" / "submitit_dryrun.py"),
         str(out), "hydra/launcher=hybridlm_slurm", "launch=slurm", "launch.nodes=2",
         "launch.gpus_per_node=4", "launch.cpus_per_task=6", "launch.partition=gpu",
         "launch.account=proj", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    script = (out / "sbatch.sh").read_text()
    for line in ("#SBATCH --array=0-1", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=6",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --job-name=train",
                 "export OMP_NUM_THREADS=1", f"srun --unbuffered --output {sweep}/.submitit/"):
        assert line in script, f"{line!r} not in the sbatch script:\n{script}"
    assert "qos" not in script                       # unset settings stay out
    jobs = json.loads((out / "jobs.json").read_text())
    assert [j["job_num"] for j in jobs] == [0, 1]
    assert {j["launcher"] for j in jobs} == {"SlurmLauncher"}
    assert [[o for o in j["overrides"] if o.startswith("optim.lr")] for j in jobs] == \
        [["optim.lr=0.001"], ["optim.lr=0.002"]]
    assert all("launch=slurm" in j["overrides"] for j in jobs)   # ranks read SLURM's variables
    assert jobs[0]["params"]["submitit_folder"] == f"{sweep}/.submitit/%j"
    assert not list(sweep.glob("*/metrics.jsonl")), "a job ran locally"
