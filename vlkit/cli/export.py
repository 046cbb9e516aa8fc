"""``vlkit export``: a trained model's image and text encoders as ONNX files, checked against PyTorch; a CLIP
as a Hugging Face ``CLIPModel`` folder (``--format hf``)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand to ``sub``."""
    p = sub.add_parser(
        "export",
        help="export the image and text encoders (ONNX), checked against PyTorch",
        description="Write RUN's image encoder (pixels -> image_embeds) and text encoder (input_ids, "
        "attention_mask -> text_embeds) as ONNX files with a dynamic batch axis, the tokenizer and export.json "
        "(fingerprint, opset, shapes, preprocessing). The files are run with onnxruntime on random batches and "
        "must match PyTorch to 1e-4, else nothing is written. --format hf writes a CLIP as a Hugging Face CLIPModel "
        "folder instead. --out must be new, empty or an earlier export of the same format.",
    )
    p.add_argument("run", help="run directory, model directory or checkpoint")
    p.add_argument("--format", choices=["onnx", "hf"], default="onnx",
                   help="onnx (default): both encoders as ONNX files; hf: a CLIP as a Hugging Face CLIPModel folder")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or later (default 18)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit export``."""
    from vlkit.export.onnx import EXPORT_KIND, MIN_OPSET, export_onnx, require_onnx
    from vlkit.errors import VlkitError
    from vlkit.utils.fs import check_output_dir

    if args.format == "hf":
        return _run_hf(args)
    if args.opset < MIN_OPSET:
        raise VlkitError(f"--opset {args.opset}: torch's ONNX exporter writes opset {MIN_OPSET} or later")
    check_output_dir(args.out, EXPORT_KIND, inputs=[args.run], what="--out")  # before loading anything
    require_onnx()
    from vlkit.inference.loading import load_for_inference

    loaded = load_for_inference(args.run)
    report = export_onnx(loaded, args.out, args.opset, inputs=[args.run], what="--out")
    print(f"exported {report.model} (model {report.fingerprint}, {report.embed_dim}-d, opset {report.opset}) to "
          f"{args.out}: max abs difference to PyTorch {report.max_abs_diff['image']:.2g} (image), "
          f"{report.max_abs_diff['text']:.2g} (text)")
    return 0


def _run_hf(args: argparse.Namespace) -> int:
    """``--format hf``: ``vlkit.models.clip.convert.export_hf`` on the loaded model (CLIP only)."""
    from vlkit.errors import VlkitError
    from vlkit.utils.fs import check_output_dir

    check_output_dir(args.out, "model", inputs=[args.run], what="--out")  # before loading anything
    from vlkit.models.clip.convert import export_hf
    from vlkit.inference.loading import load_for_inference

    loaded = load_for_inference(args.run)
    arch = getattr(loaded.model, "architecture", type(loaded.model).__name__)
    if arch != "clip":
        raise VlkitError(f"{arch}: --format hf exports CLIP models only (a Hugging Face CLIPModel); "
                         "use --format onnx")
    export_hf(loaded.model, args.out)
    print(f"exported clip (model {loaded.tag}) to {args.out} as a Hugging Face CLIPModel folder")
    return 0
