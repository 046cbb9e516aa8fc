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
        "contribution of each word (gradient x input on the token embeddings), printed. A fusion model with an "
        "image-text matching head over cross-attention (albef-*, blip-*) is explained by its ITM score instead, "
        "as LAVIS shows: one cross-attention layer's attention from each word to the image patches times its "
        "gradient (negative part cut), averaged over the heads; --out gets the mean over the words and "
        "--per-word a grid with one map per word.",
    )
    p.add_argument("run", help="run directory, model directory or checkpoint of a two-tower or fusion model")
    p.add_argument("image", help="an image file")
    p.add_argument("text", help="the text to explain the match with")
    p.add_argument("--out", required=True, metavar="PNG", help="the heat map over the image (.png)")
    p.add_argument("--size", type=int, default=256, metavar="PX",
                   help="side of the written picture (default 256)")
    p.add_argument("--score", choices=("auto", "itm", "similarity"), default="auto",
                   help="what the map explains: the ITM score (fusion models) or the embeddings' cosine similarity "
                   "(two-tower models, and ALBEF/BLIP's contrastive towers); auto: ITM where the model has it")
    p.add_argument("--per-word", metavar="PNG", default=None,
                   help="fusion models: also write a grid of the whole text's map and one map per word (.png)")
    p.add_argument("--layer", type=int, default=None, metavar="N",
                   help="fusion models: the cross-attention layer to read, from 0 (default: the middle one, never "
                   "the last, whose words have no gradient)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit explain``."""
    from vlkit.cli.caption import decode_images, read_images
    from vlkit.errors import VlkitError
    from vlkit.explain.figures import check_figure_path, overlay, overlay_grid, save_figure, to_image
    from vlkit.explain.gradcam import explain
    from vlkit.explain.itm_cam import can_explain_matching, check_layer, explain_matching
    from vlkit.inference.embed import can_embed
    from vlkit.inference.loading import load_for_inference

    if not args.text.strip():
        raise VlkitError("TEXT must have at least one non-blank character")
    if not 16 <= args.size <= 2048:
        raise VlkitError(f"--size must be from 16 to 2048 pixels, got {args.size}")
    if args.layer is not None and args.layer < 0:
        raise VlkitError(f"--layer must be 0 or more, got {args.layer}")
    out = check_figure_path(args.out, inputs=[args.run, args.image])
    per_word = None
    if args.per_word is not None:
        per_word = check_figure_path(args.per_word, inputs=[args.run, args.image], what="--per-word")
        if per_word.resolve() == out.resolve():
            raise VlkitError(f"--per-word {per_word}: the same file as --out; name another")
    data = read_images([args.image])
    loaded = load_for_inference(args.run)
    model = loaded.model
    name = type(model).__name__
    if args.score == "itm":
        check_layer(model, args.layer)  # one line when the model has no ITM head over cross-attention
    matching = args.score != "similarity" and can_explain_matching(model)
    if not matching:
        if not can_embed(model):
            raise VlkitError(f"vlkit explain needs a two-tower model (image and text embeddings) or a fusion model "
                             f"with an ITM head over cross-attention (albef-*, blip-*); a {name} is neither"
                             if args.score == "auto" else f"--score similarity: a {name} embeds no images and texts")
        if args.per_word is not None or args.layer is not None:
            raise VlkitError("--per-word and --layer read the cross-attention of a fusion model's ITM score "
                             f"(albef-*, blip-*); not with a {name} and --score {args.score}")
    else:
        check_layer(model, args.layer)
    transform = model.preprocess.image_transform(train=False)
    pixels = decode_images(data, [args.image], transform)[0]  # uint8 [3, S, S]
    normalized = transform.normalize(pixels[None])
    if matching:
        result = explain_matching(model, loaded.tokenizer, normalized, args.text, args.layer)
    else:
        result = explain(model, loaded.tokenizer, normalized, args.text)
    picture = to_image(pixels.float() / 255).resize((args.size, args.size))
    save_figure(overlay(picture, result.heat.numpy()), out, "explain")
    if per_word is not None:
        heats = [result.heat.numpy(), *result.word_heats.numpy()]
        labels = ["(all words)", *[token.replace("</w>", "") for token in result.tokens]]
        save_figure(overlay_grid(picture, heats, labels, columns=min(len(heats), 6), cell=args.size),
                    per_word, "explain per word")
    if args.json:
        report = {"model": str(loaded.source), "model_tag": loaded.tag, "image": args.image, "text": args.text,
                  "score": result.score, "method": result.method, "out": str(out),
                  "words": [{"token": w.token, "weight": w.weight} for w in result.words]}
        if matching:
            report.update(layer=result.layer, match_logit=result.match_logit,
                          per_word=str(per_word) if per_word is not None else None)
        print(json.dumps(report))
        return 0
    if matching:
        print(f"ITM match probability {result.score:.4f} ({result.method}, cross-attention layer {result.layer})")
    else:
        print(f"similarity {result.score:.4f} ({result.method})")
    for w in result.words:
        print(f"  {w.weight:+.4f}  {w.token}")
    print(f"wrote {out}" + (f" and {per_word}" if per_word is not None else ""))
    return 0
