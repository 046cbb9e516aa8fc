"""``vlkit caption``: write captions for image files with a model that has a text decoder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_BEAMS = 3


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``caption`` subcommand to ``sub``."""
    p = sub.add_parser(
        "caption",
        help="write captions for images (a model with a text decoder: coca-*, captioner-*, blip-*, "
        "blip2-* at stage 2)",
        description="Write captions for each IMAGE with a generative model: beam search (the default, "
        f"{DEFAULT_BEAMS} beams), greedy decoding (--beams 1) or sampling (--sample, with --temperature, "
        "--top-k, --top-p and --seed). Each caption is printed with its score: the log-probability of its "
        "tokens (the end token included), divided by its length under beam search, summed otherwise.",
    )
    p.add_argument("run", help="run directory, model directory or checkpoint of a generative model")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--beams", type=int, metavar="N",
                   help="beam search width; 1 is greedy decoding (default: what the model was trained to use, "
                   f"saved in its generation.json, else {DEFAULT_BEAMS}; 1 with --sample)")
    p.add_argument("--sample", action="store_true", help="sample each token instead of searching (needs --beams 1)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature (default 1)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample among the most likely tokens whose probabilities add up to P (default 1: all)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the sampling, so that a run can be repeated")
    p.add_argument("--num-captions", type=int, default=1, metavar="N",
                   help="captions per image: the N best beams, or N samples (default 1)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="most tokens per caption (default: the model's, else 30)")
    p.add_argument("--no-repeat-ngram", type=int, metavar="N",
                   help="never repeat an N-gram within a caption (0: allow; default: the model's)")
    p.add_argument("--prompt", metavar="TEXT",
                   help="a prefix every caption continues, e.g. 'a picture of' (not printed with the caption; "
                   "default: the prompt the model was trained with)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images decoded together (default 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def settings_of(args: argparse.Namespace) -> dict:
    """The :func:`vlkit.inference.generate.generate` options the arguments ask for, checked.

    Raises:
        VlkitError: a value out of range, or sampling with beams.
    """
    from vlkit.errors import VlkitError

    if args.sample and args.beams is not None and args.beams > 1:
        raise VlkitError(f"--sample draws one token at a time and cannot be combined with --beams {args.beams}; "
                         "use --sample alone (or --beams 1), or beam search without --sample")
    beams = args.beams if args.beams is not None else (1 if args.sample else None)  # None: the model's
    for name, value in (("--beams", beams), ("--num-captions", args.num_captions),
                        ("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise VlkitError(f"{name} must be at least 1, got {value}")
    if args.no_repeat_ngram is not None and args.no_repeat_ngram < 0:
        raise VlkitError(f"--no-repeat-ngram must be at least 0, got {args.no_repeat_ngram}")
    if not args.sample:
        for name, value, default in (("--temperature", args.temperature, 1.0), ("--top-k", args.top_k, 0),
                                     ("--top-p", args.top_p, 1.0), ("--seed", args.seed, None)):
            if value != default:
                raise VlkitError(f"{name} applies to sampling only: add --sample")
        if beams is not None and args.num_captions > beams:
            raise VlkitError(f"--num-captions {args.num_captions} needs at least as many beams (--beams "
                             f"{args.num_captions}) or --sample")
    elif not 0 < args.temperature < float("inf"):
        raise VlkitError(f"--temperature must be a positive number, got {args.temperature}")
    elif args.top_k < 0 or not 0 < args.top_p <= 1:
        raise VlkitError("--top-k must be 0 or more and --top-p in (0, 1]")
    return {"num_beams": beams, "do_sample": args.sample, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "num_return_sequences": args.num_captions, "max_new_tokens": args.max_new_tokens,
            "no_repeat_ngram_size": args.no_repeat_ngram}


def read_images(paths: list[str]) -> list[bytes]:
    """The bytes of each image file, each checked from its header (exists, is an image, within the pixel limit)
    before any model is loaded; the pixels are decoded once, later, by :func:`decode_images`.

    Raises:
        VlkitError: one line naming the first bad file and why.
    """
    from vlkit.errors import VlkitError
    from vlkit.search.searcher import check_image

    out = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise VlkitError(f"{path}: no such image file")
        data = path.read_bytes()
        try:
            check_image(data)  # not an image, or over the pixel limit: one clear line
        except VlkitError as exc:
            raise VlkitError(f"{path}: {exc}") from None
        out.append(data)
    return out


def decode_images(images: list[bytes], names: list[str], transform) -> list:
    """Each image decoded once and transformed for the model (uint8 ``[3, S, S]``), all of them before any
    caption is written, so a file whose body does not decode is named before any work.

    Raises:
        VlkitError: one line naming the first file that does not decode.
    """
    from vlkit.data.decode import ImageDecodeError
    from vlkit.errors import VlkitError

    out = []
    for name, data in zip(names, images):
        try:
            out.append(transform(data))
        except (VlkitError, ImageDecodeError) as exc:
            raise VlkitError(f"{name}: not a readable image: {exc}") from None
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit caption``."""
    import torch

    from vlkit.errors import VlkitError
    from vlkit.inference.captions import write_captions
    from vlkit.inference.interface import require_generative
    from vlkit.inference.loading import load_for_inference

    settings = settings_of(args)
    images = read_images(args.images)
    loaded = load_for_inference(args.run)
    model = require_generative(loaded.model)
    settings = loaded.generation.settings(**settings)  # the model's own defaults where none are given
    if not args.sample and settings["num_return_sequences"] > settings["num_beams"]:
        raise VlkitError(f"--num-captions {args.num_captions} needs at least as many beams (the model decodes with "
                         f"{settings['num_beams']}; pass --beams {args.num_captions}) or --sample")
    prompt = args.prompt if args.prompt is not None else loaded.generation.prompt
    transform = model.preprocess.image_transform(train=False)
    decoded = decode_images(images, args.images, transform)
    generator = None
    if args.seed is not None:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(args.seed)
    written: list[list[tuple[str, float]]] = []
    for start in range(0, len(images), args.batch_size):
        pixels = transform.normalize(torch.stack(decoded[start:start + args.batch_size]))  # [batch, 3, S, S]
        written += write_captions(model, loaded.tokenizer, pixels, prompt, generator=generator, **settings)
    if args.json:
        print(json.dumps({"model": str(loaded.source), "model_tag": loaded.tag, "prompt": prompt,
                          "settings": {k: v for k, v in settings.items() if k != "min_new_tokens"},
                          "seed": args.seed,
                          "images": [{"image": name, "captions": [{"caption": c, "score": s} for c, s in caps]}
                                     for name, caps in zip(args.images, written)]}))
        return 0
    for name, caps in zip(args.images, written):
        print(name)
        for caption, score in caps:
            print(f"  {score:8.3f}  {caption}")
    return 0
