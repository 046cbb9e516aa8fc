"""``vlkit explain``: where an image matches a text, and which words count."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``explain`` subcommand to ``sub``."""
    p = sub.add_parser(
        "explain",
        help="a heat map of where an image matches a text, and the weight of each word",
        description="Explain why IMAGE matches TEXT under a two-tower model: a heat map of what raises their "
        "cosine similarity (Grad-CAM on the last feature map of a CNN tower; gradient x activation of the patch "
        "tokens entering the last block of a ViT tower), laid over the image and written to --out, and the "
        "contribution of each word (gradient x input on the token embeddings), printed.",
    )
    p.add_argument("run", help="run directory, model directory or checkpoint of a two-tower model")
    p.add_argument("image", help="an image file")
    p.add_argument("text", help="the text to explain the match with")
    p.add_argument("--out", required=True, metavar="PNG", help="the heat map over the image (.png)")
    p.add_argument("--size", type=int, default=256, metavar="PX",
                   help="side of the written picture (default 256)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit explain``."""
    from vlkit.cli.caption import decode_images, read_images
    from vlkit.errors import VlkitError
    from vlkit.explain.figures import check_figure_path, overlay, save_figure, to_image
    from vlkit.explain.gradcam import explain
    from vlkit.inference.embed import require_embeddings
    from vlkit.inference.loading import load_for_inference

    if not args.text.strip():
        raise VlkitError("TEXT must have at least one non-blank character")
    if not 16 <= args.size <= 2048:
        raise VlkitError(f"--size must be from 16 to 2048 pixels, got {args.size}")
    out = check_figure_path(args.out, inputs=[args.run, args.image])
    data = read_images([args.image])
    loaded = load_for_inference(args.run)
    model = loaded.model
    require_embeddings(model, "vlkit explain")
    transform = model.preprocess.image_transform(train=False)
    pixels = decode_images(data, [args.image], transform)[0]  # uint8 [3, S, S]
    result = explain(model, loaded.tokenizer, transform.normalize(pixels[None]), args.text)
    picture = to_image(pixels.float() / 255).resize((args.size, args.size))
    save_figure(overlay(picture, result.heat.numpy()), out, "explain")
    if args.json:
        print(json.dumps({"model": str(loaded.source), "model_tag": loaded.tag, "image": args.image,
                          "text": args.text, "score": result.score, "method": result.method, "out": str(out),
                          "words": [{"token": w.token, "weight": w.weight} for w in result.words]}))
        return 0
    print(f"similarity {result.score:.4f} ({result.method})")
    for w in result.words:
        print(f"  {w.weight:+.4f}  {w.token}")
    print(f"wrote {out}")
    return 0
