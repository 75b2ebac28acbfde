"""Capacity plan: arithmetic on known inputs, and a real (small) calibration."""

from __future__ import annotations

import json
import math

import pytest

from silo.errors import SiloError
from silo.plan import GB, calibrate, parse_factory, plan, plans

CALIB = {"dim": 2048, "keys_per_second": 1000.0, "adds_per_second": 100_000.0, "t_centroid": 1e-9,
         "t_code": 1e-9, "entry_meta_bytes": 14.0, "text_bytes_per_token": 1.0, "rpc_overhead_s": 0.0,
         "doc_ram_bytes_per_entry": 0.5, "rss_base_bytes": 2 * GB}


def test_parse_factory():
    assert parse_factory("IVF65536,PQ64", 2048) == (65536, 64)
    assert parse_factory("IVF65536_HNSW32,PQ64", 2048) == (65536, 64)
    assert parse_factory("IVF4096,PQ32x4", 768) == (4096, 16)
    assert parse_factory("Flat", 768) == (1, 3072)
    with pytest.raises(SiloError):
        parse_factory("HNSW32", 768)


def test_trillion_token_arithmetic():
    p = plan(1e12, CALIB, "token", "IVF65536,PQ64", ram_per_node=256 * GB, cores_per_node=32, nprobe=32,
             ram_fraction=0.8, refine=4, k=64, ssd_read_s=100e-6)
    centroids = 65536 * 2048 * 4  # 512 MiB on every node
    per_node = 256 * GB * 0.8 - 2 * GB - centroids
    assert p["index_bytes"] == 1e12 * 72  # one index: codes + ids, split over the nodes
    assert p["nodes"] == p["nodes_needed"] == math.ceil((1e12 * 72 + 1e12 * 0.5) / per_node)
    assert p["metadata_disk_bytes"] == 14e12 and p["text_disk_bytes"] == 1e12
    assert p["keys_disk_bytes"] == 1e12 * 2 * 2048  # fp16 re-ranking keys on SSD
    assert p["ram_bytes"] == pytest.approx(1e12 * 72 + 1e12 * 0.5 + p["nodes"] * (centroids + 2 * GB))
    assert p["build_hours"] == pytest.approx((1e12 / (1000 * p["nodes"]) + 1e12 / (1e5 * p["nodes"])) / 3600)
    scan = 32 * (1e12 / p["nodes"] / 65536) * 1e-9 / 32
    assert p["latency_parts_s"]["scan"] == pytest.approx(scan)
    assert p["latency_parts_s"]["refine"] == pytest.approx(4 * 64 * 100e-6 / 32)
    assert p["query_latency_s"] == pytest.approx(sum(p["latency_parts_s"].values()))
    assert any("72" in a or "64+8" in a for a in p["assumptions"])


def test_lists_on_ssd_arithmetic():
    """Lists on SSD: RAM holds the hot part of the lists, nodes are bounded by SSD capacity
    too, warm scans cost the measured ratio, a cold one reads each probed list's pages."""
    calib = CALIB | {"ssd_warm_ratio": 1.5, "ssd_seek_s": 200e-6, "ssd_bandwidth": 1e9}
    kw = dict(ram_per_node=256 * GB, cores_per_node=32, nprobe=32, ram_fraction=0.8, refine=4, k=64)
    ram = plan(1e12, calib, "token", "IVF65536,PQ64", **kw)
    ssd = plan(1e12, calib, "token", "IVF65536,PQ64", lists="ssd", ssd_per_node=16e12, ssd_fraction=0.8,
               page_cache_fraction=0.1, **kw)
    centroids = 65536 * 2048 * 4
    per_node = 256 * GB * 0.8 - 2 * GB - centroids
    assert ssd["lists"] == "ssd" and ssd["disk_bytes"] == ram["disk_bytes"]
    by_ram = math.ceil((0.1 * 72e12 + 0.5e12) / per_node)
    by_disk = math.ceil(ssd["disk_bytes"] / (16e12 * 0.8))
    assert ssd["nodes"] == max(by_ram, by_disk) < ram["nodes"]
    assert ssd["ram_bytes"] == pytest.approx(0.1 * 72e12 + 0.5e12 + ssd["nodes"] * (centroids + 2 * GB))
    scan = 32 * (1e12 / ssd["nodes"] / 65536) * 1e-9 / 32
    parts = ssd["latency_parts_s"]
    assert parts["scan"] == pytest.approx(scan)
    assert parts["refine"] == pytest.approx(4 * 64 * 200e-6 / 32)  # the measured seek, not the assumed one
    assert ssd["query_latency_s"] == pytest.approx(parts["assign"] + 1.5 * scan + parts["refine"])
    list_read = 200e-6 + 1e12 / ssd["nodes"] / 65536 * 72 / 1e9
    assert ssd["cold_query_latency_s"] == pytest.approx(parts["assign"] + scan + 32 * list_read / 32
                                                        + parts["refine"])
    assert ram["cold_query_latency_s"] == pytest.approx(ram["query_latency_s"])  # nothing to read cold in RAM
    assert any("measured here" in a for a in ssd["assumptions"])
    assert any("assumed" in a for a in plan(1e12, CALIB, lists="ssd")["assumptions"])  # no SSD calibration
    both = plans(1e12, calib)
    assert both["ssd"]["token"]["lists"] == "ssd" and both["token"]["lists"] == "ram"
    with pytest.raises(SiloError, match="ram or ssd"):
        plan(1e12, calib, lists="tape")


def test_passage_store_alternative_and_explicit_nodes():
    both = plans(1.4e12, CALIB, nodes=4, workers=100, passage_tokens=256)
    p = both["passage"]
    assert p["entries"] == math.ceil(1.4e12 / 256) and both["token"]["entries"] == 1.4e12
    assert p["nodes"] == 4 and p["build_workers"] == 100 and p["fits"] == (p["nodes_needed"] <= 4)
    assert p["ram_bytes"] < both["token"]["ram_bytes"] / 100  # ~256x fewer entries
    assert {r["system"].split()[0] for r in both["published"]} >= {"MassiveDS", "CompactDS"}
    assert p["build_worker_hours"] == pytest.approx(p["build_hours"] * 100)
    default = plans(1.4e12, CALIB)  # one fleet builds both: the token store's node count
    assert default["passage"]["build_workers"] == default["token"]["build_workers"] == default["token"]["nodes"]
    assert default["passage"]["build_worker_hours"] < default["token"]["build_worker_hours"]
    with pytest.raises(SiloError):
        plan(0, CALIB)


def test_calibration_measures_this_machine(tmp_path, tiny_model, corpus_dir):
    c = calibrate(str(tiny_model), str(corpus_dir), tmp_path, tokens=20_000, nlist=32, progress=False)
    assert c["dim"] == 64 and c["entries"] > 10_000
    for key in ("keys_per_second", "adds_per_second", "t_centroid", "t_code", "entry_meta_bytes",
                "doc_ram_bytes_per_entry", "rss_base_bytes", "text_bytes_per_token"):
        assert c[key] > 0, key
    assert json.loads((tmp_path / "calibration.json").read_text())["dim"] == 64
    assert c["ssd_warm_ratio"] > 0 and c["ssd_seek_s"] > 0 and c["ssd_bandwidth"] > 0  # measured, not assumed
    p = plan(1e12, c)
    assert p["nodes"] > 0 and p["build_hours"] > 0 and p["query_latency_s"] > 0
