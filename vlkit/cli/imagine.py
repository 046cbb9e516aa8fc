"""``vlkit imagine``: images a two-tower model imagines for texts."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``imagine`` subcommand to ``sub``."""
    p = sub.add_parser(
        "imagine",
        help="optimise an image until the model embeds it like a text (feature visualisation)",
        description="Imagine an image for each TEXT: a picture in a decorrelated Fourier basis optimised, under "
        "random jitter, scale, rotation and crop at every step, until the frozen image tower embeds it close to "
        "the text's embedding (computed once). Several texts give a grid, each labelled. --neuron C also raises "
        "channel C of the image tower's last feature map. The similarity each image reached is printed. With the "
        "quickstart model a 224 px image takes well under a minute on 2 CPU cores (bench/imagine.py).",
    )
    p.add_argument("run", help="run directory, model directory or checkpoint of a two-tower model")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="what to imagine")
    p.add_argument("--out", required=True, metavar="PNG", help="the picture to write (.png)")
    p.add_argument("--steps", type=int, default=128, metavar="N", help="optimisation steps (default 128)")
    p.add_argument("--size", type=int, metavar="PX", help="side of the image (default: the model's input size)")
    p.add_argument("--neuron", type=int, metavar="C", help="also maximise channel C of the last feature map")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default 0)")
    p.add_argument("--copies", type=int, default=4, metavar="N",
                   help="augmented copies embedded at each step, as one batch (default 4; fewer is faster)")
    p.add_argument("--work-size", type=int, metavar="PX",
                   help="side the copies are embedded at (default: the model's input size; smaller is faster, "
                   "CNN towers only)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 autocast where the hardware computes bf16 natively, else fp32")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: the cores the load average leaves idle, at least 1: a thread sharing "
                   "its core with another job stalls the others)")
    p.add_argument("--plain", action="store_true",
                   help="no channels-last convolutions and no batch norms folded into them (slower)")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of the Fourier coefficients (default 0.05)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit imagine``."""
    from vlkit.errors import VlkitError
    from vlkit.explain.figures import check_figure_path, grid, save_figure, to_image
    from vlkit.explain.imagine import ImagineSettings, embed_texts, idle_cores, imagine, pixel_normalizer
    from vlkit.inference.embed import require_embeddings
    from vlkit.inference.loading import load_for_inference

    texts = [t.strip() for t in args.texts]
    if any(not t for t in texts):
        raise VlkitError("every TEXT must have at least one non-blank character")
    settings = ImagineSettings(steps=args.steps, size=args.size, lr=args.lr, neuron=args.neuron, seed=args.seed,
                              copies=args.copies, work_size=args.work_size, precision=args.precision,
                              fast=not args.plain)
    settings.check()
    if not 0 < args.lr < float("inf"):
        raise VlkitError(f"--lr must be a positive number, got {args.lr}")
    if args.threads is not None and args.threads < 1:
        raise VlkitError(f"--threads must be at least 1, got {args.threads}")
    out = check_figure_path(args.out, inputs=[args.run])
    threads = args.threads or idle_cores()  # read before the model's loading adds to the load
    import torch

    torch.set_num_threads(threads)
    loaded = load_for_inference(args.run)
    model = loaded.model
    require_embeddings(model, "vlkit imagine")
    transform = model.preprocess.image_transform(train=False)
    normalize = pixel_normalizer(transform.mean, transform.std)
    targets = embed_texts(model, loaded.tokenizer, texts)
    pictures = []
    for text, target in zip(texts, targets):
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=settings.steps, desc=text[:30], unit="step", dynamic_ncols=True)

        def step(n: int, similarity: float, bar=bar) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(cos=f"{similarity:.3f}")

        image = imagine(model, target, settings, image_size=transform.image_size, normalize=normalize,
                        progress=step)
        if bar is not None:
            bar.close()
        pictures.append(image)
    import torch.nn.functional as F

    with torch.no_grad():
        resized = [F.interpolate(p[None], size=(transform.image_size,) * 2, mode="bilinear",
                                 align_corners=False) for p in pictures]
        reached = F.cosine_similarity(model.encode_image(normalize(torch.cat(resized))).float(), targets, dim=-1)
    images = [to_image(p) for p in pictures]
    figure = images[0] if len(images) == 1 else grid(images, texts, columns=min(len(images), 4))
    save_figure(figure, out, "imagine")
    for text, sim in zip(texts, reached.tolist()):
        print(f"{sim:7.3f}  {text}")
    print(f"wrote {out}")
    return 0
