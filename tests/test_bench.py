"""The GPU benchmarks in their CPU smoke modes, their helpers, and ``bench/run_all.py``'s table building."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import _clip_step  # noqa: E402
import _common  # noqa: E402
import _results  # noqa: E402
import gpu_input  # noqa: E402
import gpu_train  # noqa: E402
import run_all  # noqa: E402

SMOKE = ["--device", "cpu", "--model", "clip-tiny", "--batch", "8", "--steps", "3", "--warmup", "1", "--no-compile"]
HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None

# ------------------------------------------------------------------------------ example JSON lines, one per benchmark
M = "x86_64, 2 cores"
EXAMPLES = {
    "data_loading": {
        "bench": "data_loading", "machine": M, "ingest_rows_per_s": 850.2, "draft_gain": {"224px/0w": 1.5},
        "loader": [{"size": 224, "draft": True, "workers": 0, "lance_ips": 310.0, "folder_ips": 280.0, "ratio": 1.09},
                   {"size": 224, "draft": False, "workers": 2, "lance_ips": 400.0, "folder_ips": 500.0,
                    "ratio": 0.81}]},
    "train_step": {
        "bench": "train_step", "machine": M, "ratios": {},
        "results": [{"impl": "vlkit", "precision": "bf16", "text": "captions", "max_tokens": 20,
                     "train_samples_per_s": 12.0, "embed_images_per_s": 60.0, "peak_rss_mib": 2000.0,
                     "params_m": 151.3},
                    {"impl": "transformers", "precision": "bf16", "text": "captions", "max_tokens": 20,
                     "train_samples_per_s": 8.0, "embed_images_per_s": 40.0, "peak_rss_mib": 2500.0,
                     "params_m": 151.3}]},
    "search": {
        "bench": "search", "machine": M, "embed_images_per_s": 95.5, "real_vectors": 1000, "dim": 256,
        "results": [{"method": "exact", "rows": 10000, "build_s": 0.0, "p50_ms": 8.0, "p95_ms": 9.0,
                     "recall_at_10": 1.0},
                    {"method": "ivf_sq", "rows": 10000, "build_s": 1.2, "p50_ms": 2.0, "p95_ms": 3.0,
                     "recall_at_10": 0.95}]},
    "quality_flickr8k": {
        "bench": "quality_flickr8k", "machine": M, "epochs": 20, "overrides": [],
        "baseline": {"t2i_r1": 20.0, "t2i_r5": 50.0, "t2i_r10": 60.0, "i2t_r1": 25.0, "i2t_r5": 55.0, "i2t_r10": 65.0},
        "quickstart": {"t2i_r1": 30.0, "t2i_r5": 60.0, "t2i_r10": 70.0, "i2t_r1": 35.0, "i2t_r5": 65.0,
                       "i2t_r10": 75.0},
        "baseline_seconds": 100, "quickstart_seconds": 900},
    "gpu_train": {
        "bench": "gpu_train", "machine": "NVIDIA H200", "device": "cuda", "model": "clip-vit-b-16", "batch": 256,
        "samples_per_s": 1500.0, "step_ms": 170.7, "mfu": 0.42, "peak_mem_gib": 30.0, "max_batch": 2048,
        "vlkit": {"impl": "vlkit", "samples_per_s": 1500.0, "step_ms": 170.7, "mfu": 0.42, "peak_mem_gib": 30.0,
                  "max_batch": 2048},
        "reference": {"impl": "open_clip", "available": True, "note": "open_clip 3.0 ViT-B-16",
                      "samples_per_s": 1200.0, "mfu": 0.336, "peak_mem_gib": 40.0, "max_batch": 1536,
                      "ratio_samples_per_s": 1.25}},
    "gpu_input": {
        "bench": "gpu_input", "machine": "NVIDIA H200", "images": 2048, "gpu_note": None,
        "cpu": [{"workers": 0, "images_per_s": 150.0}, {"workers": 16, "images_per_s": 1600.0}],
        "gpu": {"pipeline_images_per_s": 4000.0, "decode_only_images_per_s": 8000.0, "gpu_util_pct": 35.0,
                "workers": 4}},
}


def by_figure(rows, text):
    hits = [r for r in rows if text in r.figure]
    assert len(hits) == 1, (text, [r.figure for r in rows])
    return hits[0]


# ------------------------------------------------------------------------------ smoke runs
@pytest.fixture(scope="module")
def gpu_train_smoke():
    """gpu_train in its CPU smoke mode (asking for open_clip too), run the way run_all runs benchmarks."""
    outcome = run_all.run_benchmark("gpu_train", [*SMOKE, "--reference", "open_clip"], timeout=300, echo=False)
    assert outcome.status == "ok", outcome.status
    return outcome.result


def test_gpu_train_smoke_on_cpu(gpu_train_smoke):
    r = gpu_train_smoke
    assert r["bench"] == "gpu_train" and r["device"] == "cpu" and r["model"] == "clip-tiny" and r["batch"] == 8
    assert r["samples_per_s"] > 0 and r["step_ms"] > 0
    for key in ("machine", "mfu", "peak_mem_gib", "flops_per_sample", "peak_flops", "attention_kernels",
                "flash_sdp_enabled", "compile", "fused", "precision", "vlkit", "reference"):
        assert key in r, key
    assert r["precision"] == "bf16" and r["compile"] is False
    assert r["vlkit"]["loss_finite"] and len(r["vlkit"]["losses"]) >= 1
    assert r["attention_kernels"], "the profiled step names the attention kernels"
    if gpu_train.flops_api is not None:
        assert r["flops_per_sample"] > 0
    assert r["mfu"] is None and r["peak_mem_gib"] is None  # no CPU peak FLOP/s, no CUDA memory
    if not HAS_OPEN_CLIP:
        assert r["reference"]["available"] is False and "not importable" in r["reference"]["note"]


def test_gpu_input_smoke(synth):
    outcome = run_all.run_benchmark("gpu_input", ["--data", str(synth), "--workers", "0", "2", "--limit", "64",
                                                  "--batch-size", "32", "--repeats", "1", "--device", "cpu"],
                                    timeout=300, echo=False)
    assert outcome.status == "ok", outcome.status
    r = outcome.result
    assert [c["workers"] for c in r["cpu"]] == [0, 2]
    assert all(c["images_per_s"] > 0 for c in r["cpu"])
    assert r["gpu"] is None and r["gpu_note"] == "skipped: no CUDA"
    rows = _results.rows_for(r)
    assert [row.vlkit for row in rows][-1] == "skipped: no CUDA"


def test_run_benchmark_reports_failure():
    outcome = run_all.run_benchmark("gpu_train", ["--batch", "0"], echo=False)
    assert outcome.status == "failed: exit code 2" and outcome.result is None


# ------------------------------------------------------------------------------ gpu_train helpers
@pytest.mark.parametrize("limit_fits, start, limit, expect_max", [
    (700, 256, 65536, 700),   # doubles to 1024, bisects down
    (100, 256, 65536, 100),   # the first size already fails
    (10**9, 8, 64, 64),       # never fails: stops at the limit
    (0, 8, 64, 0),            # nothing fits
])
def test_find_max_batch(limit_fits, start, limit, expect_max):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= limit_fits

    found = gpu_train.find_max_batch(fits, start, limit, resolution=16)
    assert found <= expect_max and (found == expect_max or expect_max - found <= 16)
    assert found == 0 or fits(found)
    assert len(tried) < 20


def test_is_out_of_memory():
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    assert _common.is_out_of_memory(oom("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _common.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    try:
        try:
            raise oom("x")
        except Exception as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as wrapped:
        assert _common.is_out_of_memory(wrapped)
    assert not _common.is_out_of_memory(ValueError("shapes do not match"))


def test_classify_attention_kernels():
    classify = _clip_step.classify_attention_kernels
    assert classify(["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>",
                     "aten::_scaled_dot_product_flash_attention"]) == ["flash"]
    assert classify(["fmha_cutlassB_bf16_aligned_64x64_k64_sm80",
                     "aten::_scaled_dot_product_efficient_attention"]) == ["efficient"]
    assert classify(["cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7"]) == ["cudnn"]
    assert classify(["ScaledDotProductFlashAttentionForCpuBackward0",
                     "aten::_scaled_dot_product_flash_attention_for_cpu"]) == ["flash (cpu)"]
    assert classify(["aten::_scaled_dot_product_attention_math", "aten::addmm", "aten::softmax"]) == ["math"]


def test_synthetic_inputs_look_like_padded_captions():
    import vlkit

    cfg = vlkit.create_model("clip-tiny").config
    images, ids = _clip_step.synthetic_inputs(cfg, 16, torch.device("cpu"), seed=3)
    assert images.shape == (16, 3, 32, 32) and ids.shape == (16, 32)
    eos = cfg.text.vocab_size - 1
    ends = ids.argmax(dim=1)
    assert (ids[torch.arange(16), ends] == eos).all() and ((ids == eos).sum(dim=1) == 1).all()
    assert ((ends >= 7) & (ends <= 31)).all()
    after = torch.arange(32)[None] > ends[:, None]
    assert (ids[after] == 0).all() and (ids[~after] > 0).all()


def test_contrastive_step_reads_open_clip_outputs():
    torch.manual_seed(0)
    img, txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1), torch.nn.functional.normalize(
        torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    expected = _clip_step.contrastive_loss(img, txt, scale).loss

    class DictModel(torch.nn.Module):
        def forward(self, images, ids):
            return {"image_features": img, "text_features": txt, "logit_scale": scale}

    class TupleModel(torch.nn.Module):
        def forward(self, images, ids):
            return img, txt, scale

    for model in (DictModel(), TupleModel()):
        loss = _clip_step.ContrastiveStep(model, "open_clip")(None, None)
        torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError):
        _clip_step.ContrastiveStep(DictModel(), "other")


# ------------------------------------------------------------------------------ gpu_input's GPU path, on the CPU
def _pil_decode(data: torch.Tensor, mode=None) -> torch.Tensor:
    image = Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # [3, H, W] uint8


def _pil_decode_batch(data: list[torch.Tensor], mode=None, device=None) -> list[torch.Tensor]:
    return [_pil_decode(d).to(device) for d in data]


def test_gpu_decoder_matches_cpu_transform():
    """The GPU path's decode + crop + resize + normalise, run on the CPU with stand-in decoders, gives what the
    CPU transform gives (up to the filter implementations)."""
    from vlkit.data.transforms import ImageTransform

    rng = np.random.default_rng(0)
    pixels = (rng.random((60, 90, 3)) * 255).astype(np.uint8)
    pixels = np.cumsum(pixels, axis=1).astype(np.uint8) // 2 + 60  # some structure, not pure noise
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    png = buf.getvalue()
    decoder = gpu_input.GpuDecoder(torch.device("cpu"), 32, decode_jpeg=_pil_decode_batch, decode_image=_pil_decode)
    out = decoder([data, png])
    ref = ImageTransform(32, draft=False)
    expected = ref.normalize(torch.stack([ref(data), ref(png)]))
    assert out.shape == expected.shape == (2, 3, 32, 32)
    assert (out - expected).abs().mean() < 0.05  # normalised units: about 3 grey levels of 255
    assert decoder.cpu_decoded == 1 and decoder.decoded == 2


def test_gpu_figures_with_stand_in_decoder(synth):
    args = Namespace(limit=48, batch_size=16, gpu_workers=0, repeats=1, image_size=32)
    decoder = gpu_input.GpuDecoder(torch.device("cpu"), 32, decode_jpeg=_pil_decode_batch, decode_image=_pil_decode)
    figures = gpu_input.gpu_figures(synth, torch.device("cpu"), args, decoder=decoder)
    assert figures["pipeline_images_per_s"] > 0 and figures["decode_only_images_per_s"] > 0
    assert figures["cpu_decoded_share"] == 1.0  # the synthetic images are PNG
    assert gpu_input.parse_workers(["0", "all", "0"]) == [0, gpu_input.cpu_count()]


# ------------------------------------------------------------------------------ adapters
def test_data_loading_adapter():
    rows = _results.rows_for(EXAMPLES["data_loading"])
    assert by_figure(rows, "ingest").vlkit == 850.2
    r = by_figure(rows, "224 px, draft decode, 0 workers")
    assert (r.vlkit, r.reference, r.ratio) == (310.0, 280.0, 1.09)  # the benchmark's paired-pass ratio
    assert by_figure(rows, "full decode, 2 workers").ratio == 0.81


def test_train_step_adapter():
    rows = _results.rows_for(EXAMPLES["train_step"])
    assert len(rows) == 3
    r = by_figure(rows, "train samples/s, bf16, captions")
    assert (r.vlkit, r.reference, r.ratio) == (12.0, 8.0, 1.5)
    assert by_figure(rows, "peak RSS").ratio == 0.8


def test_search_adapter():
    rows = _results.rows_for(EXAMPLES["search"])
    assert by_figure(rows, "embedding").vlkit == 95.5
    recall = by_figure(rows, "ivf_sq recall@10")
    assert (recall.vlkit, recall.reference, recall.ratio) == (0.95, 1.0, 0.95)
    latency = by_figure(rows, "ivf_sq p50")
    assert (latency.vlkit, latency.reference, latency.ratio) == (2.0, 8.0, 0.25)
    assert by_figure(rows, "exact search p50").reference is None


def test_quality_adapter():
    rows = _results.rows_for(EXAMPLES["quality_flickr8k"])
    assert len(rows) == 2
    r = by_figure(rows, "text->image R@1")
    assert (r.vlkit, r.reference, r.ratio) == (30.0, 20.0, 1.5)
    assert by_figure(rows, "image->text R@1").ratio == 1.4


def test_gpu_train_adapter():
    rows = _results.rows_for(EXAMPLES["gpu_train"])
    r = by_figure(rows, "train samples/s")
    assert (r.vlkit, r.reference, r.ratio) == (1500.0, 1200.0, 1.25) and "vs open_clip" in r.figure
    mfu = by_figure(rows, "MFU")
    assert (mfu.vlkit, mfu.reference, mfu.ratio) == (42.0, 33.6, 1.25)
    assert by_figure(rows, "peak memory").ratio == 0.75
    assert by_figure(rows, "max batch").ratio == round(2048 / 1536, 3)


def test_gpu_train_adapter_on_smoke_output(gpu_train_smoke):
    rows = _results.rows_for(gpu_train_smoke)
    r = by_figure(rows, "train samples/s")
    assert r.vlkit == gpu_train_smoke["samples_per_s"] > 0
    if not HAS_OPEN_CLIP:
        assert r.reference is None and r.ratio is None and "open_clip: not available" in r.figure


def test_gpu_input_adapter():
    rows = _results.rows_for(EXAMPLES["gpu_input"])
    assert by_figure(rows, "16 workers").vlkit == 1600.0
    r = by_figure(rows, "GPU decode pipeline images")
    assert (r.vlkit, r.reference, r.ratio) == (4000.0, 1600.0, 2.5)
    assert by_figure(rows, "utilisation").vlkit == 35.0


def test_generic_adapter_and_formatting():
    rows = _results.rows_for({"bench": "new_thing", "machine": M, "items_per_s": 12.5, "label": "x", "flag": True})
    assert [(r.figure, r.vlkit) for r in rows] == [("items_per_s", 12.5)]
    assert [_results.format_value(v) for v in (None, 12345.6, 123.45, 1.23456, 2048, "skipped")] == \
        ["-", "12,346", "123.5", "1.235", "2,048", "skipped"]


# ------------------------------------------------------------------------------ run_all
def test_discover_lists_the_benchmarks():
    names = run_all.discover()
    assert {"data_loading", "train_step", "search", "quality_flickr8k", "gpu_train", "gpu_input"} <= set(names)
    assert "run_all" not in names and not any(n.startswith("_") for n in names)
    assert run_all.spec_for("gpu_new").needs_cuda and not run_all.spec_for("cpu_new").needs_cuda


def test_run_all_from_json_builds_the_table(tmp_path):
    lines = tmp_path / "lines.txt"
    text = ["some benchmark output", "| a | table |"]
    text += [json.dumps(v) for v in EXAMPLES.values()]
    text += ["not json {", json.dumps({**EXAMPLES["quality_flickr8k"], "epochs": 30})]  # a later line wins
    lines.write_text("\n".join(text) + "\n")
    md, js = tmp_path / "results.md", tmp_path / "results.json"
    rows = run_all.main(["--from-json", str(lines), "--out-md", str(md), "--out-json", str(js)])

    expected = sum(len(_results.rows_for(v)) for v in EXAMPLES.values())
    assert len(rows) == expected
    assert [r.bench for r in rows][0] == "data_loading" and rows[-1].bench == "gpu_input"
    for r in rows:
        if isinstance(r.vlkit, float) and isinstance(r.reference, float) and r.bench != "data_loading":
            assert r.ratio == round(r.vlkit / r.reference, 3)
    assert "quickstart 30 epochs" in by_figure(rows, "text->image R@1").figure

    table = md.read_text()
    assert "| figure | vlkit | reference | ratio | machine |" in table
    assert "| gpu_train: train samples/s, clip-vit-b-16, batch 256, bf16 (vs open_clip) | 1,500 | 1,200 | 1.25x " \
           "| NVIDIA H200 |" in table
    assert "| search: ivf_sq p50 ms, 10,000 vectors (vs exact search; lower is better) | 2 | 8 | 0.25x |" in table
    saved = json.loads(js.read_text())
    assert set(saved["results"]) == set(EXAMPLES) and len(saved["rows"]) == expected

    # results.json itself rebuilds the same table
    again = run_all.main(["--from-json", str(js), "--out-md", str(tmp_path / "b.md"),
                          "--out-json", str(tmp_path / "b.json")])
    assert again == rows


def test_run_all_only_skips_gpu_benchmarks_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "cuda_available", lambda: False)
    md, js = tmp_path / "results.md", tmp_path / "results.json"
    js.write_text(json.dumps({"results": {"search": EXAMPLES["search"]}, "status": {"search": "ok"}}))
    rows = run_all.main(["--only", "gpu_train", "gpu_input", "--merge", "--quiet",
                         "--out-md", str(md), "--out-json", str(js)])
    skipped = [r for r in rows if r.vlkit == "skipped: no CUDA"]
    assert [r.bench for r in skipped] == ["gpu_train", "gpu_input"]
    assert any(r.bench == "search" for r in rows)  # merged from the earlier results
    assert "skipped: no CUDA" in md.read_text()
    assert json.loads(js.read_text())["status"]["gpu_train"] == "skipped: no CUDA"
    with pytest.raises(SystemExit):
        run_all.main(["--only", "no_such_bench", "--out-md", str(md), "--out-json", str(js)])
