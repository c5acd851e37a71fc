"""``qlip vlm train | chat | shapes-qa | tiny-llm`` (picked up by qlip/cli.py's DOWNSTREAM_AREAS)."""
from __future__ import annotations


from ..train.cli import add_train_arguments, train_command


def register(sub) -> None:
    p = sub.add_parser("vlm", help="a LLaVA-style vision-language model on QLIP's encoder (docs/vlm.md)")
    vs = p.add_subparsers(dest="vlm_cmd", required=True)

    t = vs.add_parser("train", help="train a VLM from a recipe (task: vlm; stage 1 or 2)")
    add_train_arguments(t, "YAML recipe with task: vlm", "train.stage=2 optim.lr=2e-5")
    t.set_defaults(func=_train)

    c = vs.add_parser("chat", help="answer a prompt about an image with a saved VLM")
    c.add_argument("--model", required=True, help="a saved VLM folder (a run's OUT/final)")
    c.add_argument("--image", required=True, help="image file")
    c.add_argument("--prompt", required=True, help='e.g. "What color is the shape?"')
    c.add_argument("--max-new-tokens", type=int, default=32)
    c.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    c.add_argument("--temperature", type=float, default=1.0)
    c.add_argument("--top-k", type=int, default=None)
    c.add_argument("--top-p", type=float, default=None)
    c.add_argument("--seed", type=int, default=0, help="seed of --sample")
    c.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    c.set_defaults(func=_chat)

    q = vs.add_parser("shapes-qa", help="write shapes question-answer data in LLaVA's JSON format")
    q.add_argument("--out", required=True)
    q.add_argument("--n", type=int, default=1000, help="images")
    q.add_argument("--split", default="train", choices=["train", "heldout"])
    q.add_argument("--size", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--multi-turn", action="store_true", help="all of an image's questions in one conversation")
    q.set_defaults(func=_shapes_qa)

    m = vs.add_parser("tiny-llm", help="save a tiny random Llama + byte-level BPE tokenizer (offline) to a folder")
    m.add_argument("--out", required=True)
    m.add_argument("--texts", default=None, help="LLaVA JSON whose conversations train the BPE merges")
    m.add_argument("--merges-on", default="rendered", choices=["rendered", "turns"],
                   help="rendered (default): the conversations as the model reads them, template included, so "
                        "they stay short; turns: the turns' texts only")
    m.add_argument("--vocab-size", type=int, default=512)
    m.add_argument("--hidden-size", type=int, default=64)
    m.add_argument("--layers", type=int, default=2)
    m.set_defaults(func=_tiny_llm)


def _train(args) -> int:
    return train_command(args, task="vlm")


def _chat(args) -> int:
    import torch
    from .chat import generate
    from .model import load
    model = load(args.model, device=args.device)
    torch.manual_seed(args.seed)
    print(generate(model, args.image, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p))
    return 0


def _shapes_qa(args) -> int:
    from ..data.shapes_qa import write_shapes_qa
    print(write_shapes_qa(args.out, args.n, split=args.split, size=args.size, seed=args.seed,
                          multi_turn=args.multi_turn))
    return 0


def _tiny_llm(args) -> int:
    from .tiny import build_tiny_llm
    texts = None
    if args.texts:
        from .data import read_llava_json
        from .tiny import merge_texts
        texts = merge_texts(read_llava_json(args.texts), args.merges_on)
    print(build_tiny_llm(args.out, texts, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                         layers=args.layers))
    return 0
