"""`blip-repro`: download data, list the model zoo, evaluate, train, convert original checkpoints, reproduce every
table, write the report."""
from __future__ import annotations

import argparse
import sys

from blip_repro.errors import UserError


def run_main(fn, argv=None) -> int:
    """Call an entry point; a UserError becomes one line on stderr and exit code 2 (no traceback)."""
    try:
        return fn(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_zoo(args) -> int:
    from blip_repro import zoo

    if args.fetch:
        return _fetch(args.fetch)
    if args.check:
        return _check_live()
    rows = [("name", "task", "hub id", "revision", "status", "local")]
    for s in zoo.MODELS.values():
        local = "built-in" if s.tiny else ("yes" if zoo.is_cached(s) else "no")
        rows.append((s.name, s.task, s.hub_id or "(tiny, trained on shapes)", (s.revision or "-")[:12],
                     s.revision_status if not s.tiny else "-", local))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("\npaper rows without released weights:")
    for row, why in zoo.UNRELEASED.items():
        print(f"  {row}: {why}")
    return 0


def _fetch(names: list[str]) -> int:
    from huggingface_hub import snapshot_download

    from blip_repro import zoo

    for n in names:
        s = zoo.get_spec(n)
        if s.tiny:
            print(f"{n}: built-in, nothing to fetch")
            continue
        path = snapshot_download(s.hub_id, revision=s.revision)
        print(f"{n}: {s.hub_id}@{s.revision} -> {path}")
    return 0


def _check_live() -> int:
    """On a connected machine: compare each pinned revision with the hub's current main."""
    from huggingface_hub import HfApi

    from blip_repro import zoo

    api = HfApi()
    for s in zoo.MODELS.values():
        if s.tiny:
            continue
        try:
            live = api.model_info(s.hub_id).sha
        except Exception as e:  # noqa: BLE001 - report every repo, whatever fails
            print(f"{s.name}: cannot reach {s.hub_id} ({type(e).__name__})")
            continue
        same = live.startswith(s.revision)
        print(f"{s.name}: pinned {s.revision[:12]} live {live[:12]} {'same' if same else 'DIFFERENT: review and pin'}")
    return 0


def cmd_download(args) -> int:
    from blip_repro.data import download

    if args.dry_run:
        for n in args.names:
            print(download.describe(n))
        return 0
    download.download(args.names, force=args.force)
    return 0


def cmd_evaluate(args) -> int:
    from blip_repro import evaluate

    return evaluate.main(["--params", args.params, *args.overrides])


def cmd_train(args) -> int:
    from blip_repro import train

    return train.main(["--params", args.params, *args.overrides])


def cmd_reproduce(args) -> int:
    from blip_repro import reproduce

    only = [s for s in (args.only or "").split(",") if s]
    path = reproduce.reproduce(args.suite, only=only, slurm=args.slurm)
    print(f"report: {path}")
    return 0


def cmd_convert(args) -> int:
    from blip_repro import convert

    out = convert.convert(args.checkpoint, args.like, args.out, allow_missing=args.allow_missing)
    print(f"wrote {out}; use it as model: {out}")
    return 0


def cmd_report(args) -> int:
    from blip_repro import reproduce

    print(reproduce.write_report(args.suite))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="blip-repro", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("zoo", help="list every model: hub id, pinned revision, task, local availability")
    p.add_argument("--check", action="store_true", help="compare pinned revisions with the hub (needs internet)")
    p.add_argument("--fetch", nargs="+", metavar="NAME", help="download these models into the HF cache")
    p.set_defaults(fn=cmd_zoo)
    p = sub.add_parser("download", help="fetch datasets into $BLIP_REPRO_DATA (verified, resumable)")
    p.add_argument("names", nargs="+", help="coco vqav2 okvqa gqa flickr30k nocaps shapes")
    p.add_argument("--force", action="store_true", help="download again even when present and verified")
    p.add_argument("--dry-run", action="store_true", help="say what would be fetched and what is manual")
    p.set_defaults(fn=cmd_download)
    for name, fn, what in (("evaluate", cmd_evaluate, "EvalConfig"), ("train", cmd_train, "TrainConfig")):
        p = sub.add_parser(name, help=f"run python -m blip_repro.{name} with a params file ({what} fields)")
        p.add_argument("--params", required=True)
        p.add_argument("overrides", nargs="*", help="key=value")
        p.set_defaults(fn=fn)
    p = sub.add_parser("reproduce", help="run every table notebook (papermill) and write the combined report")
    p.add_argument("--suite", default="shapes", choices=["shapes", "paper"])
    p.add_argument("--only", help="comma-separated notebooks, e.g. captioning,okvqa")
    p.add_argument("--slurm", action="store_true", help="submit one Slurm job per notebook instead")
    p.set_defaults(fn=cmd_reproduce)
    p = sub.add_parser("convert", help="original BLIP .pth checkpoint -> Hugging Face folder (usable as model)")
    p.add_argument("checkpoint", help="e.g. model_base_caption_capfilt_large.pth (BLIP README links)")
    p.add_argument("--like", required=True, help="zoo model giving the architecture and processor")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--allow-missing", action="store_true", help="keep a random head (pre-trained checkpoints)")
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("report", help="write the combined report from finished notebooks")
    p.add_argument("--suite", default="shapes", choices=["shapes", "paper"])
    p.set_defaults(fn=cmd_report)
    return ap


def main(argv=None) -> int:
    def _run(argv):
        args = build_parser().parse_args(argv)
        return args.fn(args)

    return run_main(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
