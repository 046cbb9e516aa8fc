"""``vlkit export``: a trained model's image and text encoders as ONNX files, checked against PyTorch."""

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
        "must match PyTorch to 1e-4, else nothing is written. --out must be new, empty or an earlier export.",
    )
    p.add_argument("run", help="run directory, model directory or checkpoint")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default onnx)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or later (default 18)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit export``."""
    from vlkit.export.onnx import EXPORT_KIND, MIN_OPSET, export_onnx, require_onnx
    from vlkit.errors import VlkitError
    from vlkit.utils.fs import check_output_dir

    if args.opset < MIN_OPSET:
        raise VlkitError(f"--opset {args.opset}: torch's ONNX exporter writes opset {MIN_OPSET} or later")
    check_output_dir(args.out, EXPORT_KIND, inputs=[args.run], what="--out")  # before loading anything
    require_onnx()
    from vlkit.search.loading import load_for_inference

    loaded = load_for_inference(args.run)
    report = export_onnx(loaded, args.out, args.opset, inputs=[args.run], what="--out")
    print(f"exported {report.model} (model {report.fingerprint}, {report.embed_dim}-d, opset {report.opset}) to "
          f"{args.out}: max abs difference to PyTorch {report.max_abs_diff['image']:.2g} (image), "
          f"{report.max_abs_diff['text']:.2g} (text)")
    return 0
