"""The ``utuning`` command: train, evaluate, check, inspect and compare recipes.

    utuning train recipes/vision/cifar100/dual_u_tuner.yaml train.epochs=3
    utuning check recipes/**/*.yaml --tiny
    utuning inspect recipes/vision/cifar100/vpt_deep.yaml --json
    utuning list tuners
    utuning report runs/ --out report.png

Exit codes: 0 success, 2 a bad recipe or argument (``ConfigError``), 1 any other ``UtuningError``
(printed without a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utuning.errors import ConfigError, InterruptedRun, UtuningError

EPILOG = "Overrides are KEY=VALUE pairs over any recipe key, e.g. train.epochs=3 tuners.0.args.hidden=16."


def _split(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Positional arguments: recipe paths, and overrides (those with '=')."""
    paths = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return paths, overrides


def _one_recipe(args: argparse.Namespace) -> tuple[str, list[str]]:
    paths, overrides = _split(args.items)
    if len(paths) != 1:
        raise ConfigError(f"Give exactly one recipe file (and KEY=VALUE overrides), got {paths or 'none'}")
    return paths[0], overrides + list(args.set or [])


def _load(path: str, overrides: list[str], tiny: bool = False):
    from utuning.recipe import load_recipe

    return load_recipe(path, overrides, tiny=tiny)


# Commands ---------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from utuning.engine import train

    paths, overrides = _split(args.items)
    if not paths:
        raise ConfigError("Give at least one recipe file (and KEY=VALUE overrides)")
    overrides += list(args.set or [])
    # Every recipe is validated before the first one trains: a typo in the third fails now.
    recipes = [_load(path, overrides, args.tiny) for path in paths]
    summaries = [train(recipe, resume=args.resume, overwrite=args.overwrite) for recipe in recipes]
    if len(summaries) == 1:
        print(json.dumps(summaries[0], indent=2, default=str))
    else:
        from utuning.report import format_table, read_run

        print(format_table([read_run(r.output.dir) for r in recipes]))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from utuning.engine import evaluate

    path, overrides = _one_recipe(args)
    if not Path(args.checkpoint).exists():
        raise ConfigError(f"--checkpoint {args.checkpoint!r} does not exist")
    recipe = _load(path, overrides, args.tiny)
    print(json.dumps(evaluate(recipe, checkpoint=args.checkpoint), indent=2, default=str))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate each recipe and build its model; every failure is listed, then the worst exit code."""
    import torch

    from utuning.build import build_model

    paths, overrides = _split(args.items)
    overrides += list(args.set or [])
    if not paths:
        raise ConfigError("Give at least one recipe file")
    status = 0
    for path in paths:
        try:
            recipe = _load(path, overrides, args.tiny)
            model = build_model(recipe, pretrained=None if args.weights else False).eval()
            with torch.no_grad():
                model(**model.backbone.example_inputs(batch_size=2))
        except UtuningError as e:
            print(f"FAIL {path}: {e}", file=sys.stderr)
            status = max(status, _code(e))
            continue
        tunable, total = model.num_parameters()
        print(f"ok   {path}: {recipe.name}, {len(model.attached())} tuners, "
              f"{tunable:,} / {total:,} tunable ({tunable / max(total, 1):.4%})")
    return status


def _structure(recipe: Any, weights: bool):
    """The recipe's model; without weights it is built on the meta device (no memory, no time)."""
    import torch

    from utuning.build import build_model

    if weights:
        return build_model(recipe)
    with torch.device("meta"):
        return build_model(recipe, pretrained=False)


