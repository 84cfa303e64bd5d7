"""`blip-repro reproduce`: run every table notebook through papermill (here, or one Slurm job each), then write one
report with every table (ours / paper / delta) and links to the figures.

    blip-repro reproduce --suite shapes                   # every table on the built-in benchmark, offline
    blip-repro reproduce --suite paper --only okvqa,gqa   # the paper's settings (needs the data and weights)
    blip-repro reproduce --suite paper --slurm            # one `jobs/run_eval.job` per experiment
    blip-repro report --suite paper                       # the report again, from what has finished

An experiment is a notebook and a params file: params/shapes/<notebook>.yaml for the shapes suite, every
params/<notebook>/*.yaml for the paper suite. Its executed notebook is outputs/notebooks/<notebook>_<suite>.ipynb
(paper: <notebook>_paper_<experiment>.ipynb; jobs/run_eval.job uses the same names), with a copy of the
summary.json the notebook wrote beside it, because the next experiment of the same notebook overwrites that file.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from blip_repro.errors import UserError

# The table notebooks, in report order. A suite runs those that exist and have params for it (module docstring);
# notebooks not listed here but with params are run after them, so a new table is never skipped silently.
TABLES = ("retrieval", "captioning", "vqav2", "gqa", "okvqa", "finetune")
SUITES = {"shapes": TABLES, "paper": TABLES}
POLL_SECONDS = 10  # how often --slurm looks at the queue
# Notebooks whose paper experiments are recipe files handed to one parameter: params/finetune/*.yaml are TrainConfig
# recipes, not notebook parameters. The template for your own data and the shapes recipe are not paper runs.
RECIPES = {"finetune": ("recipe", ("own_json", "shapes_json"))}


@dataclass(frozen=True)
class Experiment:
    root: Path  # the checkout
    name: str  # notebook stem: notebooks/<name>.ipynb, outputs/<name>/
    params: Path
    stem: str  # <name>_<suite>[_<experiment>]: the executed notebook and its summary copy
    recipe_parameter: str = ""  # set: `params` is a recipe, passed as this notebook parameter (RECIPES)

    @property
    def notebook(self) -> Path:
        return self.root / "notebooks" / f"{self.name}.ipynb"

    @property
    def executed(self) -> Path:
        from blip_repro.runs import outputs_root

        return outputs_root() / "notebooks" / f"{self.stem}.ipynb"

    @property
    def summary_copy(self) -> Path:
        return self.executed.with_suffix(".summary.json")

    def parameters(self) -> dict:
        from blip_repro.runs import load_params

        if self.recipe_parameter:
            return {self.recipe_parameter: self.params.relative_to(self.root).as_posix(), "suite": "paper"}
        return load_params(self.params)


def checkout() -> Path:
    from blip_repro.fileio import project_root

    root = project_root()
    if not (root / "notebooks").is_dir() or not (root / "params").is_dir():
        raise UserError(f"{root} holds no notebooks/ and params/: run blip-repro reproduce inside the checkout")
    return root


def experiments(suite: str, only: list[str] | None = None, root: Path | None = None) -> list[Experiment]:
    """Every experiment of a suite, in report order; `only` keeps those notebooks (an unknown name is an error)."""
    if suite not in SUITES:
        raise UserError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
    root = root or checkout()
    names = [n for n in SUITES[suite] if (root / "notebooks" / f"{n}.ipynb").exists()]
    names += sorted(p.stem for p in (root / "notebooks").glob("*.ipynb") if p.stem not in names)
    out = []
    for name in names:
        if suite == "shapes":
            files = [root / "params" / "shapes" / f"{name}.yaml"]
            out += [Experiment(root, name, f, f"{name}_shapes") for f in files if f.exists()]
        else:
            files = sorted((root / "params" / name).glob("*.yaml")) if name != "shapes" else []
            parameter, skip = RECIPES.get(name, ("", ()))
            out += [Experiment(root, name, f, f"{name}_paper_{f.stem}", parameter) for f in files if f.stem not in skip]
    if only:
        valid = sorted({e.name for e in out})
        unknown = [n for n in only if n not in valid]
        if unknown:
            raise UserError(f"--only {unknown[0]}: no such notebook with {suite} params; valid: {', '.join(valid)}")
        out = [e for e in out if e.name in only]
    return out


def kernel_name() -> str:
    """The kernel create_env.sh registers, else the default kernel of the Python running this."""
    from jupyter_client.kernelspec import find_kernel_specs

    return "blip-repro" if "blip-repro" in find_kernel_specs() else "python3"


def reproduce(suite: str, only: list[str] | None = None, slurm: bool = False) -> Path:
    """Run the suite's notebooks (continuing past failures), write the report, and raise UserError naming the
    notebooks that failed (so the command exits non-zero) after the report is written."""
    exps = experiments(suite, only)
    if not exps:
        raise UserError(f"no notebook has {suite} params (params/shapes/<notebook>.yaml or params/<notebook>/*.yaml)")
    errors = run_slurm(exps) if slurm else {e.stem: run_local(e, i, len(exps)) for i, e in enumerate(exps, 1)}
    errors = {k: v for k, v in errors.items() if v}
    path = write_report(suite, errors=errors)
    if errors:
        raise UserError(f"{len(errors)} of {len(exps)} notebooks failed ({', '.join(errors)}); report: {path}")
    return path


def run_local(exp: Experiment, i: int = 1, n: int = 1) -> str:
    """Execute one experiment with papermill, cell output streamed to this terminal; '' on success, else the error."""
    import papermill

    log = logging.getLogger("papermill")
    if not log.handlers:  # papermill's CLI configures this logger; here we must, or --log-output shows nothing
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    root = exp.root
    print(f"[{i}/{n}] {exp.name}: {exp.params.relative_to(root)} -> {exp.executed}", file=sys.stderr, flush=True)
    t0 = time.time()
    exp.executed.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(str(exp.notebook), str(exp.executed), parameters=exp.parameters(),
                                   kernel_name=kernel_name(), log_output=True, progress_bar=False, cwd=str(root))
    except Exception as e:  # noqa: BLE001 - any failure of one notebook is reported and the suite goes on
        error = _one_line(e)
        print(f"[{i}/{n}] {exp.name} FAILED after {time.time() - t0:.0f} s: {error}", file=sys.stderr, flush=True)
        return error
    _copy_summary(exp, since=t0)
    print(f"[{i}/{n}] {exp.name} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return ""


def _one_line(e: BaseException) -> str:
    if hasattr(e, "ename"):  # papermill.PapermillExecutionError: the notebook's own exception, as in the report
        evalue = str(e.evalue or "").strip().splitlines()
        return f"{e.ename}: {evalue[0] if evalue else ''}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _copy_summary(exp: Experiment, since: float) -> None:
    from blip_repro.fileio import atomic_write_bytes
    from blip_repro.runs import outputs_root

    summary = outputs_root() / exp.name / "summary.json"
    if summary.exists() and summary.stat().st_mtime >= since - 1:
        atomic_write_bytes(exp.summary_copy, summary.read_bytes())


def run_slurm(exps: list[Experiment]) -> dict[str, str]:
    """Submit one jobs/run_eval.job per experiment, print the job ids, wait for all of them (Ctrl-C stops waiting,
    not the jobs), and return each experiment's error read from its executed notebook ('' when it finished)."""
    import shutil

    if not shutil.which("sbatch"):
        raise UserError("--slurm: sbatch not found; run this on a Slurm login node, or leave out --slurm")
    import yaml

    from blip_repro.fileio import atomic_write_text

    errors, ids, t0 = {}, {}, time.time()
    for e in exps:
        params = e.params.relative_to(e.root)
        if e.recipe_parameter:  # the job takes a params file: write the notebook's parameters to one
            params = atomic_write_text(e.executed.with_suffix(".params.yaml"), yaml.safe_dump(e.parameters()))
        env = {**os.environ, "NOTEBOOK": str(e.notebook.relative_to(e.root)), "PARAMS": str(params),
               "OUTPUT": str(e.executed)}
        e.executed.parent.mkdir(parents=True, exist_ok=True)
        log = e.executed.with_name(f"{e.stem}-%j.out")  # beside the executed notebook, not in the checkout
        proc = subprocess.run(["sbatch", "--parsable", f"--job-name=blip-{e.stem}", f"--output={log}",
                               "jobs/run_eval.job"], cwd=e.root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            errors[e.stem] = f"sbatch failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
            print(f"{e.stem}: {errors[e.stem]}", file=sys.stderr)
            continue
        ids[e.stem] = proc.stdout.strip().split(";")[0]
        print(f"submitted {e.stem}: job {ids[e.stem]}", file=sys.stderr, flush=True)
    if ids:
        print(f"waiting for jobs {','.join(ids.values())} (logs: {exps[0].executed.parent}/<name>-<job id>.out); "
              "Ctrl-C stops waiting, the jobs go on; then `blip-repro report --suite ...`", file=sys.stderr,
              flush=True)
        wait_for_jobs(list(ids.values()))
    for e in exps:
        if e.stem in ids:
            status, error = notebook_status(e.executed, since=t0)
            errors[e.stem] = "" if status == "ok" else (error or status)
            copied = e.summary_copy.exists() and e.summary_copy.stat().st_mtime >= t0  # by the job itself
            if status == "ok" and not copied:
                _copy_summary(e, since=t0)
    return errors


def wait_for_jobs(job_ids: list[str], poll: float = POLL_SECONDS) -> None:
    """Until none of the jobs is in the queue (a requeued job is pending again, so it is waited for too)."""
    while True:
        proc = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
        if proc.returncode == 0 and not proc.stdout.strip():
            return
        if proc.returncode != 0 and "Invalid job id" in proc.stderr:  # all finished and purged
            return
        time.sleep(poll)


def notebook_status(path: Path, since: float | None = None) -> tuple[str, str]:
    """('ok' | 'failed' | 'incomplete' | 'not run', one-line error) read from an executed notebook."""
    if not path.exists() or (since is not None and path.stat().st_mtime < since):
        return "not run", ""
    try:
        nb = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "incomplete", f"{path} is not a readable notebook"
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                evalue = (out.get("evalue") or "").strip().splitlines()
                return "failed", f"{out.get('ename')}: {evalue[0] if evalue else ''}"
    meta = nb.get("metadata", {}).get("papermill", {})
    if meta.get("exception") or not meta.get("end_time"):
        return "incomplete", "the notebook did not finish (still running, or killed)"
    return "ok", ""


def write_report(suite: str, errors: dict[str, str] | None = None) -> Path:
    """outputs/report_<suite>.md: every experiment of the suite with the status of its last executed notebook (run
    now or earlier), then per notebook its table (ours / paper / delta, from the summaries the notebooks wrote),
    the shapes checks and the figures. `errors`: failures that left no executed notebook to read them from."""
    from blip_repro import report
    from blip_repro.fileio import atomic_write_text
    from blip_repro.runs import outputs_root

    path = outputs_root() / f"report_{suite}.md"
    exps = experiments(suite)
    status = {e.stem: notebook_status(e.executed) for e in exps}
    for stem, err in (errors or {}).items():
        if err and status.get(stem, ("",))[0] != "failed":  # e.g. the kernel did not start: no executed notebook
            status[stem] = ("failed", err)
    tables = {}
    for name in dict.fromkeys(e.name for e in exps):
        summaries = _summaries([e for e in exps if e.name == name], suite, status)
        if summaries:
            tables[name] = _merge(summaries)
    rows = [r for t in tables.values() for r in t[0]]
    checks = [c for t in tables.values() for c in t[1]]
    commit = _git_commit(exps[0].root) if exps else ""
    lines = [f"# Reproduction report: {suite} suite", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M')}{' at git ' + commit if commit else ''} by "
             f"`blip-repro reproduce --suite {suite}` (`blip-repro report --suite {suite}` rewrites it). "
             + "; ".join(_totals(status, rows, checks)) + ".",
             "", "| notebook | params | status | executed notebook |", "|---|---|---|---|"]
    for e in exps:
        st, err = status[e.stem]
        link = f"[{e.executed.name}]({_rel(e.executed, path)})" if e.executed.exists() else "—"
        lines.append(f"| {e.name} | {e.params.relative_to(e.root)} | {st}{': ' + err if err else ''} | {link} |")
    for name, (rows, checks, figures, extra) in tables.items():
        lines += ["", *_table_section(name, rows, checks, figures, path, report, extra)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _totals(status: dict, rows: list, checks: list) -> list[str]:
    out = [f"{sum(st == 'ok' for st, _ in status.values())} of {len(status)} notebooks finished"]
    compared = [r for r in rows if r.get("status")]
    if compared:
        out.append(f"{sum(r['status'] == 'within' for r in compared)} of {len(compared)} numbers within the "
                   f"paper's tolerance")
    if checks:
        out.append(f"{sum(bool(c.get('passed')) for c in checks)} of {len(checks)} checks passed")
    return out


def _summaries(exps: list[Experiment], suite: str, status: dict) -> list[tuple[str, dict]]:
    """(experiment stem, summary) of every finished experiment; outputs/<name>/summary.json when none was copied."""
    from blip_repro.runs import outputs_root

    out = [(e.stem, json.loads(e.summary_copy.read_text())) for e in exps
           if status[e.stem][0] == "ok" and e.summary_copy.exists()]
    latest = outputs_root() / exps[0].name / "summary.json"
    if not out and latest.exists():
        summary = json.loads(latest.read_text())
        if summary.get("suite") == suite:
            out.append((exps[0].stem, summary))
    return out


def _merge(summaries: list[tuple[str, dict]]) -> tuple[list, list, list, dict]:
    """One notebook's rows (each once: a later summary repeats earlier runs' rows), checks, figures and further
    tables (summary["tables"]: {"id", "title", "columns", "rows", "note"}; the last summary's version of each id)."""
    rows, checks, figures, extra = [], [], [], {}
    for stem, s in summaries:
        rows += [r for r in s.get("rows", []) if r not in rows]
        checks += [{"experiment": stem, **c} for c in s.get("checks", [])]
        figures += [f for f in s.get("figures", []) if f not in figures]
        extra.update({t.get("id") or t.get("title"): t for t in s.get("tables", [])})
    return rows, checks, figures, extra


def _table_section(name: str, rows: list, checks: list, figures: list, path: Path, report,
                   extra: dict | None = None) -> list[str]:
    out = [f"## {name}", ""]
    if name in report.SOURCES:
        out += [f"Paper: {report.SOURCES[name]}.", ""]
    rows = [{**r, "Δ": r.get("delta")} for r in rows]
    out.append(report.markdown(rows, ("model", "dataset", "metric", "ours", "paper", "Δ", "tolerance", "status", "n",
                                      "note")).rstrip())
    for t in (extra or {}).values():
        out += ["", f"### {t.get('title', '')}", "", report.markdown(t["rows"], t["columns"]).rstrip()]
        out += ["", t["note"]] if t.get("note") else []
    if checks:
        passed = sum(bool(c.get("passed")) for c in checks)
        out += ["", f"Checks on the built-in benchmark: {passed} of {len(checks)} passed.", "",
                report.markdown(checks, ("experiment", "check", "value", "minimum", "passed")).rstrip()]
    for stem in dict.fromkeys(Path(f).with_suffix("") for f in figures):
        exts = [f for f in figures if Path(f).with_suffix("") == stem]
        png = next((f for f in exts if f.endswith(".png")), None)
        if png:
            out += ["", f"![{stem.name}]({_rel(Path(png), path)})"]
        out += ["", "Figure: " + " · ".join(f"[{Path(f).suffix[1:].upper()}]({_rel(Path(f), path)})" for f in exts)]
    return out


def _rel(target: Path, report_path: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), report_path.parent.resolve())).as_posix()


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
