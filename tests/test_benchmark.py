"""The benchmark runs end to end in smoke mode (tiny weights), so it cannot rot between real runs."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_smoke_mode_writes_its_tables(tmp_path):
    report = load_bench().main(["--smoke", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--threads", "1"])
    for row in ("load_s", "peak_memory_mb", "unet_step", "vae_decode", "text_encode", "image_encode", "end_to_end", "unet_64px_b1"):
        assert report["rows"][row]["minipa"] > 0 and report["rows"][row]["diffusers"] > 0, row
    table = (tmp_path / "out" / "smoke.md").read_text()
    assert "| unet_step |" in table and "minipa / diffusers" in table
    assert (tmp_path / "out" / "smoke.json").exists()


def test_precision_mode_compares_half_precision_with_float32_for_both_libraries(tmp_path):
    report = load_bench().main(["--smoke", "--precision", "--steps", "2", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                         "--threads", "1"])
    for row in ("bfloat16_vs_float32_max", "float16_vs_float32_max"):
        assert 0 < report["rows"][row]["minipa"] < 0.2 and 0 < report["rows"][row]["diffusers"] < 0.2, row
    assert "| bfloat16_vs_float32_mean |" in (tmp_path / "out" / "precision-smoke.md").read_text()
