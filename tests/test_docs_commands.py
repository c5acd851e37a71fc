"""Every command line in README.md and docs/*.md runs, in a cheap form (issue 10: no drift).

A documented command line is any line (``\\``-continuations joined, comments dropped, split at
``&&`` / ``;``) of a non-Python code block that starts with ``qlip``, ``python -m qlip``,
``python -m torch.distributed.run``, ``torchrun``, ``python -c`` or ``python benchmarks/``.
CHEAP maps each one to the command this test runs: the same subcommand, arguments and order, on
tiny generated data (``TINY`` overrides: two steps, batch 4), with the random-init ``qlip-tiny``
preset in place of hub ids and released presets, and ``--help`` only where nothing cheaper exists:

* ``qlip demo`` (every variant): the full demo takes ~14 min and ``--fast`` still trains four
  models for ~2 min and writes 278 MB; the demo's own tests run its pipeline.
* ``torchrun`` on 8 GPUs / 2 nodes and the gloo launch: ``qlip train --help``; the distributed
  path is run by tests/train/test_train_distributed.py.
* ``python benchmarks/*.py``: ``--help`` (they time ViT-B models for minutes by design).
* ``torchrun ... qlip data tokenize``: ``qlip data tokenize --help`` (the single-process run is
  one of the other lines).

The test fails when a documented line has no CHEAP entry (new docs cannot drift unnoticed), when
an entry no longer matches any documented line, and when a cheap form exits non-zero, raises or
prints a traceback. Commands run in-process (``qlip.cli.main``; ``python -c`` and scripts with
``exec`` / ``runpy``) in one shared workspace holding what the docs assume: ``qlip/configs/`` (a
copy), a few images, the tiny shapes data made by the documented ``qlip data shapes`` line, and
``runs/demo/qlip`` (a tiny random model standing in for the demo's output).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import runpy
import shlex
import shutil
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NON_SHELL_BLOCKS = {"python", "py", "yaml", "yml", "json", "toml", "text", "txt"}
COMMAND = re.compile(r"^(qlip( |$)|torchrun |python -m (qlip|torch\.distributed\.run)( |$)|python -c |python benchmarks/)")


# ---- extraction ---------------------------------------------------------------------------------
def _logical_lines(text: str):
    """(line number, line) of the shell-like code blocks, continuations joined."""
    block: Optional[str] = None
    pending, start = "", 0
    for no, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            block = stripped[3:].strip().lower() if block is None else None
            continue
        if block is None or block in NON_SHELL_BLOCKS:
            continue
        if not pending:
            start = no
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        yield start, pending + stripped
        pending = ""


def _segments(line: str) -> List[List[str]]:
    """A shell line -> its simple commands (split at && || ; |), leading VAR=value dropped."""
    words = shlex.split(line, comments=True)
    out, cur = [], []
    for w in words + ["&&"]:
        if w in ("&&", "||", ";", "|"):
            while cur and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cur[0]):
                cur = cur[1:]
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(w)
    return out


def documented_commands() -> Dict[str, str]:
    """Every documented command line (key: shlex.join of its words) -> where it is documented."""
    found: Dict[str, str] = {}
    for path in DOC_FILES:
        for no, line in _logical_lines(path.read_text(encoding="utf-8")):
            for words in _segments(line):
                key = shlex.join(words)
                if COMMAND.match(key):
                    found.setdefault(key, f"{path.relative_to(REPO)}:{no}")
    return found


# ---- the cheap forms ----------------------------------------------------------------------------
class Cheap(NamedTuple):
    cmd: str                                  # what runs (shell words), in the workspace
    needs: Sequence[str] = ()                 # documented lines to run first (their cheap forms)
    setup: Optional[Callable[[pathlib.Path], None]] = None
    check: Optional[Callable[[pathlib.Path, str], None]] = None


TINY = ("data.train='data/shapes/shapes-train-*.tar' data.batch_size=4 data.shuffle_buffer=4 "
        "optim.warmup_steps=1 train.log_every=1 train.progress=false train.tensorboard=false")
RAND = "--model qlip-tiny --random-init"  # for hub ids and released presets
SHAPES_DATA = "qlip data shapes data/shapes --n 20000 --size 64"
ASTRONAUT = shlex.join(["python", "-c", "from skimage import data; from PIL import Image; "
                                      "Image.fromarray(data.astronaut()).save('astronaut.png')"])
TOKENIZE = "qlip tokenize astronaut.png photos/ 'more/*.jpg' --model qlip-b-16-256 --random-init -o ids.npy"
TRAIN_S1 = "qlip train qlip/configs/demo-stage1.yaml --out runs/s1 optim.steps=2000 '[--resume]'"
EVAL_ALL = ("qlip eval all --model runs/demo/qlip --data data/shapes/shapes-heldout-000000.tar "
            "--classnames shapes --report runs/eval")
CONVERT_OURS = "qlip convert --model nvidia/QLIP-B-16-256 -o qlip-b-16-256/"
BALANCE = "qlip balance qlip/configs/demo-stage1.yaml --out runs/balance"
DATA_TOKENIZE = ("qlip data tokenize 'data/shapes/shapes-train-*.tar' --model qlip-demo --random-init --out "
                 "data/shapes-tokens '[--batch-size' '64]' '[--workers' '2]' '[--device' 'cuda]' '[--preprocess' "
                 "'train|model]' '[--overwrite]' '[-q]'")

GEN_TRAIN = ("qlip gen train t2i-demo data.train=data/shapes-tokens text.model=runs/demo/stage1/final "
             "data.tokenizer=runs/demo/stage2/final --out runs/t2i")


def _steps(run: str, n: int):
    def check(ws, out):
        assert json.loads((ws / run / "summary.json").read_text())["steps"] == n  # overrides after --out applied
    return check


def _balanced(ws, out):
    assert (ws / "runs/balance/demo-stage1.balanced.yaml").is_file()
    assert sorted(p.name for p in (ws / "qlip/configs").iterdir()) == sorted(
        p.name for p in (REPO / "qlip/configs").iterdir())  # nothing written beside the recipes


def _two_eval_runs(ws):
    for name in ("eval-a", "eval-b"):
        if not (ws / "runs" / name).exists():
            shutil.copytree(ws / "runs/eval", ws / "runs" / name)


HELP_TRAIN = Cheap("qlip train --help")
CHEAP: Dict[str, Cheap] = {
    # README.md
    "qlip demo": Cheap("qlip demo --help"),
    ASTRONAUT: Cheap(ASTRONAUT),
    TOKENIZE: Cheap(f"qlip tokenize astronaut.png photos/ 'more/*.jpg' {RAND} -o ids.npy", needs=[ASTRONAUT]),
    "qlip detokenize ids.npy --model qlip-b-16-256 --random-init -o recon/": Cheap(
        f"qlip detokenize ids.npy {RAND} -o recon/", needs=[TOKENIZE]),
    "qlip reconstruct astronaut.png --model nvidia/QLIP-B-16-256 -o recon/": Cheap(
        f"qlip reconstruct astronaut.png {RAND} -o recon/", needs=[ASTRONAUT]),
    "qlip zero-shot astronaut.png --labels 'an astronaut,a dog,a cat' --template 'a photo of {}' "
    "--model nvidia/QLIP-B-16-256": Cheap(
        f"qlip zero-shot astronaut.png --labels 'an astronaut,a dog,a cat' --template 'a photo of {{}}' {RAND}",
        needs=[ASTRONAUT]),
    "qlip info qlip-l-14-392 --random-init": Cheap("qlip info qlip-tiny --random-init"),
    CONVERT_OURS: Cheap(f"qlip convert {RAND} -o qlip-b-16-256/"),
    "qlip convert --model qlip-b-16-256/ --to official -o exported/": Cheap(
        "qlip convert --model qlip-b-16-256/ --to official -o exported/", needs=[CONVERT_OURS]),
    SHAPES_DATA: Cheap("qlip data shapes data/shapes --n 32 --size 32 --heldout 32 --shard-size 32 --quiet"),
    TRAIN_S1: Cheap(f"qlip train qlip/configs/demo-stage1.yaml --out runs/s1 optim.steps=2 {TINY}",
                    needs=[SHAPES_DATA], check=_steps("runs/s1", 2)),
    "torchrun --nproc_per_node 8 -m qlip train qlip/configs/qlip-b-8-256-stage1.yaml --out runs/b8": HELP_TRAIN,
    BALANCE: Cheap(f"qlip balance qlip/configs/demo-stage1.yaml --out runs/balance --steps 2 {TINY}",
                   needs=[SHAPES_DATA], check=_balanced),
    EVAL_ALL: Cheap(EVAL_ALL + " --lpips alex-random --fid none -q", needs=[SHAPES_DATA]),  # a random VGG trunk takes ~10 s
    "qlip eval compare runs/eval-a runs/eval-b -o runs/compare": Cheap(
        "qlip eval compare runs/eval-a runs/eval-b -o runs/compare", needs=[EVAL_ALL], setup=_two_eval_runs),
    "qlip data tokenize 'data/shapes/shapes-train-*.tar' --model runs/demo/qlip --out data/shapes-tokens": Cheap(
        "qlip data tokenize 'data/shapes/shapes-train-*.tar' --model runs/demo/qlip --out data/readme-tokens -q",
        needs=[SHAPES_DATA]),
    # docs/data.md
    "qlip data shapes data/shapes --n 20000 --size 64 --seed 0 '[--heldout' '320]' '[--shard-size' '1000]' "
    "'[--overwrite]'": Cheap("qlip data shapes data/shapes-b --n 16 --size 32 --seed 0 --heldout 32 "
                             "--shard-size 16 --overwrite --quiet"),
    DATA_TOKENIZE: Cheap("qlip data tokenize 'data/shapes/shapes-train-*.tar' --model qlip-demo --random-init "
                         "--out data/shapes-tokens --batch-size 64 --preprocess train --overwrite -q",
                         needs=[SHAPES_DATA]),
    "torchrun --nproc-per-node 8 -m qlip data tokenize '<same' 'arguments>'": Cheap("qlip data tokenize --help"),
    "qlip data tokenize --out data/shapes-tokens --merge-index": Cheap(
        "qlip data tokenize --out data/shapes-tokens --merge-index", needs=[DATA_TOKENIZE]),
    # docs/demo.md
    "qlip demo --lanes 1": Cheap("qlip demo --help"),
    "qlip demo --fast": Cheap("qlip demo --help"),
    "qlip demo --resume": Cheap("qlip demo --help"),
    # docs/vlm.md
    "qlip vlm shapes-qa --out data/shapes-qa --n 2000 --split train --size 64 --multi-turn": Cheap(
        "qlip vlm shapes-qa --out data/shapes-qa --n 4 --split train --size 32 --multi-turn"),
    "qlip vlm tiny-llm --out runs/tiny-llm-vlm --texts data/shapes-qa/train.json --vocab-size 512": Cheap(
        "qlip vlm tiny-llm --out runs/tiny-llm-vlm --texts data/shapes-qa/train.json --vocab-size 300",
        needs=["qlip vlm shapes-qa --out data/shapes-qa --n 2000 --split train --size 64 --multi-turn"]),
    "qlip vlm train vlm-stage1.yaml --out runs/vlm-s1": Cheap("qlip vlm train --help"),
    "qlip vlm train vlm-stage2.yaml model.init=runs/vlm-s1/final --out runs/vlm-s2 --resume": Cheap(
        "qlip vlm train --help"),
    "qlip vlm chat --model runs/vlm-s2/final --image shape.png --prompt 'What color is the shape?'": Cheap(
        "qlip vlm chat --help"),
    "qlip demo vlm --demo-dir runs/demo --out runs/demo-vlm": Cheap("qlip demo vlm --help"),
    "qlip demo vlm --demo-dir runs/demo-v15 --out runs/demo-vlm-v15": Cheap("qlip demo vlm --help"),
    # docs/evaluation.md
    "qlip eval zero-shot --model M --data PATH '[--classnames' 'imagenet|shapes|FILE]' "
    "'[--templates' 'openai|simple|FILE|a photo of a {}.]'": Cheap(
        "qlip eval zero-shot --model runs/demo/qlip --data data/shapes/shapes-heldout-000000.tar "
        "--classnames shapes --templates 'a photo of a {}.' -q", needs=[SHAPES_DATA]),
    "qlip eval linear-probe --model M --data TEST --train TRAIN": Cheap(
        "qlip eval linear-probe --model runs/demo/qlip --data imagenet/val --train imagenet/train -q"),
    "qlip eval recon --model M --data PATH '[--fid' 'auto|inception|none]' '[--fid-weights' 'PT]' "
    "'[--lpips' 'vgg|alex|none]'": Cheap(
        "qlip eval recon --model runs/demo/qlip --data data/shapes/shapes-heldout-000000.tar --lpips alex-random --fid none -q",
        needs=[SHAPES_DATA]),
    "qlip eval codes --model M --data PATH '[--group-size' '14]'": Cheap(
        "qlip eval codes --model runs/demo/qlip --data data/shapes/shapes-heldout-000000.tar --group-size 14 -q",
        needs=[SHAPES_DATA]),
    "qlip eval all --model M --data PATH '[--train' 'TRAIN]' --report runs/eval": Cheap(
        "qlip eval all --model runs/demo/qlip --data imagenet/val --train imagenet/train --report runs/eval-probe -q"),
    "qlip eval compare RUN... -o runs/compare '[--y' 'rFID|PSNR]'": Cheap(
        "qlip eval compare runs/eval-a runs/eval-b -o runs/compare-psnr --y PSNR", needs=[EVAL_ALL],
        setup=_two_eval_runs),
    "qlip eval zero-shot --model nvidia/QLIP-B-16-256 --data /data/imagenet/val --classnames imagenet "
    "--templates openai --batch-size 256 --report runs/in1k-zs": Cheap(
        f"qlip eval zero-shot {RAND} --data imagenet/val --templates openai --batch-size 256 "
        "--report runs/in1k-zs -q"),  # the folder names stand in for the 1000 ImageNet class names
    "qlip eval recon --model nvidia/QLIP-B-16-256 --data /data/imagenet/val --batch-size 128 --report "
    "runs/in1k-rec": Cheap(f"qlip eval recon {RAND} --data imagenet/val --batch-size 128 --report runs/in1k-rec "
                           "--lpips alex-random --fid none -q"),
    "qlip eval linear-probe --model nvidia/QLIP-B-16-256 --data /data/imagenet --batch-size 256": Cheap(
        f"qlip eval linear-probe {RAND} --data imagenet --batch-size 256 -q"),
    # docs/performance.md
    "python benchmarks/tokenizer_speed.py": Cheap("python benchmarks/tokenizer_speed.py --help"),
    "python benchmarks/vlm_kind_probe.py --qlip runs/demo/qlip": Cheap("python benchmarks/vlm_kind_probe.py --help"),
    ("python benchmarks/vlm_recipe.py --qlip runs/demo/qlip --out /tmp/vb --tag demo --token-merge 2 "
     "--multi-shape-fraction 0.1 --stage2-steps 2500"): Cheap("python benchmarks/vlm_recipe.py --help"),
    "python benchmarks/throughput.py": Cheap("python benchmarks/throughput.py --help"),
    "python benchmarks/compile_step.py": Cheap("python benchmarks/compile_step.py --help"),
    "python benchmarks/tokenizer_speed.py --threads 1 --repeats 5 --json out.json": Cheap(
        "python benchmarks/tokenizer_speed.py --help"),
    # docs/training.md: FSDP2's gradients on gloo ranks against one process (plain torch)
    "python benchmarks/fsdp_gloo_grads.py": Cheap("python benchmarks/fsdp_gloo_grads.py"),  # the real run (~5 s)
    # docs/training.md
    "qlip train qlip/configs/demo-stage1.yaml --out runs/s1 optim.steps=2000 train.precision=bf16": Cheap(
        f"qlip train qlip/configs/demo-stage1.yaml --out runs/s1-bf16 optim.steps=2 train.precision=bf16 {TINY}",
        needs=[SHAPES_DATA], check=_steps("runs/s1-bf16", 2)),
    "qlip train qlip/configs/demo-stage1.yaml --out runs/s1 --resume": Cheap(
        f"qlip train qlip/configs/demo-stage1.yaml --out runs/s1 --resume optim.steps=3 {TINY}",
        needs=[TRAIN_S1], check=_steps("runs/s1", 3)),
    "qlip train qlip/configs/demo-stage2.yaml --out runs/s2 model.init=runs/s1/final": Cheap(
        f"qlip train qlip/configs/demo-stage2.yaml --out runs/s2 model.init=runs/s1/final optim.steps=2 {TINY}",
        needs=[TRAIN_S1], check=_steps("runs/s2", 2)),
    "qlip balance qlip/configs/demo-stage1.yaml --out runs/balance --steps 500": Cheap(
        f"qlip balance qlip/configs/demo-stage1.yaml --out runs/balance --steps 2 {TINY}", needs=[BALANCE],
        check=_balanced),
    "torchrun --nproc_per_node 8 -m qlip train RECIPE --out runs/x '[overrides]'": HELP_TRAIN,
    "torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST0 --master_port 29500 -m qlip "
    "train RECIPE --out /shared/runs/x": HELP_TRAIN,
    "python -m torch.distributed.run --nproc_per_node 2 --master_port 29511 -m qlip train RECIPE "
    "--out runs/x": HELP_TRAIN,
    "qlip balance RECIPE '[overrides]' --out runs/balance '[--steps' 'N]' '[--tail' '0.2]' '[-o' "
    "'balanced.yaml]'": Cheap(f"qlip balance qlip/configs/demo-stage1.yaml {TINY} --out runs/balance --steps 2 "
                              "--tail 0.2 -o balanced.yaml", needs=[BALANCE]),
    "python benchmarks/train_step.py '[--presets' 'qlip-tiny,qlip-b-16-256]' '[--threads' 'N]' "
    "'[--mem-cap-mb' '256]' '[--chunk' '32]'": Cheap("python benchmarks/train_step.py --help"),
    # docs/gen.md
    GEN_TRAIN: Cheap("qlip gen train t2i-demo data.train=data/shapes-tokens text.model=runs/demo/qlip "
                     "data.tokenizer=qlip-demo data.tokenizer_random_init=true model.preset=gpt-tiny "
                     "data.batch_size=4 optim.steps=2 optim.warmup_steps=1 train.log_every=1 train.progress=false "
                     "train.tensorboard=false --out runs/t2i", needs=[DATA_TOKENIZE], check=_steps("runs/t2i", 2)),
    "qlip gen sample --model runs/t2i/final --prompt 'a photo of a red circle' -n 8 --cfg 4 --seed 0 -o samples/":
        Cheap("qlip gen sample --model runs/t2i/final --prompt 'a photo of a red circle' -n 2 --cfg 4 --seed 0 "
              "-o samples/", needs=[GEN_TRAIN]),
    "python benchmarks/sample.py": Cheap("python benchmarks/sample.py --help"),
    # docs/demo.md, fourth round (a stage-2 training of minutes)
    "python benchmarks/demo_recon.py --stage1 runs/demo/qlip_stage1/final --out runs/rec/conv --head conv "
    "--head-channels 8 optim.lr=1e-3 optim.lr_generator=1e-3": Cheap("python benchmarks/demo_recon.py --help"),
    # docs/demo.md, fifth round (run on tiny data by tests/demo/test_demo_bottleneck.py)
    "python benchmarks/demo_bottleneck.py --data runs/demo/data --steps 1000": Cheap(
        "python benchmarks/demo_bottleneck.py --help"),
    # docs/gen.md, recipe screens (run on tiny inputs by tests/gen/test_demo_t2i.py)
    "python benchmarks/t2i_recipe.py --demo-dir runs/demo-v11-long --t2i-dir runs/demo-t2i-v11 --out runs/t2i11 --tag "
    "bf16-1500 --steps 1500 --precision bf16 --samples 8 --cfg 10": Cheap("python benchmarks/t2i_recipe.py --help"),
    "python benchmarks/t2i_recipe.py --demo-dir runs/demo-v11-long --t2i-dir runs/demo-t2i-v11 --out runs/t2i11 --tag "
    "bf16-1500 --steps 1500 --precision bf16 --samples 8 --cfg 4 --resume": Cheap("python benchmarks/t2i_recipe.py --help"),
    "python benchmarks/demo_recon.py --stage1 runs/demo/qlip_stage1/final --out runs/rec11/long20k --checkpoints "
    "optim.steps=20000 train.ckpt_every=4000 train.keep_ckpts=0": Cheap("python benchmarks/demo_recon.py --help"),
    "python benchmarks/demo_recon.py --stage1 runs/rec11/long20k/run/final --data runs/demo/data --out "
    "runs/rec11/long20k-test --judge-only --split test": Cheap("python benchmarks/demo_recon.py --help"),
    "python benchmarks/t2i_recipe.py --demo-dir runs/demo-v3 --t2i-dir runs/demo-t2i-v3 --out runs/t2ib --tag lr3e-3 "
    "--lr 3e-3": Cheap("python benchmarks/t2i_recipe.py --help"),
    "python benchmarks/t2i_recipe.py --demo-dir runs/demo-v3 --t2i-dir runs/demo-t2i-v3 --out runs/t2ib --tag lr6e-3 "
    "--lr 6e-3": Cheap("python benchmarks/t2i_recipe.py --help"),
    "python benchmarks/t2i_recipe.py --demo-dir runs/demo-v3 --t2i-dir runs/demo-t2i-v3 --out runs/demo-t2i-v3/runs "
    "--tag qlip --resume": Cheap("python benchmarks/t2i_recipe.py --help"),
    # docs/gen.md, sampling temperature and top-k on the demo's own generator (the flags are run on tiny
    # inputs by tests/gen/test_demo_t2i.py)
    **{"python benchmarks/t2i_recipe.py --demo-dir runs/demo --t2i-dir runs/demo-t2i --out runs/demo-t2i/runs "
       "--tag qlip --resume --samples 8" + tail: Cheap("python benchmarks/t2i_recipe.py --help")
       for tail in ("", " --temperature 0.7", " --temperature 0.4", " --top-k 8", " --cfg 20")},
    # docs/gen.md, bf16 / steps / pooled screen; docs/um3.md, precision
    **{"python benchmarks/t2i_recipe.py --demo-dir runs/demo-v3 --t2i-dir runs/demo-t2i-v4 --out runs/t2ib " + tail:
       Cheap("python benchmarks/t2i_recipe.py --help")
       for tail in ("--tag fp32-500 --precision fp32", "--tag bf16-500 --precision bf16",
                    "--tag bf16-500-pooled --precision bf16 --pooled", "--tag bf16-1000 --precision bf16 --steps 1000")},
    **{"python benchmarks/t2i_recipe.py --demo-dir runs/demo-v3 --t2i-dir runs/demo-t2i-v5 " + tail:
       Cheap("python benchmarks/t2i_recipe.py --help")
       for tail in ("--out runs/demo-t2i-v5/runs --tag qlip --resume",
                    "--out runs/t2ic --tag intra4x7-500 --head intra --groups 4 --precision bf16",
                    "--out runs/t2ic --tag intra4x7-1000 --head intra --groups 4 --precision bf16 --steps 1000")},
    # docs/gen.md, the learned caption embedding (the demo's text path since this round)
    **{"python benchmarks/t2i_recipe.py --demo-dir runs/demo-v3 --t2i-dir runs/demo-t2i-v5 --out runs/t2ie " + tail:
       Cheap("python benchmarks/t2i_recipe.py --help")
       for tail in ("--tag emb-split --text-encoder embedding --head split --groups 4",
                    "--tag emb-intra --text-encoder embedding --head intra --groups 4",
                    "--tag emb-intra --text-encoder embedding --head intra --groups 4 --resume --cfg 10 --samples 8")},
    **{"python benchmarks/um3_recipe.py --demo-dir runs/demo-v3 --out runs/um3c --tag " + tail:
       Cheap("python benchmarks/um3_recipe.py --help")
       for tail in ("g2-bits-200 --visual-init bits", "g4-bits-200 --visual-init bits --groups 4",
                    "g2-bits-600 --visual-init bits --steps 600",
                    "g4-bits-1000 --visual-init bits --groups 4 --steps 1000",
                    "g4-bits-2000 --visual-init bits --groups 4 --steps 2000",
                    "g4-bits-6000 --visual-init bits --groups 4 --steps 6000",
                    "g4-bits-2000 --visual-init bits --groups 4 --steps 2000 --reuse --cfg-scale 10",
                    "g4-bits-b64-500 --visual-init bits --groups 4 --steps 500 --batch-size 64",
                    "g4-bits-d128-500 --visual-init bits --groups 4 --steps 500 --dim 128 --ffn 512",
                    "g4-bits-2000-cd667 --visual-init bits --groups 4 --steps 2000 --calm-down-steps 667")},
    # docs/um3.md, "Issue 12, third round" (the flags run on tiny data by tests/um3/test_um3_recipe_bench.py)
    **{"python benchmarks/um3_recipe.py --demo-dir runs/demo-v3 --out " + tail:
       Cheap("python benchmarks/um3_recipe.py --help")
       for tail in ("runs/um3d --tag rows-2000 --test-images 128 --loss-average rows",
                    "runs/um3e --tag t2itext-2000 --test-images 128 --loss-average rows --r0 0.3 --rT 0.05 --i2t-share 0",
                    "runs/um3f --tag mix2-lr6-2000 --test-images 128 --loss-average rows --r0 0.3 --rT 0.05 "
                    "--i2t-share 0.25 --lr 6e-3",
                    "runs/um3f --tag mix2-lr6-2000 --test-images 128 --loss-average rows --r0 0.3 --rT 0.05 "
                    "--i2t-share 0.25 --lr 6e-3 --reuse --cfg-scale 10",
                    "runs/um3f --tag cur1000-i25-2000 --test-images 128 --loss-average rows --r0 0.3 --rT 0.05 "
                    "--i2t-share 0.25 --i2t-from 1000",
                    "runs/um3f --tag mix2-lr6-3000 --test-images 128 --loss-average rows --r0 0.3 --rT 0.05 --lr 6e-3 "
                    "--cfg-scale 10 --i2t-share 0.25 --steps 3000")},
    **{"python benchmarks/um3_recipe.py --demo-dir runs/demo-v3 --out runs/um3g --tag " + tail:
       Cheap("python benchmarks/um3_recipe.py --help")
       for tail in ("t2itext-s1 --test-images 128 --loss-average rows --lr 3e-3 --cfg-scale 3 --seed 1 --r0 0.3 "
                    "--rT 0.05 --i2t-share 0",
                    "mix2-s1 --test-images 128 --loss-average rows --lr 3e-3 --cfg-scale 3 --seed 1 --r0 0.3 "
                    "--rT 0.05 --i2t-share 0.25")},
    # docs/um3.md, "Issue 12, fourth round" (the flags run on tiny data by tests/um3/test_um3_recipe_bench.py)
    **{"python benchmarks/um3_recipe.py --demo-dir runs/demo-v3 --out " + tail:
       Cheap("python benchmarks/um3_recipe.py --help")
       for tail in ("runs/um3f --tag mix2-lr6-2000 --test-images 128 --reuse --cfg-scale 10 --temperature 0.5 --top-k 4",
                    "runs/um3h --tag d128-bf16-2000 --test-images 128 --dim 128 --ffn 512 --precision bf16",
                    "runs/um3h --tag d256-bf16-1000 --test-images 128 --dim 256 --ffn 1024 --precision bf16 --steps 1000 "
                    "--lr 3e-3",
                    "runs/um3f --tag img-i25-2000 --test-images 128 --i2t-image-loss",
                    "runs/um3f --tag img-i50-2000 --test-images 128 --i2t-image-loss --i2t-share 0.5",
                    "runs/um3f --tag mix2-lr6-2000 --test-images 128 --reuse --caption-cfg 2")},
    # docs/um3.md, "Layouts" (run on a tiny model by tests/um3/test_um3_layout_bench.py)
    "python benchmarks/um3_layout.py": Cheap("python benchmarks/um3_layout.py --help"),
    # docs/um3.md, "Issue 12, fifth round" (--layout runs on tiny data by tests/um3/test_um3_recipe_bench.py)
    **{"python benchmarks/um3_recipe.py --demo-dir runs/demo-v3 --out runs/um3f --tag " + tail:
       Cheap("python benchmarks/um3_recipe.py --help")
       for tail in ("tok-2000 --test-images 128 --layout token",
                    "tok-6000 --test-images 128 --layout token --steps 6000 --reuse --cfg-scale 5",
                    "tok-8000-lr3-s2 --seed 2 --lr 3e-3 --test-images 128 --layout token --steps 8000 --cfg-scale 5",
                    "tok-6000-i35-s0 --seed 0 --i2t-share 0.35 --test-images 128 --layout token --steps 6000 "
                    "--cfg-scale 5")},
    # (the size flags run on tiny data by tests/gen/test_demo_t2i.py)
    **{"python benchmarks/t2i_recipe.py --demo-dir runs/demo-v3 --t2i-dir runs/demo-t2i-v6 --out runs/t2if --tag " + tail:
       Cheap("python benchmarks/t2i_recipe.py --help")
       for tail in ("d64l2-b16-2000 --dim 64 --layers 2 --heads 4 --ffn 256 --batch 16 --steps 2000 --lr 6e-3",
                    "d64l2-b64-500 --dim 64 --layers 2 --heads 4 --ffn 256")},
    # (run on a tiny model by tests/um3/test_um3_colour_gain.py)
    "python benchmarks/um3_colour_gain.py --model runs/um3e/t2itext-2000/runs/um3/final --tokens "
    "runs/demo-um3-v9/data/tokens": Cheap("python benchmarks/um3_colour_gain.py --help"),
    **{"python benchmarks/um3_recipe.py --demo-dir runs/demo-v3 --out runs/um3b --tag " + tail:
       Cheap("python benchmarks/um3_recipe.py --help")
       for tail in ("fp32-60 --steps 60 --visual-init bits --precision fp32",
                    "bf16-60 --steps 60 --visual-init bits --precision bf16")},
    # docs/demo.md, eighth round (run on tiny data by tests/demo/test_token_kind_probe.py and
    # tests/demo/test_demo_recon_bench.py)
    **{"python benchmarks/token_kind_probe.py --tokens runs/demo-um3-v10/data/tokens --test "
       "runs/demo-um3-v10/data/test.pt" + tail: Cheap("python benchmarks/token_kind_probe.py --help")
       for tail in ("", " --only tokens --token-train 480", " --only originals reconstructions --seed 1")},
    "python benchmarks/demo_bottleneck.py --data runs/demo-v3/data --steps 300 --only mlp-binary-p8 "
    "mlp-binary-p8-nonorm": Cheap("python benchmarks/demo_bottleneck.py --help"),
    "python benchmarks/demo_bottleneck.py --data runs/demo-v3/data --steps 300 --only mlp-binary-p8 "
    "mlp-binary-p8-mix mlp-binary-p8-mix-decay mlp-continuous-p8": Cheap("python benchmarks/demo_bottleneck.py --help"),
    **{"python benchmarks/demo_bottleneck.py --data runs/demo-v3/data --steps " + tail:
       Cheap("python benchmarks/demo_bottleneck.py --help")
       for tail in ("1000 --only mlp-binary-p8 mlp-binary-p8-balanced",
                    "1000 --no-references --decor-weight 0.3 --only mlp-binary-p8-decorrelated "
                    "mlp-binary-p8-decorrelated-nobn",
                    "1000 --no-references --seed 1 --decor-weight 0.3 --only mlp-binary-p8 mlp-binary-p8-decorrelated",
                    "3000 --no-references --only mlp-binary-p8-decorrelated")},
    **{"python benchmarks/demo_recon.py --stage1 runs/demo-v3/qlip_stage1/final --data runs/demo-v3/data --out "
       + tail: Cheap("python benchmarks/demo_recon.py --help")
       for tail in ("runs/rec9/base", "runs/rec9/decor05 loss.bit_decorrelation=0.5",
                    "runs/rec9/decor3 loss.bit_decorrelation=3")},
    **{"python benchmarks/demo_recon.py --data runs/demo-v3/data --recipe qlip/configs/demo-stage1.yaml --out "
       + tail: Cheap("python benchmarks/demo_recon.py --help")
       for tail in ("runs/s1w/decor3 loss.bit_decorrelation=3", "runs/s1w/decor10 loss.bit_decorrelation=10")},
    "python benchmarks/demo_recon.py --stage1 runs/demo-v3/qlip_stage1/final --data runs/demo-v3/data --out "
    "runs/s1w/base --judge-only": Cheap("python benchmarks/demo_recon.py --help"),
    **{"python benchmarks/demo_recon.py --data runs/demo-v3/data --recipe qlip/configs/demo-stage1.yaml --out " + tail:
       Cheap("python benchmarks/demo_recon.py --help")
       for tail in ("runs/s1w/r4 loss.alpha_r=4", "runs/s1w/r10 loss.alpha_r=10",
                    "runs/s1w/g4 model.overrides.quantizer.gamma_1=4", "runs/s1w/q1 loss.alpha_q=1.0")},
    # docs/demo.md, tenth round (stage-2 overrides through the engine; the noise rows are run on tiny
    # data by tests/demo/test_demo_bottleneck.py; --stage2-steps by tests/demo/test_demo.py)
    **{"python benchmarks/demo_recon.py --stage1 runs/demo/qlip_stage1/final --out runs/rec10/" + tail:
       Cheap("python benchmarks/demo_recon.py --help")
       for tail in ("long6k --checkpoints optim.steps=6000 train.ckpt_every=1000 train.keep_ckpts=0",
                    "lr6 optim.lr=6e-3 optim.lr_generator=6e-3",
                    "b16lr6 data.batch_size=16 optim.steps=2200 optim.lr=6e-3 optim.lr_generator=6e-3",
                    "lr6x3 --checkpoints optim.steps=3300 optim.lr=6e-3 optim.lr_generator=6e-3 train.ckpt_every=1100 "
                    "train.keep_ckpts=0",
                    "gan loss.alpha_g=0.1 gan.disc_start=200")},
    "python benchmarks/demo_recon.py --stage1 runs/demo/recon_only/final --out runs/rec10/ro_base --judge-only": Cheap(
        "python benchmarks/demo_recon.py --help"),
    "python benchmarks/demo_recon.py --data runs/demo/data --recipe qlip/configs/demo-stage1.yaml --out runs/rec10/ro_v1e3 "
    "loss.alpha_a=0 model.drop_text=true optim.lr_visual=1e-3": Cheap("python benchmarks/demo_recon.py --help"),
    "python benchmarks/demo_recon.py --data runs/demo/data --recipe qlip/configs/demo-stage1.yaml --out runs/rec10/ro_g4 "
    "loss.alpha_a=0 model.drop_text=true model.overrides.quantizer.gamma_1=4": Cheap("python benchmarks/demo_recon.py --help"),
    "python benchmarks/demo_bottleneck.py --data runs/demo/data --steps 10000 --no-references --train-images 10240 "
    "--only mlp-binary-p8": Cheap("python benchmarks/demo_bottleneck.py --help"),
    "python benchmarks/demo_bottleneck.py --data runs/demo/data --steps 1000 --no-references --only mlp-binary-p8-noise "
    "mlp-binary-p8-noise-hard mlp-binary-p8": Cheap("python benchmarks/demo_bottleneck.py --help"),
    "qlip demo --resume --stage2-steps 6000": Cheap("qlip demo --help"),
    "qlip demo --stage2-steps 6000": Cheap("qlip demo --help"),
    "qlip demo --precision bf16 --out runs/demo-bf16b": Cheap("qlip demo --help"),
    "qlip demo --precision bf16": Cheap("qlip demo --help"),
    "python benchmarks/cpu_bf16.py": Cheap("python benchmarks/cpu_bf16.py --help"),
    "python benchmarks/fid_speed.py": Cheap("python benchmarks/fid_speed.py --help"),
    "python benchmarks/loader_cache.py --data runs/demo/data": Cheap("python benchmarks/loader_cache.py --help"),
    # docs/demo.md, twelfth round (the rotation row is run on tiny data by tests/demo/test_demo_bottleneck.py)
    "python benchmarks/demo_bottleneck.py --data runs/demo/data --steps 1000 --no-references --only mlp-binary-p8 "
    "mlp-binary-p8-rotation": Cheap("python benchmarks/demo_bottleneck.py --help"),
    **{"python benchmarks/demo_recon.py " + tail: Cheap("python benchmarks/demo_recon.py --help")
       for tail in ("--stage1 runs/demo/qlip_stage1/final --out runs/r12/s2-bf16 train.precision=bf16",
                    "--data runs/demo/data --recipe qlip/configs/demo-stage1.yaml --out runs/r12/s1-bf16-seed1 "
                    "train.precision=bf16 train.seed=1",
                    "--stage1 runs/r12/s1-bf16-seed1/run/final --data runs/demo/data --out runs/r12/s12-bf16-seed1 "
                    "train.precision=bf16",
                    "--data runs/demo/data --recipe qlip/configs/demo-stage1.yaml --out runs/r12/ro-g4-g00-seed1 "
                    "loss.alpha_a=0 model.drop_text=true model.overrides.quantizer.gamma_1=4 "
                    "model.overrides.quantizer.gamma_0=0 train.seed=1",
                    "--data runs/demo/data --recipe qlip/configs/demo-stage1.yaml --out runs/r12/s1-g00-seed1 "
                    "model.overrides.quantizer.gamma_0=0 train.seed=1")},
    # docs/demo.md, thirteenth round (the l1 row is run on tiny data by tests/demo/test_demo_bottleneck.py)
    "python benchmarks/demo_bottleneck.py --data runs/demo/data --steps 1000 --no-references --seed 1 --only "
    "mlp-binary-p8-l1 mlp-binary-p8": Cheap("python benchmarks/demo_bottleneck.py --help"),
    "python benchmarks/demo_bottleneck.py --data runs/demo/data --steps 1000 --no-references --only "
    "mlp-continuous-p8-l1 mlp-continuous-p8": Cheap("python benchmarks/demo_bottleneck.py --help"),
    **{"python benchmarks/demo_recon.py " + tail: Cheap("python benchmarks/demo_recon.py --help")
       for tail in ("--stage1 runs/demo/qlip_stage1/final --out runs/r13/s2-l1 loss.recon_kind=l1",
                    "--stage1 runs/demo/qlip_stage1/final --out runs/r13/s2-q0 loss.alpha_q=0",
                    "--stage1 runs/demo/qlip_stage2/final --out runs/r13/s2-base --judge-only")},
    "qlip demo --resume --out runs/demo-v11": Cheap("qlip demo --help"),
    "qlip demo --out runs/demo-v12": Cheap("qlip demo --help"),
    "qlip demo t2i --demo-dir runs/demo-v11-long --out runs/demo-t2i-v11": Cheap("qlip demo t2i --help"),
    "qlip demo t2i --demo-dir runs/demo-v11-long --out runs/demo-t2i-v12": Cheap("qlip demo t2i --help"),
    # docs/demo.md, seventh round (run on tiny data by tests/demo/test_demo_style.py)
    "python benchmarks/demo_style.py --demo-dir runs/demo --out runs/wide": Cheap(
        "python benchmarks/demo_style.py --help"),
    "python benchmarks/demo_style.py --demo-dir runs/demo --out runs/mix --style mixed --wide-data runs/wide/data": Cheap(
        "python benchmarks/demo_style.py --help"),
    # docs/demo.md, sixth round (every row run on tiny data by tests/demo/test_demo_bottleneck.py)
    "python benchmarks/demo_bottleneck.py --data runs/demo/data --steps 300 --only mlp-binary-p8 mlp-binary-p8-bernoulli "
    "mlp-binary-p8-edge mlp-binary-p8-frozen-enc mlp-binary-p8-linear-dec mlp-binary-p8-64bits mlp-continuous-p8 "
    "pca-thermometer-p8": Cheap("python benchmarks/demo_bottleneck.py --help"),
    "python benchmarks/demo_bottleneck.py --data runs/demo/data --steps 1000 --only mlp-binary-p8 mlp-binary-p8-64bits "
    "mlp-continuous-p8": Cheap("python benchmarks/demo_bottleneck.py --help"),
    "python benchmarks/demo_bottleneck.py --data runs/demo/data --steps 3000 --only mlp-binary-p8": Cheap(
        "python benchmarks/demo_bottleneck.py --help"),
    "qlip demo --recipe paper --out runs/demo-paper": Cheap("qlip demo --help"),
    "python benchmarks/demo_recon.py --stage1 runs/demo/qlip_stage1/final --out runs/rec/s0 loss.alpha_s=0": Cheap(
        "python benchmarks/demo_recon.py --help"),
    # docs/gen.md "Demo" (its pipeline is run by tests/gen/test_demo_t2i.py)
    "qlip demo t2i": Cheap("qlip demo t2i --help"),
    "qlip demo t2i --fast --out /tmp/t2i-fast": Cheap("qlip demo t2i --help"),
    "qlip demo t2i --resume": Cheap("qlip demo t2i --help"),
    "qlip demo t2i --compare-heads --heads-time 180": Cheap("qlip demo t2i --help"),
    "qlip demo t2i --demo-dir runs/demo-v3 --out runs/demo-t2i-v6": Cheap("qlip demo t2i --help"),
    "qlip demo um3 --demo-dir runs/demo-v3 --out runs/demo-um3-v6": Cheap("qlip demo um3 --help"),
    "qlip demo um3 --demo-dir runs/demo-v3 --out runs/demo-um3-v7": Cheap("qlip demo um3 --help"),
    "qlip demo um3 --demo-dir runs/demo-v3 --out runs/demo-um3-v8 --resume": Cheap("qlip demo um3 --help"),
    "qlip demo um3 --demo-dir runs/demo-v3 --out runs/demo-um3-v10": Cheap("qlip demo um3 --help"),
    "qlip demo um3 --demo-dir runs/demo-v3 --out runs/demo-um3-v11 --resume": Cheap("qlip demo um3 --help"),
    "qlip demo um3 --demo-dir runs/demo-v15 --out runs/demo-um3-v15 --resume": Cheap("qlip demo um3 --help"),
    "qlip demo t2i --demo-dir runs/demo-v3 --out runs/demo-t2i-v6 --resume --compare-heads": Cheap("qlip demo t2i --help"),
    "qlip gen sample --model runs/demo-t2i/qlip --prompt 'a photo of a red circle' -n 8 -o samples/":
        Cheap("qlip gen sample --help"),
    # docs/um3.md (training and generation are run by tests/um3/test_um3_engine.py)
    "qlip um3 tiny-llama --out runs/tiny-llama": Cheap("qlip um3 tiny-llama --out runs/tiny-llama"),
    "qlip um3 train RECIPE --out runs/um3 '[--resume]'": Cheap("qlip um3 train --help"),
    "qlip um3 generate --model runs/um3/final --prompt 'a red circle is' -o continuation.txt":
        Cheap("qlip um3 generate --help"),
    "qlip um3 generate --model runs/um3/final --image shape.png --qlip runs/demo/qlip -o caption.txt":
        Cheap("qlip um3 generate --help"),
    "qlip um3 generate --model runs/um3/final --draw 'a red circle' --qlip runs/demo/qlip --cfg 3 -n 4 "
    "-o drawing.png": Cheap("qlip um3 generate --help"),
    # docs/um3.md "Demo" (its pipeline is run by tests/um3/test_demo_um3.py)
    "qlip demo um3": Cheap("qlip demo um3 --help"),
    "qlip demo um3 --fast --out /tmp/um3-fast": Cheap("qlip demo um3 --help"),
    "qlip demo um3 --resume": Cheap("qlip demo um3 --help"),
    # docs/scaling.md
    "qlip train qlip/configs/qlip-l-14-392-stage1.yaml --dry-run --out runs/dry": Cheap(
        "qlip train qlip/configs/qlip-l-14-392-stage1.yaml --dry-run --out runs/dry"),  # meta device: seconds
    "qlip plan qlip/configs/qlip-b-16-256-stage1.yaml --gpus 8 --nodes 16 --gpu h100 --json plan.json": Cheap(
        "qlip plan qlip/configs/demo-stage1.yaml --gpus 8 --nodes 16 --gpu h100 --json plan.json"),
    "torchrun --nnodes 16 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 --rdzv_id qlip-b16 "
    "-m qlip train qlip/configs/qlip-b-16-256-stage1.yaml --out /shared/runs/b16-s1": HELP_TRAIN,
    "python benchmarks/plan_check.py": Cheap("python benchmarks/plan_check.py --help"),
    # docs/demo.md, fifteenth round: stage-1 bit decorrelation, two seeds (the script's training path is
    # run on tiny inputs by tests/demo/test_demo_recon_bench.py)
    **{"python benchmarks/demo_recon.py " + tail: Cheap("python benchmarks/demo_recon.py --help") for tail in (
        "--stage1 runs/demo/qlip_stage1/final --out runs/rec15/s1-base --judge-only",
        "--stage1 runs/demo/qlip_stage2/final --data runs/demo/data --out runs/rec15/s2-base --judge-only",
        *(f"--data runs/demo/data --recipe qlip/configs/demo-stage1.yaml --out runs/rec15/s1-{tag}" + ov
          for tag, ov in (("decor03", " loss.bit_decorrelation=0.3"), ("base-seed1", " train.seed=1"),
                          ("decor03-seed1", " train.seed=1 loss.bit_decorrelation=0.3"),
                          ("decor01-seed0", " loss.bit_decorrelation=0.1"),
                          ("decor01-seed1", " train.seed=1 loss.bit_decorrelation=0.1"))),
        *(f"--stage1 runs/rec15/s1-{tag}/run/final --data runs/demo/data --out runs/rec15/s12-{tag}"
          for tag in ("decor03", "base-seed1", "decor03-seed1", "decor01-seed0", "decor01-seed1")),
        "--data runs/demo/data --recipe qlip/configs/demo-stage1.yaml --out runs/rec15/ro-decor03 loss.alpha_a=0 "
        "model.drop_text=true model.overrides.quantizer.gamma_1=4 model.overrides.quantizer.gamma_0=0 "
        "loss.bit_decorrelation=0.3")},
    "qlip demo --out runs/demo-v15": Cheap("qlip demo --help"),
    # docs/demo.md, sixteenth round
    **{"python benchmarks/demo_recon.py " + tail: Cheap("python benchmarks/demo_recon.py --help") for tail in (
        *(f"--stage1 runs/rec15/s1-decor03{sd}/run/final --data runs/demo/data --out "
          f"runs/rec16/s12-decor03{sd}-s2decor03 loss.bit_decorrelation=0.3" for sd in ("", "-seed1")),
        *(f"--data runs/demo/data --recipe qlip/configs/demo-stage1.yaml --out runs/rec16/s1-decor1-seed{i} "
          f"train.seed={i} loss.bit_decorrelation=1.0" for i in (0, 1)),
        *(f"--stage1 runs/rec16/s1-decor1-seed{i}/run/final --data runs/demo/data --out runs/rec16/s12-decor1-seed{i}"
          for i in (0, 1)),
        "--stage1 runs/demo-v15/qlip_stage1/final --data runs/demo-v15/data --out runs/rec16/long20k --checkpoints "
        "optim.steps=20000 train.ckpt_every=2500 train.keep_ckpts=0",
        "--stage1 runs/rec16/long20k/run/final --data runs/demo-v15/data --out runs/rec16/long20k-test "
        "--judge-only --split test")},
    "qlip demo t2i --demo-dir runs/demo-v15 --out runs/demo-t2i-v15": Cheap("qlip demo t2i --help"),
    # docs/gen.md, "Single-shape training images"
    **{"python benchmarks/t2i_recipe.py --demo-dir runs/demo-v15 --t2i-dir runs/demo-t2i-v15 " + tail:
       Cheap("python benchmarks/t2i_recipe.py --help") for tail in (
        "--out runs/demo-t2i-v15/runs --tag qlip --resume --samples 8 --all-shapes",
        "--out runs/t2i16 --samples 8 --all-shapes --tag d64l2-b16-4000 --dim 64 --layers 2 --heads 4 --ffn 256 "
        "--batch 16 --steps 4000",
        "--out runs/t2i16 --samples 8 --all-shapes --tag d128l2-b16-4000 --dim 128 --layers 2 --heads 4 --ffn 512 "
        "--batch 16 --steps 4000",
        "--out runs/t2i16 --samples 8 --tag single-base",
        "--out runs/t2i16 --samples 8 --tag single-base --resume --cfg 15",
        "--out runs/t2i16 --samples 8 --tag single-base --resume --cfg 6")},
    "qlip demo t2i --demo-dir runs/demo-v15 --out runs/demo-t2i-v16": Cheap("qlip demo t2i --help"),
    # docs/gen.md, "A tokenizer that keeps the kind" (stop 36)
    "qlip demo --out runs/demo-v15-s2long --resume --stage2-steps 20000": Cheap("qlip demo --help"),
    "qlip demo t2i --demo-dir runs/demo-v15-s2long --out runs/demo-t2i-s2long": Cheap("qlip demo t2i --help"),
    **{"python benchmarks/t2i_recipe.py --demo-dir runs/demo-v15-s2long --t2i-dir runs/demo-t2i-s2long --out runs/t2i17 "
       + tail: Cheap("python benchmarks/t2i_recipe.py --help") for tail in (
        "--tag s2long-500 --samples 8", "--tag s2long-500 --samples 8 --resume --temperature 0.7",
        "--tag s2long-2000 --samples 8 --steps 2000")},
    "python benchmarks/t2i_recipe.py --demo-dir runs/demo-v15-s2long --t2i-dir runs/t2i17/more --out runs/t2i17 "
    "--tag more-2000 --samples 8 --steps 2000": Cheap("python benchmarks/t2i_recipe.py --help"),
    "python benchmarks/t2i_recipe.py --demo-dir runs/demo-v19 --t2i-dir runs/t2i18/more --out runs/t2i18 --tag more-500 "
    "--samples 8": Cheap("python benchmarks/t2i_recipe.py --help"),
    "qlip data shapes runs/t2i17/data-seed1 --n 40960 --seed 1 --heldout 0 --val 0 --shard-size 512":
        Cheap("qlip data shapes --help"),
}


# ---- the workspace --------------------------------------------------------------------------------
def _image(path: pathlib.Path, seed: int, size=(40, 36)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """What the documented commands assume exists (see the module docstring), on one thread."""
    import qlip
    ws = tmp_path_factory.mktemp("docs-workspace")
    shutil.copytree(REPO / "qlip" / "configs", ws / "qlip" / "configs")
    _image(ws / "photos" / "p.jpg", 1)
    _image(ws / "more" / "m.jpg", 2)
    for split, n in (("train", 4), ("val", 2)):  # an ImageNet-like folder: class sub-folders
        for c, name in enumerate(("n01440764", "n01443537", "n01484850")):
            for i in range(n):
                _image(ws / "imagenet" / split / name / f"{i}.png", 100 * c + 10 * i + (split == "val"))
    torch.manual_seed(0)
    qlip.load("qlip-tiny", pretrained=False).save_pretrained(str(ws / "runs" / "demo" / "qlip"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"path": ws, "done": set()}
    torch.set_num_threads(threads)


def _run_words(words: List[str]) -> int:
    """Run one command in-process; returns its exit code."""
    if words[0] == "qlip" or words[:3] == ["python", "-m", "qlip"]:
        from qlip.cli import main
        try:
            return main(words[1:] if words[0] == "qlip" else words[3:])
        except SystemExit as e:  # argparse: --help, usage errors
            return int(e.code or 0)
    if words[:2] == ["python", "-c"]:
        exec(compile(words[2], "<python -c>", "exec"), {"__name__": "__main__"})
        return 0
    if words[0] == "python" and words[1].startswith("benchmarks/"):
        argv, path, env = sys.argv, list(sys.path), dict(os.environ)
        sys.argv = [str(REPO / words[1]), *words[2:]]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            return 0
        except SystemExit as e:
            return int(e.code or 0)
        finally:
            sys.argv, sys.path[:] = argv, path
            os.environ.clear()
            os.environ.update(env)
    raise AssertionError(f"no in-process runner for {words}")


def _run_documented(key: str, ws: dict, capsys) -> None:
    if key in ws["done"]:
        return
    cheap = CHEAP[key]
    for dep in cheap.needs:
        _run_documented(dep, ws, capsys)
    if cheap.setup:
        cheap.setup(ws["path"])
    capsys.readouterr()
    code = _run_words(shlex.split(cheap.cmd))
    out, err = capsys.readouterr()
    assert code == 0, f"{key}\n  ran as: {cheap.cmd}\n  exit {code}\n{out[-2000:]}\n{err[-2000:]}"
    assert "Traceback" not in out + err, f"{cheap.cmd} printed a traceback:\n{err[-3000:]}"
    if cheap.check:
        cheap.check(ws["path"], out)
    ws["done"].add(key)


# ---- the tests ------------------------------------------------------------------------------------
def test_every_documented_command_has_a_cheap_form():
    documented = documented_commands()
    missing = [f"{where}: {cmd}" for cmd, where in documented.items() if cmd not in CHEAP]
    assert not missing, ("documented command lines without an entry in CHEAP (add their cheap form):\n  "
                         + "\n  ".join(missing))
    stale = sorted(set(CHEAP) - set(documented))
    assert not stale, "CHEAP entries that match no documented line (docs changed?):\n  " + "\n  ".join(stale)


@pytest.mark.parametrize("key", list(CHEAP))
def test_documented_command_runs(key, workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace["path"])
    _run_documented(key, workspace, capsys)