def cmd_export(args: argparse.Namespace) -> int:
    from utuning.checkpoint import export_backbone, load_tuned, read_checkpoint

    if args.format == "pretrained":
        from utuning.pretrained import run_to_pretrained

        out = run_to_pretrained(args.checkpoint, args.out)
        print(f"wrote {out} (load it with utuning.from_pretrained({str(out)!r}))")
        return 0
    if args.format == "peft":
        from utuning.peft_format import export_peft

        meta = read_checkpoint(args.checkpoint)[1]
        out = export_peft(load_tuned(args.checkpoint), args.out, base_model_name_or_path=meta["recipe"].backbone.model)
        print(f"wrote the PEFT adapter folder {out} (load it with PeftModel.from_pretrained(base_model, {str(out)!r}))")
        return 0
    print(export_backbone(args.checkpoint, args.out).describe())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Text from a decoder LLM recipe or checkpoint (greedy by default; sampling with --temperature)."""
    from utuning.generate import generate_main

    paths, overrides = _split(args.items or [])
    if len(paths) > 1:
        raise ConfigError(f"Give at most one recipe file (and KEY=VALUE overrides), got {paths}")
    sampling = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "seed": args.seed} if args.temperature else {}
    texts = generate_main(paths[0] if paths else None, args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                          overrides=overrides + list(args.set or []), **sampling)
    for prompt, text in zip(args.prompt, texts):
        print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    path, overrides = _one_recipe(args)
    recipe = _load(path, overrides, args.tiny)
    model = _structure(recipe, args.weights)
    tunable, total = model.num_parameters()
    if args.json:
        out = {"recipe": path, "name": recipe.name, "backbone": recipe.backbone.model, "sites": model.summary(),
               "tunable": tunable, "total": total, "percent": 100 * tunable / max(total, 1)}
        print(json.dumps(out, indent=2))
    else:
        print(f"{recipe.name}: {recipe.backbone.name} {recipe.backbone.model}")
        print(model.format_summary())
    return 0


def _tuner_rows() -> list[dict[str, Any]]:
    import inspect

    from utuning.registry import TUNERS

    rows = []
    for name in TUNERS:
        cls = TUNERS.get(name)
        hp = {k: ("<required>" if v is inspect.Parameter.empty else v) for k, v in cls.hyperparameters().items()}
        rows.append({"name": name, "placement": cls.placement, "site_kinds": sorted(cls.site_kinds) or ["any"],
                     "requires": sorted(cls.requires), "paper": cls.paper, "hyperparameters": hp})
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    from utuning.registry import BACKBONES, COMPOSITIONS

    if args.what == "tuners":
        rows = _tuner_rows()
        if args.json:
            print(json.dumps(rows, indent=2, default=repr))
            return 0
        for r in rows:
            hp = ", ".join(f"{k}={v!r}" for k, v in r["hyperparameters"].items())
            print(f"{r['name']:<18} {r['placement']:<10} sites: {','.join(r['site_kinds']):<22} {r['paper']}")
            print(f"{'':<18} {hp or '(no hyperparameters)'}")
    elif args.what == "backbones":
        for name in BACKBONES:
            doc = (BACKBONES.get(name).__doc__ or "").strip().splitlines()
            print(f"{name:<12} {doc[0] if doc else ''}")
    elif args.what == "compositions":
        for name in COMPOSITIONS:
            doc = (COMPOSITIONS.get(name).__doc__ or "").strip().splitlines()
            print(f"{name:<18} {doc[0] if doc else ''}")
    else:
        if not args.target:
            raise ConfigError("list sites needs a backbone name or a recipe file, e.g. `utuning list sites vit`")
        backbone = _sites_backbone(args.target, args.tiny)
        rows = [{"site": s.name, "kind": s.kind, "dim": s.dim, "out_dim": s.out_dim,
                 "placements": sorted(s.placements), "features": sorted(s.features)}
                for s in backbone.site_specs().values()]
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            print(f"{r['site']:<24} {r['kind']:<7} {r['dim']:>5} -> {r['out_dim']:<6} {','.join(r['placements'])}"
                  + (f"  [{','.join(r['features'])}]" if r["features"] else ""))
    return 0


def _sites_backbone(target: str, tiny: bool):
    """A backbone from a recipe file (its model) or a registered backbone name (its defaults)."""
    import torch

    from utuning.backbone import build_backbone
    from utuning.registry import BACKBONES

    if target in BACKBONES:
        if tiny:
            raise ConfigError("--tiny applies to recipe files (their backbone.tiny section), not to backbone names")
        with torch.device("meta"):
            return build_backbone(target)
    if not Path(target).is_file():
        from utuning.errors import closest

        raise ConfigError(f"{target!r} is neither a recipe file nor a backbone; backbones: "
                          f"{list(BACKBONES)} (closest: {closest(target, BACKBONES)})")
    return _structure(_load(target, [], tiny), weights=False).backbone


def cmd_report(args: argparse.Namespace) -> int:
    from utuning.report import collect, format_table, plot, tables_report

    if args.tables or args.markdown or args.csv or args.plots:  # paper-format tables, seeds aggregated
        print(tables_report(args.runs, value=args.value, markdown=args.markdown, csv=args.csv, plots=args.plots),
              end="")
        for path in (args.markdown, args.csv, args.plots):
            if path:
                print(f"wrote {path}")
        return 0
    rows = collect(args.runs)
    print(format_table(rows))
    if args.out:
        plot(rows, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Methods x data sets x seeds x a hyperparameter search, as ``utuning train`` subprocesses (docs/research.md)."""
    from utuning.report import format_markdown
    from utuning.sweep import load_sweep, plan, run_sweep

    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    sweep = load_sweep(args.sweep, overrides=list(args.set or []), imports=list(args.imports))
    if args.dry_run:
        print(plan(sweep))
        return 0
    gpus = [g for g in (args.gpus or "").split(",") if g.strip()]
    result = run_sweep(sweep, jobs=args.jobs, worker=args.worker, gpus=gpus)
    for chosen in result["selection"]:
        if chosen.get("params"):
            print(f"{chosen['method']} on {chosen['data']}: chose {chosen['params']} (search value {chosen['value']:.4f})")
    print(format_markdown(result["tables"]) if result["tables"] else "no finished final runs", end="")
    print(f"wrote {sweep.out / 'table.md'}, {sweep.out / 'table.csv'}, {sweep.out / 'selection.json'}")
    for error in result["errors"]:
        print(f"utuning sweep: error: {error}", file=sys.stderr)
    return 1 if result["errors"] else 0


