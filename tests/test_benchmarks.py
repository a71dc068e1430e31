"""The benchmarks still run: each one with tiny sizes and a single repetition.

A smoke test only: it proves the scripts have not rotted (they import, drive the library the
way they measure it, and produce a report, a table and JSON); it asserts nothing about
timings, which is the benchmarks' own business (``python -m benchmarks``).
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from pathlib import Path

import pytest

# The benchmarks are a package at the repository root, not part of the installed library:
# make them importable however pytest was started (``pytest`` does not put the root on
# sys.path the way ``python -m pytest`` does).
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import benchmarks  # noqa: E402
from benchmarks import _common, dispatch, durable, flood, http, memory, sessions  # noqa: E402


@pytest.fixture(autouse=True)
def no_settling(monkeypatch: pytest.MonkeyPatch) -> None:
    # A full gc.collect() before every repetition keeps real runs honest; under pytest's big
    # heap it would be most of this file's time, and nothing here is timed.
    monkeypatch.setattr(_common, "settle", lambda: None)


def check(report: _common.Report) -> None:
    assert report.rows
    for row in report.rows:
        assert row.value.samples
    table = _common.render(report)
    assert report.title in table


def test_dispatch_runs() -> None:
    report = dispatch.run(sizes=(20, 40), reps=1, batch=10)
    check(report)
    assert {t.name for t in report.targets} == {"dispatch ratio", "dispatch flat in N"}


def test_sessions_run() -> None:
    report = sessions.run(size=20, reps=1)
    check(report)
    delivered = [r for r in report.rows if r.metric == "terminals delivered"]
    assert delivered[0].value.median == 21  # every queued run and the active one


def test_flood_runs_and_loses_no_terminal() -> None:
    report = flood.run(subscribers=(1, 2), duration=0.01, reps=1)
    check(report)
    lost = [r for r in report.rows if r.metric == "terminals lost"]
    assert lost
    assert all(r.value.max == 0 for r in lost)


def test_memory_runs_without_its_rss_part() -> None:
    report = memory.run(trace_runs=20, rss_sizes=(), reps=1)
    check(report)


def test_memory_rss_child_reports_from_a_subprocess() -> None:
    result = memory.rss_in_subprocess("trio_runs", 30, 30)
    assert set(result) == {"start_rss", "end_rss", "peak_rss"}
    assert result["peak_rss"] >= result["start_rss"] > 0


def test_http_runs_every_client_count_against_both_baselines() -> None:
    report = http.run(clients=(1, 3), round_trips=6, reps=1)
    check(report)
    assert not report.skipped
    assert {row.label for row in report.rows} == {"1 client", "3 clients"}
    assert all(row.baseline is not None for row in report.rows)
    assert [t.holds for t in report.targets] == [True]


def test_http_server_child_stops_when_its_stdin_closes() -> None:
    with http.running_server() as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert server.cpu_seconds() > 0
    # Exit status 0: it shut down gracefully, not killed after the timeout (-9).
    assert server.process.returncode == 0


def test_http_without_the_extra_is_skipped_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.import_module

    def no_http(name: str, package: str | None = None) -> object:
        if name.startswith("trio_runs.http"):
            raise ImportError("No module named 'hypercorn'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", no_http)
    report = http.run()
    assert "pip install" in report.skipped
    assert "SKIPPED" in _common.render(report)


def test_durable_runs_all_three_workloads_on_both_stores() -> None:
    report = durable.run(
        sizes=(20,),
        reps=1,
        batch=10,
        clients=(1, 2),
        round_trips=4,
        memory_runs=8,
        memory_runs_in_memory=2,
        result_bytes=1024,
        retention_bytes=64 * 1024,
    )
    check(report)
    labels = {row.label for row in report.rows}
    assert {"dispatch, N=20", "HTTP, 1 client", "HTTP, 2 clients"} <= labels
    assert any(label.startswith("memory, 8 runs") for label in labels)
    commits = [r for r in report.rows if r.metric == "commits per 1,000 runs"]
    assert commits
    assert all(r.value.median > 0 for r in commits)
    assert {t.name for t in report.targets} == {
        "durable dispatch",
        "durable HTTP round trip",
        "every durable HTTP round trip ends",
        "durable RSS",
    }
    assert [t.holds for t in report.targets if t.name == "every durable HTTP round trip ends"] == [
        True
    ]


def test_durable_databases_are_on_the_repository_filesystem_not_in_memory() -> None:
    directory = durable.database_dir()
    assert durable._filesystem(directory) not in {"tmpfs", "ramfs"}
    with durable.database_file(directory) as db:
        assert Path(db).parent.is_dir()
    assert not Path(db).parent.exists()


def test_interleaved_rotates_which_measure_goes_first() -> None:
    order: list[str] = []

    def measure(name: str) -> str:
        order.append(name)
        return name

    a, b, c = _common.interleaved(3, *(functools.partial(measure, n) for n in "abc"))
    assert (a, b, c) == (["a"] * 3, ["b"] * 3, ["c"] * 3)
    assert order == list("abcbcacab")


def test_json_report_holds_machine_versions_parameters_and_figures(tmp_path: Path) -> None:
    stat = _common.Stat.of([1.0, 2.0, 3.0])
    report = _common.Report("demo", "a demo", "a floor", {"size": 10})
    report.add(_common.Row("case", "figure", "ms", stat, stat, _common.ratios([1.0], [2.0])))
    path = tmp_path / "bench.json"
    _common.write_json(str(path), [report], {"quick": True}, 1.0)
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["machine"]["versions"]["trio"]
    assert document["benchmarks"][0]["params"]["size"] == 10
    row = document["benchmarks"][0]["rows"][0]
    assert {"median", "min", "max", "samples"} <= set(row["value"])
    assert row["baseline"] is not None


def test_main_refuses_fewer_than_five_repetitions() -> None:
    with pytest.raises(SystemExit) as exc:
        benchmarks.main(["--reps", "1"])
    assert exc.value.code == 2


# -- peers (issue 12): only the parts that need neither Celery, arq nor Redis -----------------


def test_peers_is_opt_in_never_in_the_default_set() -> None:
    # It installs Celery and arq (pip) and needs redis-server: never by default, never in CI.
    assert "peers" not in benchmarks.BENCHMARKS
    assert "peers" in benchmarks.OPT_IN


def test_peers_trio_runs_only_measures_every_trio_runs_path() -> None:
    from benchmarks import peers

    report = peers.run(clients=(1, 3), jobs=6, reps=1, peers=False)
    check(report)
    assert not report.skipped
    figures = {row.metric for row in report.rows}
    assert {
        peers.LABELS[s] for s in ("two", "one", "batch", "multiplexed", "in-process")
    } <= figures
    assert {row.label for row in report.rows} == {"1 client", "3 clients"}
    assert [t.holds for t in report.targets] == [True]  # every job ended; no peer, no ratio


def test_peers_without_redis_is_skipped_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from benchmarks import peers

    monkeypatch.setattr(peers.shutil, "which", lambda name: None)
    report = peers.run(reps=1)
    assert "apt-get install -y redis-server" in report.skipped
    assert "SKIPPED" in _common.render(report)


def test_peers_measures_the_redis_mode_on_one_and_two_nodes() -> None:
    # Real `trio-runs serve --redis` nodes on a redis-server the benchmark starts (no peers).
    import redis_server

    from benchmarks import peers
    from benchmarks.peers.table import markdown

    if redis_server.BINARY is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if redis_server.required():
            pytest.fail(f"{reason}, and TRIO_RUNS_REQUIRE_REDIS=1")
        pytest.skip(reason)
    report = peers.run(
        clients=(1, 3), jobs=6, reps=1, peers=False, redis_nodes=(1, 2), only=["redis"]
    )
    check(report)
    wanted = {peers.LABELS[peers.redis_system(n, m)] for n in (1, 2) for m in peers.REDIS_MODES}
    assert {row.metric for row in report.rows} == wanted | {w + peers.P99 for w in wanted}
    assert [t.holds for t in report.targets] == [True]  # every job ended
    table = markdown(report.to_json())
    assert table.count("\n| trio-runs on Redis") == len(wanted)


def test_peers_judges_the_redis_mode_targets_per_repetition() -> None:
    from benchmarks import peers

    def sample(rate: float, p99: float) -> peers.Sample:
        return peers.Sample(100 / rate, 0.0, 100, 100, (p99,) * 100)

    samples = {
        ("celery", 64): [sample(600, 0.2)] * 5,
        ("arq", 64): [sample(1_000, 0.1)] * 5,
        (peers.redis_system(1, peers.REDIS_TARGET_MODE), 64): [sample(2_000, 0.05)] * 5,
        (peers.redis_system(2, peers.REDIS_TARGET_MODE), 64): [sample(1_500, 0.15)] * 5,
    }
    report = _common.Report("peers", "t", "b", {})
    peers.add_redis_targets(report, (64,), samples)
    verdicts = {t.name: t.holds for t in report.targets}
    assert verdicts == {
        "Redis 1 node (multiplexed) >= arq at 64 clients": True,
        "Redis 1 node (multiplexed) >= 3x Celery at 64 clients": True,
        "Redis 1 node (multiplexed) p99 below Celery's and arq's at 64 clients": True,
        "Redis 2 nodes (multiplexed) >= arq at 64 clients": True,
        "Redis 2 nodes (multiplexed) >= 3x Celery at 64 clients": False,
        "Redis 2 nodes (multiplexed) p99 below Celery's and arq's at 64 clients": False,
    }


def test_peers_main_refuses_fewer_than_five_repetitions() -> None:
    from benchmarks import peers

    with pytest.raises(SystemExit) as exc:
        peers.main(["--reps", "1", "--trio-runs-only"])
    assert exc.value.code == 2
