"""Capacity plan: arithmetic on known inputs, and a real (small) calibration."""

from __future__ import annotations

import json
import math

import pytest

from silo.plan import GB, calibrate, parse_factory, plan

CALIB = {"dim": 2048, "keys_per_second": 1000.0, "adds_per_second": 100_000.0, "t_centroid": 1e-9,
         "t_code": 1e-9, "entry_meta_bytes": 4.0, "text_bytes_per_token": 1.0, "rpc_overhead_s": 0.0}


def test_parse_factory():
    assert parse_factory("IVF65536,PQ64", 2048) == (65536, 64)
    assert parse_factory("IVF4096,PQ32x4", 768) == (4096, 16)
    assert parse_factory("Flat", 768) == (1, 3072)
    with pytest.raises(ValueError):
        parse_factory("HNSW32", 768)


def test_trillion_token_arithmetic():
    p = plan(1e12, CALIB, "token", "IVF65536,PQ64", ram_per_node=256 * GB, cores_per_node=32, nprobe=32)
    centroids = 65536 * 2048 * 4  # 512 MiB per shard
    per_shard = (128 * GB - centroids) // 72
    assert p["shards"] == math.ceil(1e12 / per_shard)
    assert p["index_bytes"] == pytest.approx(1e12 * 72 + p["shards"] * centroids)
    assert p["metadata_bytes"] == 4e12 and p["text_bytes"] == 1e12
    assert p["nodes"] == p["nodes_needed_for_ram"] == math.ceil((p["index_bytes"] + 4e12) / (256 * GB * 0.9))
    assert p["build_hours"] == pytest.approx((1e12 / (1000 * p["nodes"]) + 1e12 / (1e5 * p["nodes"])) / 3600)
    eps = 1e12 / p["shards"]
    shard_q = 65536 * 1e-9 + 32 * eps / 65536 * 1e-9
    assert p["query_latency_s"] == pytest.approx(math.ceil(math.ceil(p["shards"] / p["nodes"]) / 32) * shard_q)
    assert any("72" in a or "64+8" in a for a in p["assumptions"])


def test_passage_store_and_explicit_nodes():
    p = plan(1.4e12, CALIB, "passage", "IVF8192,PQ16", nodes=4, workers=100, passage_tokens=256)
    assert p["entries"] == math.ceil(1.4e12 / 256)
    assert p["nodes"] == 4 and p["build_workers"] == 100
    assert p["fits_in_ram"] == (p["nodes_needed_for_ram"] <= 4)
    with pytest.raises(ValueError):
        plan(0, CALIB)


def test_calibration_measures_this_machine(tmp_path, tiny_model, corpus_dir):
    c = calibrate(str(tiny_model), str(corpus_dir), tmp_path, tokens=20_000, nlist=32, progress=False)
    assert c["dim"] == 64 and c["entries"] > 10_000
    for key in ("keys_per_second", "adds_per_second", "t_centroid", "t_code", "entry_meta_bytes"):
        assert c[key] > 0, key
    assert json.loads((tmp_path / "calibration.json").read_text())["dim"] == 64
    p = plan(1e12, c)
    assert p["shards"] > 0 and p["build_hours"] > 0
