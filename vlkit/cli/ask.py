"""``vlkit ask``: answer a question about an image with a model trained on VQA (an answer head) or with a
generative model (the answer written after the prompt ``question: ... answer:``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``ask`` subcommand to ``sub``."""
    p = sub.add_parser(
        "ask",
        help="answer a question about an image (a model trained with a vqa task, or a generative model)",
        description="Print the top answers for IMAGE and QUESTION, with their probabilities. A fusion model "
        "with an answer head (albef-*, vlmo-*, vilt-*) ranks its answer vocabulary (softmax over it). A generative "
        "model (coca-*, captioner-*, blip-*, blip2-* at stage 2) writes the answer after the prompt "
        "'question: QUESTION answer:' by beam "
        "search with --top beams (greedy for --top 1); each answer's probability is the model's probability "
        "of its whole token sequence, end token included (exp of the summed log-probabilities, not normalised "
        "over the answers shown).",
    )
    p.add_argument("run", help="run directory, model directory or checkpoint")
    p.add_argument("image", help="an image file")
    p.add_argument("question", help="the question, e.g. 'what colour is the circle?'")
    p.add_argument("--top", type=int, default=5, help="answers to print (default 5)")
    p.add_argument("--prompt", metavar="TEMPLATE",
                   help="generative models: the answer prompt, with {question} where the question goes "
                   "(default: 'question: {question} answer:')")
    p.add_argument("--max-new-tokens", type=int, default=10, metavar="N",
                   help="generative models: most tokens per answer (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def generated_answers(loaded, pixels, question: str, top: int, prompt: str | None = None,
                      max_new_tokens: int = 10) -> list[tuple[str, float]]:
    """The ``top`` answers a generative model writes for ``question`` about ``pixels`` ``[1, 3, S, S]``, with
    their probabilities: ``exp`` of the summed log-probabilities of the answer's tokens and its end token
    (beam search with ``top`` beams and no length normalisation; greedy for ``top == 1``)."""
    import math

    from vlkit.inference.captions import write_captions
    from vlkit.tasks.vqa import answer_settings, vqa_prompts

    settings = {**answer_settings(top, max_new_tokens), "num_return_sequences": top, "length_penalty": 0.0}
    written = write_captions(loaded.model, loaded.tokenizer, pixels, vqa_prompts([question], prompt), **settings)
    return [(text, math.exp(score)) for text, score in written[0]]


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit ask``."""
    import torch

    from vlkit.errors import VlkitError
    from vlkit.inference.interface import is_generative
    from vlkit.inference.loading import load_for_inference
    from vlkit.cli.caption import decode_images, read_images
    from vlkit.tasks.vqa import model_answers

    if not args.question.strip():
        raise VlkitError("the question is empty")
    if args.top < 1:
        raise VlkitError(f"--top must be at least 1, got {args.top}")
    path = Path(args.image)
    if not path.is_file():
        raise VlkitError(f"{path}: no such image file")
    if args.max_new_tokens < 1:
        raise VlkitError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    data = read_images([str(path)])[0]  # one clear line for a file that is not an image or over the pixel limit
    loaded = load_for_inference(args.run)
    transform = loaded.model.preprocess.image_transform(train=False)
    pixels = transform.normalize(decode_images([data], [str(path)], transform)[0][None])  # [1, 3, S, S], one decode
    if is_generative(loaded.model):
        prompt = args.prompt if args.prompt is not None else loaded.generation.vqa_prompt  # the trained template
        answers = generated_answers(loaded, pixels, args.question, args.top, prompt, args.max_new_tokens)
        how = "generated"
    else:
        if args.prompt is not None:
            raise VlkitError("--prompt applies to generative models only; this model ranks its answer vocabulary")
        vocab = model_answers(loaded.model)
        tokens = loaded.tokenizer([args.question.strip()])
        with torch.no_grad():
            logits = loaded.model(pixels, tokens["input_ids"], tokens["attention_mask"], head="answer")[0]
        probs = logits.float().softmax(dim=-1)
        top = probs.topk(min(args.top, len(vocab)))
        answers = [(vocab.answers[i], float(p)) for p, i in zip(top.values, top.indices.tolist())]
        how = "answer head"
    if args.json:
        print(json.dumps({"image": str(path), "question": args.question, "answered_by": how,
                          "answers": [{"answer": a, "probability": p} for a, p in answers]}))
        return 0
    print(f"Q: {args.question}")
    for answer, p in answers:
        print(f"  {p:6.1%}  {answer}")
    return 0
