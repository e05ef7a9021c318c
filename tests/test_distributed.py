"""torch.distributed: 2 processes under torchrun (gloo on CPU) give the single-process factors and scores,
with uneven shards; statistics sum over ranks, including a rank that saw no data."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from runfolder import N_TRAIN, make_project, torchrun

from concept_influence.config import RunConfig
from concept_influence.curvature import Curvature, SumStats
from concept_influence.fileio import load_tensors
from concept_influence.runs import run_config
from concept_influence.scores import Scores

# factors: 40 examples in shards of 16 -> 16 + 16 + 8 (rank 0: two shards, rank 1: one);
# scores: 100 examples in shards of 16 -> six of 16 and one of 4 (rank 0: four shards, rank 1: three)
UNEVEN = ("[factors]\nshard_size = 16\n", "[factors]\nshard_size = 16\nmax_examples = 40\n")


def _relative(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


# the tests here share the module's `runs` fixture: on one xdist worker it is built once (make test runs
# with --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_distributed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("dist"))
    config = root / "uneven.toml"
    config.write_text((root / "run.toml").read_text().replace(*UNEVEN))
    torch.set_num_threads(1)
    run_config(RunConfig.read(config), root / "single", progress=False)
    torchrun("run", "uneven.toml", "--out", "two", "--no-progress", cwd=root)
    return root


def test_two_ranks_dealt_uneven_shards(runs):
    record = (runs / "two" / "run.json").read_text()
    assert '"world_size": 2' in record
    assert len(list((runs / "two" / "scores" / "shards").glob("shard-*.safetensors"))) == 7
    assert Scores.load(runs / "two" / "scores" / "shards" / "shard-000006.safetensors").values.shape == (4, 1)


def _owned_statistics(folder: Path, name: str) -> SumStats:
    """A pass's sums as the two owner ranks kept them, merged (each map's sums on one rank only)."""
    parts = [SumStats.from_state_dict(load_tensors(folder / f"{name}-rank{r}of2.safetensors")) for r in (0, 1)]
    assert parts[0].sums and parts[1].sums and not parts[0].sums.keys() & parts[1].sums.keys()
    return parts[0].merge(parts[1])


def test_two_ranks_statistics_equal_single_process(runs):
    for name in ("covariance", "eigenvalues"):
        one = SumStats.from_state_dict(load_tensors(runs / "single" / "factors" / "statistics" / f"{name}.safetensors"))
        two = _owned_statistics(runs / "two" / "factors" / "statistics", name)
        assert one.counts == two.counts
        per_example = [c for k, c in one.counts.items() if name == "eigenvalues" or k.endswith("/s")]
        assert set(per_example) == {40}  # factors.max_examples
        worst = max(_relative(two.sums[k], one.sums[k]) for k in one.sums)
        assert worst < 1e-5, (name, worst)


def test_two_ranks_factors_precondition_like_single_process(runs):
    one, two = Curvature.load(runs / "single" / "factors"), Curvature.load(runs / "two" / "factors")
    gen = torch.Generator().manual_seed(0)
    for name, shape in one.shapes.items():
        v = torch.randn(2, *shape, generator=gen)
        assert _relative(two.precondition({name: v})[name], one.precondition({name: v})[name]) < 1e-5, name


def test_two_ranks_scores_equal_single_process(runs):
    one = Scores.load(runs / "single" / "scores" / "scores.safetensors")
    two = Scores.load(runs / "two" / "scores" / "scores.safetensors")
    assert two.ids == one.ids and len(one) == N_TRAIN  # merged in data order
    assert _relative(two.values, one.values) < 1e-5


def test_two_ranks_fitting_in_partitions_score_as_single_process(runs):
    """[factors] partitions under torchrun: rank 0 writes each partition's factors per map, every rank scores with
    them streamed."""
    config = runs / "parts.toml"
    config.write_text((runs / "uneven.toml").read_text().replace("[factors]\n", "[factors]\npartitions = 2\n"))
    torchrun("run", "parts.toml", "--out", "two-parts", "--no-progress", cwd=runs)
    assert len(list((runs / "two-parts" / "factors" / "statistics").iterdir())) == 8  # 2 partitions x 2 passes x 2 owners
    one = Scores.load(runs / "single" / "scores" / "scores.safetensors")
    two = Scores.load(runs / "two-parts" / "scores" / "scores.safetensors")
    assert two.ids == one.ids and _relative(two.values, one.values) < 1e-5


def _factor_bytes(curvature: Curvature) -> dict[str, int]:
    """Per map, the bytes an owner holds: summed covariances, eigenbasis and corrected eigenvalues (float32)."""
    return {name: 4 * (2 * (d_in**2 + d_out**2) + d_in + d_out + d_out * d_in)
            for name, (d_out, d_in) in curvature.shapes.items()}


def test_two_ranks_own_half_the_factor_bytes(runs):
    """Each map's sums went to one owner rank, which eigendecomposed it and wrote its file: the maps are dealt
    between the ranks and each rank's factor bytes are half the total, up to the dealing's imbalance."""
    owners = json.loads((runs / "two" / "run.json").read_text())["stages"]["factors"]["owners"]
    per_map = _factor_bytes(Curvature.load(runs / "two" / "factors"))
    assert sorted(owners[0]["maps"] + owners[1]["maps"]) == sorted(per_map) and owners[0]["maps"] and owners[1]["maps"]
    total = sum(per_map.values())
    for held in owners:
        assert held["owned_bytes"] == sum(per_map[m] for m in held["maps"])  # (what the rank kept, measured)
        assert abs(held["owned_bytes"] - total / 2) <= max(per_map.values()) and held["owned_bytes"] <= 0.6 * total
        assert held["pass_bytes"] > held["owned_bytes"] / 2  # (a pass's sums cover every map: it does not fall)
    saved = json.loads((runs / "two" / "factors" / "curvature.json").read_text())
    assert saved["storage"] == "maps" and len(list((runs / "two" / "factors" / "maps").iterdir())) == len(per_map)


def test_two_owner_ranks_resume_a_pass_one_rank_had_not_finished(runs):
    """A stop after rank 0 kept its eigenvalue sums but before rank 1 did: both ranks sum that pass again, the
    covariances are read back from the owners' files (and eigendecomposed again), and the factors are the same."""
    import shutil

    folder = runs / "two-resumed"
    shutil.copytree(runs / "two", folder)
    factors = folder / "factors"
    before = {p.name: load_tensors(p) for p in (factors / "maps").iterdir()}
    for p in [factors / "curvature.json", factors / "statistics" / "eigenvalues-rank1of2.safetensors",
              *(factors / "maps").iterdir()]:
        p.unlink()
    torchrun("run", "uneven.toml", "--out", "two-resumed", "--no-progress", cwd=runs)
    after = {p.name: load_tensors(p) for p in (factors / "maps").iterdir()}
    assert after.keys() == before.keys()
    for name in before:
        for k in before[name]:
            torch.testing.assert_close(after[name][k], before[name][k], rtol=1e-6, atol=1e-9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from concept_influence.distributed import Ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stats = SumStats()
    if rank == 0:  # rank 1 saw no data (more ranks than shards)
        stats.add("m/a", torch.arange(4.0).reshape(2, 2), 3)
        stats.add("m/s", torch.ones(3), 1)
    total = Ranks(rank, 2).all_reduce(stats)
    torch.save({k: v for k, v in total.state_dict().items()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_all_reduce_with_a_rank_that_saw_no_data(tmp_path):
    out = str(tmp_path / "total")
    mp.spawn(_all_reduce_worker, args=(_free_port(), out), nprocs=2)
    for rank in (0, 1):
        total = SumStats.from_state_dict(torch.load(f"{out}.{rank}", weights_only=True))
        assert total.counts == {"m/a": 3, "m/s": 1}
        torch.testing.assert_close(total.sums["m/a"], torch.arange(4.0).reshape(2, 2))
        torch.testing.assert_close(total.sums["m/s"], torch.ones(3))


def _spaces_worker(rank: int, port: int, root: str) -> None:
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from concept_influence.curvature import Curvature
    from concept_influence.distributed import Ranks
    from concept_influence.index.build import checkpoint_spaces
    from concept_influence.index.store import IndexStore
    from concept_influence.models import load_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    adapter = load_model(f"{root}/model")
    curvature = Curvature.load(f"{root}/curvature", adapter)
    maps = [m for m in adapter.linear_maps() if m.name in curvature.shapes]
    if rank == 1:
        time.sleep(2.0)  # rank 0 has written the projection by the time rank 1 looks for it
    checkpoint_spaces(IndexStore.open(f"{root}/index"), 0, maps, curvature, Ranks(rank, 2))
    Ranks(rank, 2).barrier()
    dist.destroy_process_group()
    Path(f"{root}/done.{rank}").write_text("ok")


def test_ranks_agree_on_the_projection_whenever_rank_1_looks(tl_adapter, tokenized, tmp_path):
    """Rank 0 writes a checkpoint's projection while rank 1 may look for it before or after: both pass the same
    barriers either way (a rank that found the file and skipped a barrier exited while the other still waited, and
    the build ended with "Connection closed by peer" on a loaded machine)."""
    from concept_influence.curvature import fit_curvature
    from concept_influence.index import GradientIndex
    from concept_influence.models import save_model

    curvature = fit_curvature(tl_adapter, tokenized, tl_adapter.linear_maps(0), batch_size=4, progress=False)
    index = GradientIndex.build(tmp_path / "index", tl_adapter, tokenized, curvature, rank=2, projection="random",
                                progress=False)
    spaces = index.store.checkpoint_dir(0) / "spaces.safetensors"
    reference = load_tensors(spaces)
    spaces.unlink()  # as a build started by two ranks finds it
    save_model(tl_adapter, tmp_path / "model")
    curvature.save(tmp_path / "curvature")
    mp.spawn(_spaces_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    assert (tmp_path / "done.0").is_file() and (tmp_path / "done.1").is_file()
    again = load_tensors(spaces)
    assert again.keys() == reference.keys()
    for k in reference:  # (float64 Cholesky factors differ in the last bits with the thread count)
        torch.testing.assert_close(again[k], reference[k], rtol=1e-10, atol=0)

