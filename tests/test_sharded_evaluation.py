"""The evaluation scripts under torchrun on 2 CPU ranks (tiny random models): the merged metrics.csv,
selection.csv and summary.json, and every image, are those of one process, bit for bit; summary.json differs
only by ``world_size``, ``seconds`` and the output folder (the two runs write to two folders). A rank that
fails leaves a failed summary naming it. The one-process runs set OMP_NUM_THREADS=1, as torchrun does for
each rank: on a CPU the thread count changes how float sums are split, and so the last bits."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
from PIL import Image

import test_realfill
from conftest import ROOT, read_csv
from leftrefill.sharding import LaunchError, Shard, shard_from_env, srun_variables

CHECKPOINTS = ROOT / "checkpoints"
TINY = ["--random_init", "--steps", "2", "--device", "cpu", "--no_lpips"]
INPAINTING = ["--model_path", str(CHECKPOINTS / "tiny_random"), *TINY, "--test_size", "64",
              "--test_path", str(ROOT / "data" / "samples")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DIFFERENT = ("seconds", "world_size")  # summary.json's entries that differ (and settings.output_path)


def start(script: list[str], args: list[str], output: Path, ranks: int) -> subprocess.Popen:
    """``script`` (with its first arguments) in one process, or under torchrun on ``ranks`` CPU processes."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    return subprocess.Popen([sys.executable, *launch, *script, *args, "--output_path", str(output)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    """The exit status and output of a ``start``-ed run."""
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def run_both(script: str, args: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """``script`` in one process and on two ranks, side by side; their output folders."""
    one, two = tmp_path / "one", tmp_path / "two"
    processes = [start([script], args, one, ranks=1), start([script], args, two, ranks=2)]
    for code, output in map(finish, processes):
        assert code == 0, output[-3000:]
    return one, two


def files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def comparable(summary_file: Path) -> dict:
    summary = json.loads(summary_file.read_text())
    summary["settings"].pop("output_path")
    return {key: value for key, value in summary.items() if key not in DIFFERENT}


def assert_same_outputs(one: Path, two: Path) -> dict:
    """Every file of the two folders identical, summary.json but for DIFFERENT; the sharded summary."""
    assert files(two) == files(one)
    for name in files(one):
        if name != "summary.json":
            assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert comparable(two / "summary.json") == comparable(one / "summary.json")
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and "world_size" not in json.loads((one / "summary.json").read_text())
    return summary


def test_steps_give_every_rank_whole_batches_of_the_one_process_run():
    for num_items, batch_size in [(3, 1), (3, 2), (7, 2), (1, 4), (8, 2)]:
        one = Shard().steps(num_items, batch_size)
        ranks = [Shard(rank, 2).steps(num_items, batch_size) for rank in range(2)]
        assert len(ranks[0]) == len(ranks[1])  # every rank takes part in every exchange
        merged = [batch for step in zip(*ranks) for batch in step if batch]  # step by step, in rank order
        assert merged == one
    assert Shard(1, 2).steps(3, 1) == [[1], []]  # uneven: rank 1 has no batch at the last step


def test_torchrun_variables_are_read_and_checked():
    assert shard_from_env({}) == Shard()
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Shard(3, 4, 1)
    assert Shard(3, 4, 1).device("cuda") == "cuda:1"  # one GPU per rank on its machine
    assert Shard(3, 4, 1).device("cpu") == "cpu" and Shard().device("cuda") == "cuda"
    with pytest.raises(LaunchError, match="0 <= RANK < WORLD_SIZE"):
        shard_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="must be integers"):
        shard_from_env({"RANK": "one", "WORLD_SIZE": "2"})


def slurm_task(rank: int, ntasks: int = 2) -> dict[str, str]:
    """The variables srun gives task ``rank`` of a one-node step of ``ntasks`` tasks."""
    return {"SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_NODELIST": "gpu[017-018]",
            "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "evaluate"}


def test_srun_variables_become_torchruns():
    assert srun_variables({}) == {}  # not under SLURM
    task = slurm_task(1)
    assert srun_variables(task) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu017",
                                    "MASTER_PORT": "19242"}  # the first node; 15000 + the job id's last 4 digits
    assert srun_variables({**task, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})["MASTER_ADDR"] == "10.0.0.1"
    batch_script = {name: value for name, value in task.items() if not name.startswith("SLURM_STEP")}
    assert srun_variables(batch_script) == {}  # a plain python in an sbatch script of a 2-task job: one process
    assert srun_variables({**task, "WORLD_SIZE": "4"}) == {}  # torchrun inside srun: torchrun's variables win
    assert srun_variables({**task, "SLURM_STEP_NUM_TASKS": "1"}) == {}  # a one-task step
    with pytest.raises(LaunchError, match="do not describe a run: KeyError: 'SLURM_PROCID'"):
        srun_variables({name: value for name, value in task.items() if name != "SLURM_PROCID"})


@pytest.fixture(scope="module")
def inpainting_runs(tmp_path_factory) -> tuple[Path, Path]:
    """test_inpainting.py on the 3 bundled pairs, in one process and on two ranks: their output folders."""
    return run_both("test_inpainting.py", INPAINTING, tmp_path_factory.mktemp("inpainting"))


def test_inpainting_on_two_ranks_writes_what_one_process_writes(inpainting_runs):
    # 3 pairs on 2 ranks, uneven: rank 0 fills pairs 0 and 2, rank 1 pair 1
    summary = assert_same_outputs(*inpainting_runs)
    assert summary["status"] == "complete" and summary["num_pairs"] == 3
    assert [row["seed"] for row in read_csv(inpainting_runs[1] / "metrics.csv")] == ["42", "43", "44"]


def test_two_srun_tasks_write_what_one_process_writes(inpainting_runs, tmp_path):
    """Two processes started as srun starts them (SLURM_* variables, no torchrun), on this machine."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    output = tmp_path / "srun"
    env = {name: value for name, value in ENV.items() if name not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    tasks = [subprocess.Popen([sys.executable, "test_inpainting.py", *INPAINTING, "--output_path", str(output)],
                              cwd=ROOT, env={**env, **slurm_task(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    for code, log in map(finish, tasks):
        assert code == 0, log[-3000:]
    assert_same_outputs(inpainting_runs[0], output)


def test_nvs_on_two_ranks_writes_what_one_process_writes(tmp_path):
    # batches of 2 of 3 objects: rank 0 samples the first two together, as one process does, rank 1 the third
    args = ["--model_path", str(CHECKPOINTS / "tiny_random_nvs"), *TINY, "--test_size", "64", "--batch_size", "2",
            "--test_path", str(ROOT / "data" / "samples_nvs" / "views_release")]
    summary = assert_same_outputs(*run_both("test_nvs.py", args, tmp_path))
    assert summary["task"] == "nvs" and summary["num_pairs"] == 3


def test_multiview_selection_on_two_ranks_writes_what_one_process_writes(tmp_path):
    test_path = tmp_path / "test"
    for item in ("a", "b"):
        shutil.copytree(ROOT / "data" / "samples_multiview" / "sacre_coeur_a", test_path / item)
    args = ["--model_path", str(CHECKPOINTS / "tiny_random_multiview"), *TINY, "--test_size", "64",
            "--test_path", str(test_path), "--num_samples", "2", "--select_by_matches", "--match_method", "sift"]
    one, two = run_both("test_multiview_inpainting.py", args, tmp_path)
    summary = assert_same_outputs(one, two)
    assert [row["id"] for row in read_csv(two / "selection.csv")] == ["a", "a", "b", "b"]
    assert "candidates/b/1.png" in files(two) and summary["num_samples"] == 2


def test_realfill_benchmark_on_two_ranks_writes_what_one_process_writes(tmp_path):
    bench, models = tmp_path / "bench", tmp_path / "models"
    for scene in ("first", "second"):
        shutil.copytree(ROOT / "data" / "samples_realfill" / "sacre_coeur", bench / scene)
        (models / scene).mkdir(parents=True)
        shutil.copy(CHECKPOINTS / "tiny_random_realfill" / "model_config.yaml", models / scene)
    for name in ("target.png", "gt.png", "mask.png"):  # the second scene mirrored: its own results
        path = bench / "second" / "target" / name
        Image.open(path).transpose(Image.FLIP_LEFT_RIGHT).save(path)
    # one sample per scene: the tiny model's VAE at the target's size takes seconds per sample
    args = ["--benchmark_root", str(bench), "--model_path", str(models), "--random_init", "--num_samples", "1",
            "--steps", "1", "--device", "cpu", "--no_lpips", "--match_method", "sift"]
    one, two = run_both("test_realfill.py", args, tmp_path)
    summary = assert_same_outputs(one, two)
    assert [row["scene"] for row in read_csv(two / "metrics.csv")] == ["first", "second"]
    assert summary["scenes"]["first"]["all"] != summary["scenes"]["second"]["all"]


def test_one_realfill_scene_is_refused_under_torchrun(monkeypatch, caplog):
    monkeypatch.setattr(test_realfill, "sharded_run", lambda: nullcontext(Shard(0, 2)))
    code = test_realfill.main(["--scene", str(ROOT / "data" / "samples_realfill" / "sacre_coeur"), "--model_path",
                               str(CHECKPOINTS / "tiny_random_realfill"), "--random_init", "--device", "cpu"])
    assert code == 2 and "under torchrun give --benchmark_root" in caplog.text


@pytest.fixture(scope="module")
def failed_runs(tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """Two-rank runs in which rank 1's pair (1) fails at step 0, ``raise`` (an unreadable file) and ``die``
    (its process killed), into folders holding an earlier run's complete summary.json: how each ends, by
    folder, exit status and output."""
    runs = {}
    for how in ("raise", "die"):
        output = tmp_path_factory.mktemp(how) / "out"
        output.mkdir()
        (output / "summary.json").write_text(json.dumps({"status": "complete"}))
        runs[how] = output, start(["tests/sharded_failure_run.py", how], INPAINTING, output, ranks=2)
    return {how: (output, *finish(process)) for how, (output, process) in runs.items()}


def test_a_rank_failing_mid_run_leaves_a_failed_summary_naming_it(failed_runs, inpainting_runs):
    output, code, log = failed_runs["raise"]
    assert code != 0 and "rank 1 failed: ImageInputError: target: file not found" in log
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_pair"] == "sacre_coeur_a" and summary["failed_rank"] == 1
    assert summary["error"] == ("ImageInputError: target: file not found: "
                                f"{ROOT / 'data' / 'samples' / 'sacre_coeur_a' / 'target.jpg'}")
    # both ranks stop after step 0; rank 0's pair of that step is kept, as one process keeps those before
    [row] = read_csv(output / "metrics.csv")
    assert row == read_csv(inpainting_runs[0] / "metrics.csv")[0]
    assert summary["num_pairs"] == 1 and summary["num_pairs_in_test_set"] == 3
    assert summary["metrics"] == {name: round(float(row[name]), 6) for name in ("psnr", "ssim")}
    assert sorted(path.name for path in (output / "results").iterdir()) == ["building.png"]


def test_a_rank_that_dies_leaves_no_complete_summary(failed_runs):
    output, code, log = failed_runs["die"]
    assert code != 0 and "exitcode  : 9" in log  # torchrun saw rank 1 die, and stopped rank 0
    # The earlier run's summary.json is gone. Rank 0 is stopped at the exchange, mostly before it can say
    # anything; should the broken exchange reach it first, it writes a failed summary.
    summary = output / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "failed"


def test_rank_0_unable_to_write_its_tables_stops_every_rank(tmp_path):
    """metrics.csv cannot be written (a folder holds its name): rank 0 reports it at the next exchange, so
    rank 1 stops there too instead of waiting for an exchange that never comes."""
    output = tmp_path / "out"
    (output / "metrics.csv").mkdir(parents=True)
    code, log = finish(start(["test_inpainting.py"], INPAINTING, output, ranks=2))
    assert code != 0 and "rank 0 failed: IsADirectoryError" in log
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_rank"] == 0
    assert summary["error"].startswith("IsADirectoryError")