# Parser -----------------------------------------------------------------------------------
def _recipe_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE",
                   help=("recipe YAML file(s)" if many else "a recipe YAML file") + ", then KEY=VALUE overrides")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="an override (repeatable)")
    p.add_argument("--tiny", action="store_true",
                   help="swap the backbone for the small offline model of the recipe's backbone.tiny section")


def _imports(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="a plugin to import first: a module name or a .py file (repeatable); see docs/research.md")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="utuning", description="Parameter-efficient transfer learning recipes "
                                     "(frozen operations plus unified tuners).", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _imports(argparse.ArgumentParser(add_help=False))  # every command takes --import

    p = sub.add_parser("train", parents=[common], help="train a recipe", description="Train a recipe; the run directory "
                       "(output.dir) gets recipe.yaml, metrics.jsonl, summary.json and checkpoints/.", epilog=EPILOG)
    _recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last intact checkpoint in output.dir")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in output.dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint", description="Evaluate a tuner checkpoint of a recipe.",
                       epilog=EPILOG)
    _recipe_args(p)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="tuner checkpoint file or run directory")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("check", parents=[common], help="validate recipes and build their models",
                       description="Validate each recipe, build its backbone and tuners and run one small forward "
                       "pass, without data or training. Exit 2 if any recipe is invalid.", epilog=EPILOG)
    _recipe_args(p, many=True)
    p.add_argument("--weights", action="store_true",
                   help="load the pretrained weights (default: random init, nothing downloaded)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("inspect", parents=[common], help="tuners and tunable parameters per site",
                       description="Per-site table of the recipe's tuners and tunable parameters (built without "
                       "weights on the meta device, so even large models take no memory).", epilog=EPILOG)
    _recipe_args(p)
    p.add_argument("--json", action="store_true", help="print JSON (sites, tunable, total, percent)")
    p.add_argument("--weights", action="store_true", help="build with the pretrained weights")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("list", parents=[common], help="registered tuners, backbones, compositions, or a model's sites",
                       description="List registered tuners (placement, site kinds, paper, hyperparameters and "
                       "defaults), backbones, compositions, or the sites of a backbone or recipe.")
    p.add_argument("what", choices=["tuners", "backbones", "compositions", "sites"])
    p.add_argument("target", nargs="?", metavar="BACKBONE_OR_RECIPE", help="for `sites`: a backbone name or recipe")
    p.add_argument("--json", action="store_true", help="print JSON (tuners, sites)")
    p.add_argument("--tiny", action="store_true", help="for `sites` of a recipe: its tiny backbone")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("export", parents=[common], help="fold tuners into the backbone, or write a PEFT adapter",
                       description="Fold a checkpoint's full fine-tuning or mergeable tuners (lora, ssf, bitfit) into "
                       "the frozen weights and save them as the backbone's own library loads them: timm backbones as "
                       "one safetensors state dict (original keys: timm's pretrained_cfg_overlay=dict(file=FILE), or "
                       "`backbone.pretrained: FILE`), Hugging Face backbones as a folder that from_pretrained loads.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run folder, its checkpoints/ folder or one checkpoint")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="--format weights: the .safetensors file (timm backbones) or the new or empty folder "
                   "(Hugging Face backbones: config.json, model.safetensors, tokenizer) to write; peft, pretrained: "
                   "the folder")
    p.add_argument("--format", choices=["weights", "peft", "pretrained"], default="weights",
                   help="weights: merged backbone weights (default); peft: an HF PEFT adapter folder "
                   "(adapter_config.json + adapter_model.safetensors) of LoRA-family, IA3, OFT, LN tuning tuners; "
                   "pretrained: utuning's own folder for any tuner (utuning.from_pretrained)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", parents=[common], help="generate text with a (tuned) decoder LLM",
                       description="Generate with the KV cache from a decoder recipe (tuners as built) and/or a "
                       "checkpoint (its stored recipe and tuner weights). One JSON line per prompt.", epilog=EPILOG)
    p.add_argument("items", nargs="*", metavar="RECIPE_OR_OVERRIDE", help="a recipe YAML file, then KEY=VALUE overrides")
    p.add_argument("--checkpoint", metavar="PATH", help="a run folder or checkpoint (default: the recipe's untrained tuners)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="> 0 samples (default: greedy)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (reproducible samples)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="an override (repeatable)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("report", parents=[common], help="compare finished runs",
                       description="Table of the finished runs under RUNS_DIR (each with a summary.json): name, "
                       "method, tunable parameters, share, best and final metric, time; optionally a plot of "
                       "the metric against tunable parameters (log x).")
    p.add_argument("runs", metavar="RUNS_DIR")
    p.add_argument("--out", metavar="PNG", help="write the plot here, e.g. report.png")
    p.add_argument("--tables", action="store_true",
                   help="paper-format tables instead: runs differing only by seed aggregated (mean ± std, n); "
                   "CIFAR-100, FGVC and mean, VTAB-1k groups and both overall means, GLUE and average")
    p.add_argument("--value", choices=["final", "best"], default="final",
                   help="for --tables: the last evaluation (default) or the best one of each run")
    p.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown (implies --tables)")
    p.add_argument("--csv", metavar="FILE", help="write the tables as CSV, one line per cell (implies --tables)")
    p.add_argument("--plots", metavar="DIR", help="accuracy-vs-parameters plot per table (implies --tables)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sweep", parents=[common], help="methods x data sets x seeds x a hyperparameter search (Optuna)",
                       description="Run a sweep file: choose hyperparameters on a validation split, retrain with "
                       "the chosen ones on each seed, write the paper tables. Runs are `utuning train` subprocesses; "
                       "an interrupted sweep resumes without redoing finished runs. See docs/research.md.")
    p.add_argument("sweep", metavar="SWEEP_YAML")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time on this machine (default 1)")
    p.add_argument("--worker", action="store_true",
                   help="one of several processes sharing the sweep's storage (cluster, SLURM array): trials of "
                   "dead workers are retried after Optuna's heartbeat grace period, not at start")
    p.add_argument("--gpus", metavar="IDS", help="e.g. 0,1,2,3: job slot i trains on GPU i mod 4 (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--dry-run", action="store_true", help="print the studies and runs, run nothing")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="an override of every run (repeatable)")
    p.set_defaults(func=cmd_sweep)
    return parser


def _code(e: UtuningError) -> int:
    if isinstance(e, InterruptedRun):
        return e.exit_code
    return 2 if isinstance(e, ConfigError) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides after an option (``inspect R --json key=value``) belong to the recipe
        if not hasattr(args, "items") or not all("=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.items += extra
    try:
        from utuning import plugins

        plugins.load_entry_points()
        plugins.load_all(args.imports, where="--import")
        return args.func(args)
    except UtuningError as e:
        prefix = "" if isinstance(e, InterruptedRun) else "error: "
        print(f"utuning {args.command}: {prefix}{e}", file=sys.stderr)
        return _code(e)
    except KeyboardInterrupt:
        print(f"utuning {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
