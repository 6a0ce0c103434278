"""Train -> serve weight sync on real Ray: exactness of the RL loop for trainer
layouts DP1 / DP2 / TP2 and serving layouts 1x1, 1x2, 2x1, 2x2 (PP x TP), over both
routes (each serving and each trainer layout meets both); the trainer's DP and TP
give the same weights; staged and unstaged failures on both routes; bad layouts;
sleep / wake; concurrency; a closed executor; the object store left as it was."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rayexec import ExecutorClosedError, RayDistributedExecutor, ResourceConfig, WorkerGroup
from rayexec.errors import ExecutorAsleepError, WeightSyncError
from rayexec.models.batch import StepBatch
from rayexec.models.engine import make_prompts
from rayexec.models.rl import TINY, RLSetup
from rayexec.models.trainer import TrainerWorker, full_weights
from rayexec.models.worker import decoder_executor_config
from tests.weight_workers import BadTrainer

TRAINERS = {"dp1": (1, 1), "dp2": (2, 1), "tp2": (1, 2)}
SERVING = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1), "2x2": (2, 2)}


def start_trainer(dp: int, tp: int, cls=TrainerWorker, **kw) -> WorkerGroup:
    group = WorkerGroup.from_config(cls, {"dp": dp, "tp": tp, "model": TINY, **kw},
                                    ResourceConfig(num_workers=dp * tp, cpus_per_worker=0.5))
    try:
        group.run("init_device")
    except BaseException:
        group.shutdown()
        raise
    return group


def start_executor(pp: int, tp: int, **kw) -> RayDistributedExecutor:
    return RayDistributedExecutor(decoder_executor_config(
        pp, tp, model=TINY, device="cpu", num_devices_per_worker=0.5, **kw))


@pytest.fixture(scope="module", params=list(SERVING))
def serving(request, local_ray):
    with start_executor(*SERVING[request.param]) as ex:
        yield ex


ROUTES = ("object_store", "process_group")


@pytest.mark.parametrize("trainer_layout", list(TRAINERS))
def test_rl_loop_is_exact(serving, trainer_layout, request):
    # The two routes alternate over the 4 x 3 cells, so that every serving layout and
    # every trainer layout is synced by both.
    serving_layout = request.node.callspec.params["serving"]
    cell = list(SERVING).index(serving_layout) + list(TRAINERS).index(trainer_layout)
    route = ROUTES[cell % 2]
    trainer = start_trainer(*TRAINERS[trainer_layout])
    try:
        rl = RLSetup(trainer, serving, TINY, make_prompts(4, 8, TINY["vocab_size"]), 6, False,
                     via=route)
        records = [rl.iteration(v) for v in (1, 2)]
    finally:
        trainer.shutdown()
    for r in records:
        assert r["identical"], (r["ids"], r["reference_ids"], r["max_logit_diff"])
        assert r["route"] == route
    assert [r["version"] for r in records] == [1, 2] and serving.weights_version == 2
    assert records[0]["loss"] != records[1]["loss"]  # the trainer did train
    # The trainer's ranks share the sending (DP replicas and TP parts alike).
    assert all(b > 0 for b in records[0]["bytes_by_source_rank"].values())


def test_trainer_dp_and_tp_train_the_same_weights(local_ray):
    seqs = make_prompts(4, 10, TINY["vocab_size"], seed=3)
    weights, losses = {}, {}
    for name, (dp, tp) in TRAINERS.items():
        group = start_trainer(dp, tp)
        try:
            losses[name] = group.run("train_step", (seqs,))[0]
            weights[name] = full_weights(group.run("weight_shards"))
        finally:
            group.shutdown()
    for name in ("dp2", "tp2"):
        assert losses[name] == pytest.approx(losses["dp1"], rel=1e-5)
        for key, t in weights["dp1"].items():
            torch.testing.assert_close(weights[name][key], t, rtol=1e-4, atol=1e-6,
                                       msg=f"{name} {key}")


@pytest.fixture(scope="module")
def one_by_two(local_ray):
    with start_executor(1, 2, forward="rpc") as ex:
        yield ex


def step(ex) -> tuple:
    out = ex.execute_model(StepBatch.prefill([7], [[5, 6, 7, 8]], return_logits=True))
    ex.execute_model(StepBatch((), (), (), (), finished=(7,)))  # free the cache entry
    return out.next_token_ids, out.logits


def test_a_name_on_one_side_and_uncoverable_layout_are_named(one_by_two):
    before = step(one_by_two)
    version = one_by_two.weights_version
    group = start_trainer(1, 1, cls=BadTrainer, fault="extra_name")
    try:
        with pytest.raises(ValueError, match=r"source holds weight\(s\) \['value_head'\]"):
            one_by_two.update_weights(group)
    finally:
        group.shutdown()
    group = start_trainer(1, 1, cls=BadTrainer, fault="half")
    try:
        with pytest.raises(ValueError, match=r"'layers.0.q_proj': destination rank 1 needs"
                                             r".*no source rank holds the region"):
            one_by_two.update_weights(group)
    finally:
        group.shutdown()
    # Nothing moved: the executor serves the same weights.
    assert one_by_two.weights_version == version
    assert step(one_by_two)[0] == before[0]


def test_shape_mismatch_names_the_weight_and_both_shapes(one_by_two):
    group = WorkerGroup.from_config(
        TrainerWorker, {"model": {**TINY, "intermediate_size": 256}},
        ResourceConfig(num_workers=1, cpus_per_worker=0.5))
    try:
        group.run("init_device")
        with pytest.raises(ValueError, match=r"weight 'layers.0.gate_proj': source rank 0 has "
                                             r"full shape \[256, 64\].*destination rank 0 has "
                                             r"\[128, 64\]"):
            one_by_two.update_weights(group)
    finally:
        group.shutdown()


@pytest.mark.parametrize("via", ROUTES)
@pytest.mark.parametrize("stage", [True, False])
def test_trainer_rank_killed_mid_sync(one_by_two, stage, via):
    good = start_trainer(1, 1)
    try:
        one_by_two.update_weights(good, version=10)
        served = step(one_by_two)
        expected = full_weights(good.run("weight_shards"))
    finally:
        good.shutdown()
    bad = start_trainer(2, 1, cls=BadTrainer, fault="die", die_rank=1, die_after=3)
    try:
        with pytest.raises(WeightSyncError, match=r"source rank 1 died") as err:
            one_by_two.update_weights(bad, version=11, stage=stage, bucket_bytes=16 << 10,
                                      via=via)
    finally:
        bad.shutdown()
    if via == "object_store" and not stage:
        # The source died while putting its objects, before any rank read one.
        assert "Nothing was loaded" in str(err.value) and "version 10" in str(err.value)
        assert one_by_two.weights_version == 10
        assert step(one_by_two)[0] == served[0]
    elif stage:
        assert "keeps serving version 10" in str(err.value)
        assert one_by_two.weights_version == 10
        ids, logits = step(one_by_two)
        assert ids == served[0]
        torch.testing.assert_close(logits, served[1])
        assert expected  # the old weights were never touched
    else:
        assert "hold a mix of versions" in str(err.value) and "/" in str(err.value)
        with pytest.raises(WeightSyncError, match="steps are refused: weight sync to version 11 "
                                                  "failed midway"):
            step(one_by_two)
        good = start_trainer(1, 1)
        try:
            one_by_two.update_weights(good, version=12)
        finally:
            good.shutdown()
        assert one_by_two.weights_version == 12
        assert step(one_by_two)[0] == served[0]  # the same trainer weights as version 10


def test_object_store_route_leaves_no_objects_behind(one_by_two):
    from benchmarks.soak import object_store_mb

    group = start_trainer(1, 1)
    try:
        before = object_store_mb()
        reports = [one_by_two.update_weights(group, via="object_store", stage=stage)
                   for stage in (True, False) * 3]
        put_mb = reports[0].bytes / 2**20  # six syncs: a leak would be 6 x this
        assert [r.route for r in reports] == ["object_store"] * 6 and put_mb > 0.5
        # Measured while the trainer (the objects' owner) lives: its exit frees them.
        deadline = time.monotonic() + 30  # Ray frees objects asynchronously
        while object_store_mb() - before > put_mb / 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        after = object_store_mb()
    finally:
        group.shutdown()
    assert after - before < put_mb / 2, (before, after, put_mb)


def test_auto_takes_the_object_store_only_where_it_is_the_faster_route(local_ray):
    from rayexec.weights.plan import WeightSpec, plan_transfers
    from rayexec.weights.sync import _route

    node = local_ray.get_runtime_context().get_node_id()
    whole = {0: {"w": WeightSpec((64, 8), "float32")}}
    halves = {r: {"w": WeightSpec((64, 8), "float32", 0, 2, r)} for r in range(2)}

    def route(src, dst, nodes=(node,), devices=("cpu", "cpu"), same=None, via="auto"):
        plan = plan_transfers(src, dst, split_replicas=False)
        where = {("src", r): (nodes[0], devices[0]) for r in src}
        where.update({("dst", d): (nodes[-1], devices[1]) for d in dst})
        return _route(via, plan, where, same or {})

    assert route(whole, halves) == "object_store"  # TP destinations map one whole tensor
    assert route(halves, whole) == "process_group"  # assembled from two sources' parts
    assert route(whole, halves, nodes=(node, "other-node")) == "process_group"
    assert route(whole, halves, devices=("cuda", "cpu")) == "process_group"
    assert route(whole, halves, same={0: 0}) == "process_group"
    huge = {0: {"w": WeightSpec((1 << 40,), "uint8")}}  # more than half the store
    assert route(huge, huge) == "process_group"
    assert route(halves, whole, via="object_store") == "object_store"  # asked for: taken
    with pytest.raises(ValueError, match=r"via='object_store'\) moves CPU tensors, but "
                                         r"\['src rank 0: cuda'\]; use via='process_group'"):
        route(whole, halves, devices=("cuda", "cpu"), via="object_store")


def test_concurrent_updates_run_one_after_the_other(one_by_two):
    group = start_trainer(1, 1)
    reports, errors = {}, []

    def sync(version):
        try:
            reports[version] = one_by_two.update_weights(group, version=version)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    try:
        threads = [threading.Thread(target=sync, args=(v,)) for v in (21, 22)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        group.shutdown()
    assert not errors and set(reports) == {21, 22}
    first, second = sorted(reports.values(), key=lambda r: r.started)
    assert first.started + first.seconds <= second.started  # never overlapped
    assert one_by_two.weights_version == second.version


def test_sleep_refuses_steps_and_level_2_needs_a_sync(one_by_two):
    before = step(one_by_two)
    freed = one_by_two.sleep(1)
    with pytest.raises(ExecutorAsleepError, match="asleep .level 1.; call wake_up"):
        step(one_by_two)
    one_by_two.wake_up()
    assert step(one_by_two)[0] == before[0]
    weight_bytes = [sum(s["bytes"] for s in r) for r in
                    one_by_two.collective_rpc(lambda w: [
                        {"bytes": t.numel() * t.element_size()}
                        for t in w.shard.named_weights().values()])]
    freed = one_by_two.sleep(2)
    assert [f["weight_bytes"] for f in freed] == weight_bytes
    one_by_two.wake_up()
    with pytest.raises(WeightSyncError, match=r"sleep\(level=2\) freed the weights"):
        step(one_by_two)
    group = start_trainer(1, 1)
    try:
        one_by_two.update_weights(group)
        expected = full_weights(group.run("weight_shards"))
    finally:
        group.shutdown()
    from rayexec.models.reference import ReferenceModel

    ref = ReferenceModel(TINY)
    ref.shard.load_named(expected)
    want = ref.decode_step(StepBatch.prefill([1], [[5, 6, 7, 8]]))
    assert step(one_by_two)[0] == want.next_token_ids


def test_update_weights_on_a_closed_executor(local_ray):
    ex = start_executor(1, 1, forward="rpc")
    ex.shutdown()
    with pytest.raises(ExecutorClosedError):
        ex.update_weights(None)


def test_colocated_trainer_and_executor_share_bundles(local_ray, no_leaks):
    from ray.util import placement_group_table

    with RLSetup.start(2, 1, 2, 1, model=TINY, colocate=True, max_new_tokens=4) as rl:
        pg_id = rl.placement_group.id.hex()
        assert rl.executor.placement_group.id.hex() == pg_id
        assert len(placement_group_table()[pg_id]["bundles"]) == 2  # 4 actors on 2 bundles
        record = rl.iteration(1)
    assert record["identical"], record
    assert "sleep_rss_freed_bytes" in record and record["version"] == 1


def test_an_executor_is_a_source_too(one_by_two):
    """Serve -> serve resharding (1x2 -> 1x1), and a sync from itself moves no bytes."""
    group = start_trainer(1, 2)
    try:
        one_by_two.update_weights(group, version=30)
    finally:
        group.shutdown()
    want = step(one_by_two)
    with start_executor(1, 1, forward="rpc") as other:
        report = other.update_weights(one_by_two, version=30)
        assert report.bytes == sum(report.bytes_by_source_rank.values()) > 0
        got = step(other)
    assert got[0] == want[0]
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    itself = one_by_two.update_weights(one_by_two, version=31)
    assert itself.bytes == 0 and one_by_two.weights_version == 31
    assert step(one_by_two)[0] == want[0]


def test_rl_cli_writes_identical_iterations(local_ray, tmp_path):
    import json

    from rayexec.cli import main

    path = tmp_path / "rl.json"
    assert main(["rl", "--train-tp", "2", "--iterations", "1", "--model", "tiny",
                 "--max-new-tokens", "4", "--json", str(path)]) == 0
    record = json.loads(path.read_text())["iterations"][0]
    assert record["identical"] and record["version"] == 1 and record["bytes"] > 0
    assert record["ids"] == record["reference_ids"]
