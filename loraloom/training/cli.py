"""``loraloom`` command line: train from a TOML config, print an example config, run the demo, merge an adapter
into its base, extract a LoRA from a fine-tune."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from . import distributed
from .config import RunConfig, config_from_dict, load_config, to_toml
from .families import DEFAULT_FAMILY, FAMILIES, family
from .offline import import_hub_askers_offline


def example_config(name: str) -> RunConfig:
    """A template for a real run of family ``name``: its files where ComfyUI keeps them, and its recipe."""
    sections = {"data": {"images": "dataset/my_character", "trigger": "my_trigger"},
                "sample": {"prompts": ["my_trigger, a portrait photo"], "seeds": [0, 1]},
                "output": {"run_dir": "runs/my_character", "name": "my_character"}}
    for section, values in family(name).example().items():
        sections[section] = {**sections.get(section, {}), **values}
    return config_from_dict({**sections, "model": {**sections.get("model", {}), "family": name}})


def _train(args: argparse.Namespace) -> int:
    if args.gpus > 1 and "LOCAL_RANK" not in os.environ:  # not yet under torchrun: start it, one rank per GPU
        load_config(args.config, args.set)  # a bad config is reported once, not by every rank
        ranks = ["train", str(args.config), *(f"--set={s}" for s in args.set), *(["--preview"] * args.preview)]
        return subprocess.call(distributed.launch_command(args.gpus, "loraloom.training.cli", ranks))
    from .session import Session  # heavy imports only for commands that need them

    cfg = load_config(args.config, args.set)
    with distributed.process_group():
        main = distributed.rank_and_world()[0] == 0  # only rank 0 prints, as it alone writes
        session = Session.open(cfg, on_event=_print_event if main else None)
        path = session.run()
        if cfg.sample.prompts and args.preview and main:
            print(f"preview: {session.preview()}")
        if main:
            print(f"adapter: {path}")
    return 0


def _print_event(event: dict) -> None:
    kind = event["type"]
    if kind == "step" and event.get("skipped"):
        print(f"step {event['step']}  skipped: {event['skipped']}", flush=True)
    elif kind == "step":
        print(f"step {event['step']}  loss {event['loss']:.4f}  lr {event['lr']:.2e}  "
              f"{event['step_time']:.2f}s/step  peak {event['peak_memory_mb']:.0f} MB", flush=True)
    elif kind in ("validation", "checkpoint", "resume", "export", "dataset"):
        print(" ".join(f"{k}={v}" for k, v in event.items() if k not in ("type", "time")), f"[{kind}]", flush=True)


def _inspect(args: argparse.Namespace) -> int:
    """The dataset as the run will see it: sources, skips, buckets, and captions as the model reads them."""
    from .data import describe_dataset  # no adapter or model libraries: seconds faster

    cfg = load_config(args.config, args.set, check_paths=False)
    if args.seed is not None:
        cfg = replace(cfg, train=replace(cfg.train, seed=args.seed))
    cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output.run_dir).parent / "cache"
    print("\n".join(describe_dataset(cfg, cache_root, args.samples, args.step)))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .tools import merge

    cfg = load_config(args.config, check_paths=False) if args.config else None
    print(f"merged model: {merge(args.base, args.adapter, args.out, args.dtype, cfg)}")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from .tools import extract

    done = extract(args.base, args.tuned, args.out, args.rank, args.family, args.targets, args.dtype,
                   biases=not args.no_bias)
    print(f"LoRA: {done.path}  layers {done.targets}  rank <= {args.rank}  relative error "
          f"{done.relative_error:.3g}  bias patches {done.biases}")
    if done.untargeted:
        print(f"not carried ({len(done.untargeted)} changed tensors outside the LoRA): "
              f"{', '.join(done.untargeted[:8])}{' ...' if len(done.untargeted) > 8 else ''}")
    return 0


def _config(args: argparse.Namespace) -> int:
    sys.stdout.write(to_toml(example_config(args.example)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    effort = {"vae_steps": args.vae_steps, "base_steps": args.base_steps, "family_name": args.family}
    if args.prepare:
        print(f"demo prepared: loraloom train {demo.prepare(args.prepare, steps=args.steps, **effort)}")
        return 0
    out = args.out or Path("loraloom-demo" if args.family == DEFAULT_FAMILY else f"loraloom-demo-{args.family}")
    result = demo.run(out, steps=args.steps, **effort)
    print(f"validation loss {result['val_loss_before']:.4f} -> {result['val_loss_after']:.4f}")
    print(f"prepared in {result['prepare_seconds']:.0f} s, trained in {result['train_seconds']:.0f} s")
    for key in ("comparison", "loss_chart", "adapter", "metrics"):
        print(f"{key}: {result[key]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraloom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or resume) the run a TOML config describes")
    train.add_argument("config", type=Path)
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (TOML syntax; repeatable)")
    train.add_argument("--preview", action="store_true", help="write a with/without-adapter picture at the end")
    train.add_argument("--gpus", type=int, default=1, metavar="N",
                       help="train on N GPUs of this machine: N processes started with torchrun, each on its "
                            "share of the batches (train.batch_size is per GPU); without CUDA, N CPU processes")
    train.set_defaults(func=_train)
    config = sub.add_parser("config", help="print an example config")
    config.add_argument("--example", choices=sorted(FAMILIES), default=DEFAULT_FAMILY)
    config.set_defaults(func=_config)
    dataset = sub.add_parser("dataset", help="look at the training data before training")
    dataset_sub = dataset.add_subparsers(dest="dataset_command", required=True)
    inspect = dataset_sub.add_parser("inspect", help="index summary and processed captions at a step")
    inspect.add_argument("config", type=Path)
    inspect.add_argument("--samples", type=int, default=8, help="captions to print (default 8)")
    inspect.add_argument("--seed", type=int, help="data seed (default: train.seed of the config)")
    inspect.add_argument("--step", type=int, default=0, help="show the captions of this training step onwards")
    inspect.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config value (TOML syntax; repeatable)")
    inspect.set_defaults(func=_inspect)
    demo = sub.add_parser("demo", help="train a tiny model on generated data and show the result")
    demo.add_argument("--family", choices=sorted(FAMILIES), default=DEFAULT_FAMILY, help="the tiny model's family")
    demo.add_argument("--prepare", type=Path, help="only write models, data and config into this folder")
    demo.add_argument("--out", type=Path, help="demo folder (default ./loraloom-demo, ./loraloom-demo-<family>)")
    demo.add_argument("--steps", type=int, default=1200, help="LoRA training steps")
    demo.add_argument("--vae-steps", type=int, default=300, help="steps fitting the tiny VAE to the pictures")
    demo.add_argument("--base-steps", type=int, default=600, help="steps pre-training the tiny base model")
    demo.set_defaults(func=_demo)
    dtypes = ["bf16", "fp16", "fp32"]
    merge = sub.add_parser("merge", help="fold an adapter file into its base: one model file in the family's "
                                         "native layout (ComfyUI's diffusion_models)")
    merge.add_argument("base", type=Path, help="the base model file (or diffusers folder)")
    merge.add_argument("adapter", type=Path, help="the adapter file LoRA Loom exported")
    merge.add_argument("out", type=Path, help="the merged model file to write")
    merge.add_argument("--dtype", choices=dtypes, default="bf16", help="precision of the merged file (default bf16)")
    merge.add_argument("--config", type=Path, help="a run config describing the adapter, for a file without "
                                                   "LoRA Loom's metadata")
    merge.set_defaults(func=_merge)
    extract = sub.add_parser("extract", help="a LoRA that turns one model file into another (e.g. a full "
                                             "fine-tune's -model file and its base), by SVD")
    extract.add_argument("base", type=Path, help="the base model file")
    extract.add_argument("tuned", type=Path, help="the fine-tuned model file")
    extract.add_argument("out", type=Path, help="the LoRA file to write")
    extract.add_argument("--rank", type=int, default=16, help="rank per layer (default 16)")
    extract.add_argument("--family", choices=sorted(FAMILIES), default=DEFAULT_FAMILY)
    extract.add_argument("--targets", default="all_linear", help="the family's preset of layers (default all_linear)")
    extract.add_argument("--dtype", choices=dtypes, default="bf16", help="precision of the LoRA (default bf16)")
    extract.add_argument("--no-bias", action="store_true", help="leave bias differences out (a plain LoRA)")
    extract.set_defaults(func=_extract)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    import_hub_askers_offline()  # first, before a command's own imports (diffusers) load them the ordinary way
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # ConfigError, ModelFileError, DatasetError, WriteError name the key or file
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
