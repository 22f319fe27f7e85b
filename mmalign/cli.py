"""The ``mmalign`` command: ``mmalign list`` and ``mmalign <domain> <job> --config FILE key=value ...``."""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from mmalign.registry import JOBS, REGISTRIES, resolve

_KIND_TITLES = {
    "losses": "losses",
    "teachers": "teachers (simulated humans)",
    "reward_models": "reward models",
    "query_selectors": "query selectors",
    "jobs": "jobs (mmalign <domain> <job>)",
}


def _env_ids() -> list[str]:
    import gymnasium

    import mmalign.envs  # noqa: F401  (registers the mmalign/ ids)

    return sorted(k for k in gymnasium.registry if k.startswith("mmalign/"))


def cmd_list(kind: str | None) -> int:
    kinds = [kind] if kind else [*REGISTRIES, "envs"]
    for k in kinds:
        if k == "envs":
            print("envs (gymnasium ids)")
            for env_id in _env_ids():
                spec = __import__("gymnasium").spec(env_id)
                print(f"  {env_id:<38} {spec.entry_point}")
            continue
        reg = REGISTRIES[k]
        print(_KIND_TITLES.get(k, k))
        for entry in reg.entries():
            name = entry.name.replace(".", " ") if k == "jobs" else entry.name
            print(f"  {name:<38} {entry.summary}")
    return 0


def _domains() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in JOBS.names():
        domain, _, job = name.partition(".")
        out.setdefault(domain, []).append(job)
    return out


def _job_help(name: str) -> str:
    from mmalign.config import config_help

    entry = JOBS.entry(name)
    cfg_cls = resolve(entry.extra["config"])  # type: ignore[index]
    lines = [entry.summary, "", f"config fields ({cfg_cls.__name__}; set with key=value, nested with a.b=value):"]
    lines += config_help(cfg_cls)
    if entry.extra and entry.extra.get("default_config"):
        lines += ["", f"example: mmalign {name.replace('.', ' ')} --config {entry.extra['default_config']}"]
    return "\n".join(lines)


def _default_run_dir(name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name.replace('.', '-')}-{stamp}"


# Errors caused by a user's input (config, files, folders): one line on stderr and exit code 2, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from mmalign.train.errors import CheckpointError, RunLockedError

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
            KeyError, CheckpointError, RunLockedError)


