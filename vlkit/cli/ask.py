"""``vlkit ask``: answer a question about an image with a model trained on VQA."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``ask`` subcommand to ``sub``."""
    p = sub.add_parser(
        "ask",
        help="answer a question about an image (a model trained with a vqa task)",
        description="Print the top answers of a VQA-trained fusion model (albef-*, vilt-*) for IMAGE and "
        "QUESTION, with their probabilities (softmax over the answer vocabulary).",
    )
    p.add_argument("run", help="run directory, model directory or checkpoint")
    p.add_argument("image", help="an image file")
    p.add_argument("question", help="the question, e.g. 'what colour is the circle?'")
    p.add_argument("--top", type=int, default=5, help="answers to print (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit ask``."""
    import torch

    from vlkit.errors import VlkitError
    from vlkit.search.loading import load_for_inference
    from vlkit.search.searcher import decode_image
    from vlkit.tasks.vqa import model_answers

    if not args.question.strip():
        raise VlkitError("the question is empty")
    if args.top < 1:
        raise VlkitError(f"--top must be at least 1, got {args.top}")
    path = Path(args.image)
    if not path.is_file():
        raise VlkitError(f"{path}: no such image file")
    data = path.read_bytes()
    try:
        decode_image(data)  # one clear line for a file that is not an image or is over the pixel limit
    except VlkitError as exc:
        raise VlkitError(f"{path}: {exc}") from None
    loaded = load_for_inference(args.run)
    vocab = model_answers(loaded.model)
    transform = loaded.model.preprocess.image_transform(train=False)
    tokens = loaded.tokenizer([args.question.strip()])
    with torch.no_grad():
        logits = loaded.model(transform.normalize(transform(data)[None]), tokens["input_ids"],
                              tokens["attention_mask"], head="answer")[0]
    probs = logits.float().softmax(dim=-1)
    top = probs.topk(min(args.top, len(vocab)))
    answers = [(vocab.answers[i], float(p)) for p, i in zip(top.values, top.indices.tolist())]
    if args.json:
        print(json.dumps({"image": str(path), "question": args.question,
                          "answers": [{"answer": a, "probability": p} for a, p in answers]}))
        return 0
    print(f"Q: {args.question}")
    for answer, p in answers:
        print(f"  {p:6.1%}  {answer}")
    return 0
