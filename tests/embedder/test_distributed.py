"""Data-parallel training's pieces on their own (fast): how ranks share an epoch, how they agree to stop, what
the launcher's exit code says, and the local runner's setting. The real stage under torchrun is in
``test_distributed_training.py``."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from embedder import distributed, loaders, loop
from embedder.torchrun import outcome
from retrain_contract import stages


def epoch_batches(size: int, batch: int, world: int, epoch: int, start: int = 0) -> list[list[list[int]]]:
    """For each step of ``epoch`` from position ``start``: each rank's batch of image indices."""
    ranks = []
    for rank in range(world):
        sampler = loaders.EpochBatchSampler(size, batch, seed=7, drop_last=size > batch * world, rank=rank, world=world)
        sampler.set_epoch(epoch, start)
        ranks.append([[index for _, index in keys] for keys in sampler])
    return [list(step) for step in zip(*ranks, strict=True)]


@pytest.mark.parametrize(("size", "batch", "world"), [(280, 8, 2), (280, 5, 3), (100, 16, 4), (30, 16, 2), (7, 4, 3)])
def test_the_ranks_of_each_step_together_train_on_exactly_the_one_process_batch(size, batch, world):
    """"Exactly": for every epoch and step, the ranks' batches are disjoint and their union is, as a set, the
    batch that one process with ``batch * world`` images per step trains on at that step; so the epoch's union
    is the one-process epoch (same images, same steps, none twice, the same remainder left out)."""
    for epoch in range(3):
        many = epoch_batches(size, batch, world, epoch)
        (one,) = zip(*epoch_batches(size, batch * world, 1, epoch), strict=True)
        assert len(many) == len(one) == (size // (batch * world) if size > batch * world else 1)
        for ranks, single in zip(many, one, strict=True):
            union = [i for rank in ranks for i in rank]
            assert len(union) == len(set(union)) and sorted(union) == sorted(single)
            assert all(ranks)  # no rank is ever idle in a step
        seen = [i for ranks in many for rank in ranks for i in rank]
        left_out = size - len(seen)
        assert left_out == (size % (batch * world) if size > batch * world else 0)
    assert epoch_batches(size, batch, world, 0) != epoch_batches(size, batch, world, 1)  # each epoch its own order


def test_a_resume_continues_the_epoch_at_its_position_in_images_of_all_ranks():
    full = epoch_batches(280, 8, 2, epoch=1)
    assert epoch_batches(280, 8, 2, epoch=1, start=5 * 16) == full[5:]  # same world size: exactly the rest
    # Another world size: the rest of the epoch's order from the same image, in the new global batches.
    order = loaders.EpochBatchSampler(280, 8, seed=7, drop_last=True).order(1)
    rest = [i for step in epoch_batches(280, 8, 3, epoch=1, start=80) for rank in step for i in rank]
    assert sorted(rest) == sorted(order[80 : 80 + (280 - 80) // 24 * 24])


def test_validation_is_shared_among_ranks_each_image_once():
    shards = [list(loaders.ShardSampler(61, rank, 4)) for rank in range(4)]
    assert sorted(i for shard in shards for i in shard) == list(range(61))


def _agree(rank: int, init: str, requests: dict[int, int], stopped: dict) -> None:
    """One rank of the stop agreement: SIGTERM is 'received' after step ``requests.get(rank)``."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    world = distributed.World(rank, 2, rank, 2, dist.new_group(backend="gloo"))
    stop = loop.StopSignal()
    for step in range(1, 50):
        if requests.get(rank) == step:
            stop.requested_at = 1.0
        if stop.agreed(world):
            stopped[rank] = step
            break
    world.barrier()
    dist.destroy_process_group()


def test_a_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """The request is reduced one step behind: rank 1 asks after step 3, both ranks stop after step 4."""
    with mp.Manager() as manager:
        stopped = manager.dict()
        mp.spawn(_agree, args=((tmp_path / "rendezvous").as_uri(), {1: 3}, stopped), nprocs=2, join=True)
        assert dict(stopped) == {0: 4, 1: 4}


def failure(tmp_path: Path, rank: int, exitcode: int, message: str | dict | None = None) -> ProcessFailure:
    error_file = tmp_path / f"error-{rank}.json"
    if message is not None:
        error_file.write_text(json.dumps({"message": message, "timestamp": 1000}))
    return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(error_file))


def test_the_launchers_exit_code_follows_the_stage_protocol_and_names_the_failed_rank(tmp_path, caplog):
    code = stages.EXIT_PREEMPTED
    assert outcome({0: failure(tmp_path, 0, code), 1: failure(tmp_path, 1, code)}, got_sigterm=True) == code
    # Rank 1 exited 75 first, torchrun then stopped rank 0 with SIGTERM: still a preemption.
    assert outcome({0: failure(tmp_path, 0, -signal.SIGTERM), 1: failure(tmp_path, 1, code)}, got_sigterm=False) == code

    caplog.clear()
    killed = {0: failure(tmp_path, 0, -signal.SIGTERM), 1: failure(tmp_path, 1, -signal.SIGKILL)}
    assert outcome(killed, got_sigterm=False, host="node-a") == 1
    assert caplog.records[-1].levelname == "ERROR"
    assert caplog.messages[-1] == ("rank 1 (local rank 1 on node-a, pid 101) was killed by SIGKILL; "
                                   "also failed: rank 0 (killed by SIGTERM)")
    # Rank 0's next collective failed when rank 1 died, and rank 0's error file says so a moment earlier than
    # torchrun noticed rank 1: the rank killed by a signal is still the cause.
    lost_peer = {"message": "RuntimeError: Connection reset by peer", "extraInfo": {"timestamp": "10"}}
    raced = {0: failure(tmp_path, 0, 1, lost_peer), 1: failure(tmp_path, 1, -signal.SIGKILL)}
    assert outcome(raced, got_sigterm=False, host="node-a") == 1
    assert caplog.messages[-1] == ("rank 1 (local rank 1 on node-a, pid 101) was killed by SIGKILL; "
                                   "also failed: rank 0 (exit code 1)")

    raised = {"message": "RuntimeError: this run was preempted 3 times", "extraInfo": {"timestamp": "1000"}}
    assert outcome({0: failure(tmp_path, 0, 1, raised)}, got_sigterm=False, host="node-a") == 1
    assert caplog.messages[-1] == ("rank 0 (local rank 0 on node-a, pid 100) failed with exit code 1: "
                                   "RuntimeError: this run was preempted 3 times")
    assert outcome({1: failure(tmp_path, 1, 1)}, got_sigterm=False, host="n") == 1
    assert "exited with code 1 without recording an error" in caplog.messages[-1]

    bad = "python -m embedder.train: error: argument --epochs: epochs must be an integer from 1 to 500; got 0"
    assert outcome({0: failure(tmp_path, 0, 2, bad), 1: failure(tmp_path, 1, 2, bad)}, got_sigterm=False) == 2
    assert caplog.messages[-1] == bad


def test_world_comes_from_torchruns_variables_and_bad_ones_are_named():
    assert distributed.world_from_env({}) == (0, 1, 0, 1)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert distributed.world_from_env(env) == (3, 4, 1, 2)
    with pytest.raises(ValueError, match="RANK=4 of WORLD_SIZE=4"):
        distributed.world_from_env({**env, "RANK": "4"})
    with pytest.raises(ValueError, match="are not numbers"):
        distributed.world_from_env({**env, "RANK": "x"})


def tiny_args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"epochs": 1, "learning_rate": 0.01, "weight_decay": 0.0, "amp": "off",
                                 "channels_last": "off", "compile": "off", **overrides})


def test_the_gpu_paths_choices_hold_on_the_cpu():
    """bf16 autocast needs no scaler; channels_last trains and the state saves as it would on a GPU."""
    cpu = torch.device("cpu")
    assert loop.amp_dtype(cpu) == torch.bfloat16
    assert loop.switch("auto", torch.device("cuda")) and not loop.switch("auto", cpu) and loop.switch("on", cpu)
    torch.manual_seed(0)
    from embedder import model

    trainer = loop.Trainer(model.build("resnet18", 3), tiny_args(amp="on", channels_last="on"), cpu)
    assert trainer.amp and trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    assert trainer.net.embedder.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    inputs, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    before = trainer.net.head.weight.detach().clone()
    loss_sum, correct = trainer.step(inputs, targets)
    assert torch.isfinite(loss_sum) and 0 <= int(correct) <= 4
    assert not torch.equal(before, trainer.net.head.weight)  # it trained
    assert set(trainer.state_dict()["model"]) == set(model.build("resnet18", 3).state_dict())


@pytest.mark.training
def test_a_compiled_model_trains_and_saves_the_models_own_state():
    """torch.compile, the GPU default, on the CPU (a small model: it compiles in seconds)."""
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    trainer = loop.Trainer(net, tiny_args(compile="on", learning_rate=0.05), torch.device("cpu"))
    assert trainer.compiled and trainer.model is not trainer.net
    inputs = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    targets = (inputs[:, 0] > 0).long()
    losses = [float(trainer.step(inputs, targets)[0]) / 64 for _ in range(30)]
    assert losses[-1] < losses[0] / 2
    assert list(trainer.state_dict()["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # no wrapper prefixes


def test_the_local_runner_starts_train_under_torchrun_as_the_setting_says():
    from retrain.runners import stage_operator
    from retrain.settings import Settings, SettingsError

    assert Settings.from_env({}).train_procs == 1
    assert Settings.from_env({"RETRAIN_TRAIN_PROCS": "auto"}).train_procs == "auto"
    for bad in ("0", "65", "two", "-1"):
        with pytest.raises(SettingsError, match=rf"RETRAIN_TRAIN_PROCS='{bad}' must be 'auto' .* from 1 to 64"):
            Settings.from_env({"RETRAIN_TRAIN_PROCS": bad})
    settings = Settings.from_env({"RETRAIN_TRAIN_PROCS": "2"})
    train = stage_operator("train", [], settings)
    assert train.nproc_per_node == 2
    assert stage_operator("evaluate", [], settings).nproc_per_node == 1
    assert stages.command("train", "py", nproc_per_node=train.nproc_per_node) == [
        "py", "-m", "embedder.torchrun", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "0", "--standalone",
        "-m", "embedder.train"]
    assert stages.command("train", "py", nproc_per_node=1) == ["py", "-m", "embedder.train"]


def test_a_rank_records_its_input_error_where_torchrun_reads_it(tmp_path, monkeypatch):
    from embedder import stage, train

    error_file = tmp_path / "error.json"
    monkeypatch.setenv(stage.ERROR_FILE_ENV, str(error_file))
    with pytest.raises(SystemExit) as exit_info:
        train.get_args_parser().parse_args(["--manifest-uri", "m", "--experiment", "e", "--epochs", "0"])
    assert exit_info.value.code == 2
    recorded = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert recorded.message == ("python -m embedder.train: error: argument --epochs: epochs must be an integer "
                                "from 1 to 500; got 0")

    monkeypatch.setattr(stage, "configure_logging", lambda: None)  # keep pytest's log capture
    code = stage.run_stage(train.get_args_parser(), train.main, ["--manifest-uri", "m", "--experiment", "e",
                                                                 "--collective-timeout-s", "0"])
    assert code == stages.EXIT_BAD_INPUT
    recorded = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert recorded.message == "python -m embedder.train: error: --collective-timeout-s must be more than 0, got 0.0"