def run_job(
    name: str,
    config_path: str | None,
    overrides: Sequence[str],
    output_dir: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Validate the config and the job's inputs, then make and lock the run folder and run the job.

    A job's module may define ``validate(cfg, resume)``: checks of its data, model paths and env ids (and whether it
    supports ``--resume``) that raise before anything is created. A new run that fails before it saved progress
    leaves no folder behind (see :mod:`mmalign.train.run_folder`).
    """
    from mmalign.config import load_config
    from mmalign.train.run_folder import RunFolder, has_progress

    entry = JOBS.entry(name)
    cfg_cls = resolve(entry.extra["config"])  # type: ignore[index]
    cfg = load_config(cfg_cls, config_path, overrides, job=name)
    run_dir = Path(output_dir) if output_dir else _default_run_dir(name)
    # Under torchrun / accelerate launch every process runs this; only the main one checks and writes the folder.
    main_process = int(os.environ.get("RANK", "0")) == 0
    job = entry.load()
    if resume and "resume" not in inspect.signature(job).parameters:
        raise ValueError(f"--resume is not supported by {name} (it keeps no progress to continue from); start a new "
                         f"run in a new --output-dir")
    module = sys.modules.get(job.__module__)
    validate = getattr(module, "validate", None)
    if validate is not None:
        validate(cfg, resume)
    folder = RunFolder(run_dir, name, resume, main=main_process)
    folder.check(cfg)
    folder.open(cfg)
    progress = getattr(module, "has_progress", has_progress)
    try:
        summary = job(cfg, run_dir, **({"resume": True} if resume else {})) or {}
        if main_process:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    except BaseException as err:
        removed = folder.close(True, progress)
        if isinstance(err, _user_errors()):
            err.mmalign_in_job = True  # type: ignore[attr-defined]  # main() then says where it was raised
            err.mmalign_removed = str(run_dir) if removed else ""  # type: ignore[attr-defined]
        elif removed:
            print(f"[mmalign] the run failed before saving any progress: removed {run_dir}", file=sys.stderr)
        raise
    folder.close(False)
    close_process_group()
    return summary


def close_process_group() -> None:
    """Under torchrun, tear the process group down explicitly once the job is done: gloo groups left to the
    destructors at interpreter exit can abort a rank ("terminate called without an active exception")."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; only the job named in ``argv`` imports its config class (for its --help)."""
    parser = argparse.ArgumentParser(
        prog="mmalign",
        description="mmalign: aligning multimodal and embodied models with human preferences.",
        epilog="Run 'mmalign list' to see every loss, teacher, reward model, query selector, env and job.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{list," + ",".join(_domains()) + "}")
    p_list = sub.add_parser("list", help="show registered losses, teachers, reward models, selectors, envs, jobs")
    p_list.add_argument("kind", nargs="?", choices=[*REGISTRIES, "envs"], help="show only this kind")
    for domain, jobs in _domains().items():
        p_dom = sub.add_parser(domain, help=f"{domain} jobs: {', '.join(jobs)}", description=f"{domain} jobs")
        p_dom.set_defaults(job=None)
        dsub = p_dom.add_subparsers(dest="job", metavar="{" + ",".join(jobs) + "}")
        for job in jobs:
            name = f"{domain}.{job}"
            wanted = len(argv) >= 2 and argv[0] == domain and argv[1] == job
            p_job = dsub.add_parser(
                job,
                help=JOBS.entry(name).summary.replace("%", "%%"),  # argparse %-formats help strings
                description=_job_help(name) if wanted else JOBS.entry(name).summary,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            p_job.add_argument("--config", help="YAML file with config values (see configs/)")
            p_job.add_argument("--output-dir", help="run folder (default runs/<domain>-<job>-<time>)")
            p_job.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
            p_job.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (``--resume lr=0.1``), where argparse stops collecting them.
    bad = [tok for tok in extra if tok.startswith("-") or "=" not in tok]
    if bad or (extra and getattr(args, "overrides", None) is None):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "list":
        return cmd_list(args.kind)
    if getattr(args, "job", None) is None:
        parser.parse_args([args.command, "--help"])
        return 0
    name = f"{args.command}.{args.job}"
    try:
        summary = run_job(name, args.config, args.overrides, args.output_dir, args.resume)
    except _user_errors() as err:
        if os.environ.get("MMALIGN_DEBUG", "") not in ("", "0"):
            raise
        # a one-line message for bad input; for an error from inside the running job also where it was raised,
        # so that a bug there is not hidden behind a bare message
        tb = traceback.extract_tb(err.__traceback__) if getattr(err, "mmalign_in_job", False) else []
        where = f" (raised at {tb[-1].filename}:{tb[-1].lineno}; MMALIGN_DEBUG=1 shows the traceback)" if tb else ""
        if getattr(err, "mmalign_removed", ""):
            where += f"; nothing was saved, so the run folder {err.mmalign_removed} was removed"  # type: ignore[attr-defined]
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError's str() adds quotes
        print(f"mmalign: error: {message}{where}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2, default=str))
    if "deepspeed" in sys.modules and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DeepSpeed keeps gloo groups referenced past destroy_process_group (its world group, the engine's data
        # parallel group, each ZeRO-3 parameter's group); left to exit-time destructors, each rank tears them down
        # on its own while the other may have closed its side, and a finished job can abort ("terminate called
        # without an active exception"). The job has written everything and close_process_group() has run in step
        # on every rank: leave without those destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
