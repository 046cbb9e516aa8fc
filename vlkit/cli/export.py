"""``vlkit export``: a trained model's image and text encoders as ONNX or TorchScript files, or a CLIP as a
Hugging Face ``CLIPModel`` folder (``--format hf``); each checked against PyTorch and written with a model card."""

from __future__ import annotations

import argparse

FORMATS = ("onnx", "torchscript", "hf")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand to ``sub``."""
    p = sub.add_parser(
        "export",
        help="export the image and text encoders (ONNX, TorchScript) or a CLIP for transformers, checked "
        "against PyTorch",
        description="Write RUN's image encoder (pixels -> image_embeds) and text encoder (input_ids, "
        "attention_mask -> text_embeds) as ONNX files (--format onnx, run by onnxruntime) or TorchScript files "
        "(--format torchscript, read by torch.jit.load without vlkit), with a dynamic batch axis, the tokenizer, "
        "export.json (fingerprint, shapes, preprocessing) and a model card (README.md: the run's datasets, "
        "splits and metrics, the architecture, how to load the files). The files are run on random batches of "
        "two sizes and text lengths and must match PyTorch to 1e-4, else nothing is written. --format hf writes "
        "a CLIP as a Hugging Face transformers CLIPModel folder, loaded back with transformers and checked the "
        "same way; the other families map onto no transformers class and are refused. --out must be new, "
        "empty or an earlier vlkit export (for hf: an earlier vlkit model folder).",
    )
    p.add_argument("run", help="run directory, model directory or checkpoint")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx (default): both encoders as ONNX files; torchscript: both encoders as TorchScript "
                   "files; hf: a CLIP as a Hugging Face CLIPModel folder")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--opset", type=int, default=18, help="--format onnx: ONNX opset, 18 or later (default 18)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit export``."""
    from vlkit.errors import VlkitError
    from vlkit.export.onnx import EXPORT_KIND, MIN_OPSET
    from vlkit.utils.fs import check_output_dir

    if args.format == "onnx" and args.opset < MIN_OPSET:
        raise VlkitError(f"--opset {args.opset}: torch's ONNX exporter writes opset {MIN_OPSET} or later")
    kind = "model" if args.format == "hf" else EXPORT_KIND
    check_output_dir(args.out, kind, inputs=[args.run], what="--out")  # before loading anything
    if args.format == "onnx":
        from vlkit.export.onnx import require_onnx

        require_onnx()
    elif args.format == "hf":
        from vlkit.export.hf import require_transformers

        require_transformers()
    from vlkit.inference.loading import load_for_inference

    loaded = load_for_inference(args.run)
    if args.format == "hf":
        from vlkit.export.hf import export_hf_folder

        diffs = export_hf_folder(loaded, args.out, inputs=[args.run], what="--out")
        print(f"exported clip (model {loaded.tag}) to {args.out} as a Hugging Face CLIPModel folder: max abs "
              f"difference to PyTorch {diffs['image']:.2g} (image), {diffs['text']:.2g} (text)")
        return 0
    if args.format == "torchscript":
        from vlkit.export.torchscript import export_torchscript

        report = export_torchscript(loaded, args.out, inputs=[args.run], what="--out")
        detail = f"TorchScript, torch {report.torch_version}"
    else:
        from vlkit.export.onnx import export_onnx

        report = export_onnx(loaded, args.out, args.opset, inputs=[args.run], what="--out")
        detail = f"opset {report.opset}"
    print(f"exported {report.model} (model {report.fingerprint}, {report.embed_dim}-d, {detail}) to "
          f"{args.out}: max abs difference to PyTorch {report.max_abs_diff['image']:.2g} (image), "
          f"{report.max_abs_diff['text']:.2g} (text)")
    return 0
