"""`mmalign jobs`: AlignmentJobs on the cluster, read the way a kubectl user expects.

    mmalign jobs list [-A]                     NAME PHASE STAGE STEP AGE
    mmalign jobs get NAME [-o yaml|json]       the job's row and its stages (progress, metrics)
    mmalign jobs describe NAME                 stages, outputs, conditions and recent Events
    mmalign jobs logs NAME [--stage S] [-f]    the stage's rank-0 pod; -f follows across gang restarts
    mmalign jobs wait NAME [--timeout SECONDS] exit 0 Succeeded, 1 Failed, 124 timed out
    mmalign jobs create FILE                   validate (as `mmalign validate`), then create

--kubeconfig, --context and -n/--namespace work as kubectl's, before or after the subcommand. Any other
error (no such job, the API server refused) exits 2 with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

EXIT_FAILED, EXIT_ERROR, EXIT_TIMEOUT = 1, 2, 124


def _connection_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--kubeconfig", default=default, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)"
    )
    parser.add_argument("--context", default=default, help="kubeconfig context (default: the current one)")
    parser.add_argument("-n", "--namespace", default=default, help="namespace (default: the context's)")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="mmalign jobs", description="AlignmentJobs on the cluster.")
    _connection_flags(main, None)
    # The same flags after the subcommand; SUPPRESS keeps a flag given before it from being reset.
    common = argparse.ArgumentParser(add_help=False)
    _connection_flags(common, argparse.SUPPRESS)
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", parents=[common], help="one row per job")
    listing.add_argument("-A", "--all-namespaces", action="store_true", help="jobs of every namespace")
    get = commands.add_parser("get", parents=[common], help="the job and its stages")
    get.add_argument("name")
    get.add_argument("-o", "--output", choices=("yaml", "json"), help="print the whole object")
    describe = commands.add_parser("describe", parents=[common], help="stages, outputs, conditions, Events")
    describe.add_argument("name")
    logs = commands.add_parser("logs", parents=[common], help="the stage's rank-0 pod log")
    logs.add_argument("name")
    logs.add_argument("--stage", choices=("reward", "score", "dpo"), help="default: the job's current stage")
    logs.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="stream; across gang restarts until the stage ends (without --stage: the job)",
    )
    wait = commands.add_parser("wait", parents=[common], help="until Succeeded (exit 0) or Failed (exit 1)")
    wait.add_argument("name")
    wait.add_argument("--timeout", type=float, help="seconds; then exit 124 (default: no limit)")
    wait.add_argument("--quiet", action="store_true", help="no progress lines")
    create = commands.add_parser("create", parents=[common], help="validate a YAML file, then create the job")
    create.add_argument("file")
    return main


def run(args: argparse.Namespace) -> int:
    from mmalign.client import Client, tables

    jobs = Client(args.namespace, kubeconfig=args.kubeconfig, context=args.context)
    now = tables.now_utc()
    if args.command == "list":
        found = jobs.list(all_namespaces=args.all_namespaces)
        print(
            tables.list_table(found, now, namespaces=args.all_namespaces)
            if found
            else f"No AlignmentJobs in {'any namespace' if args.all_namespaces else 'namespace ' + jobs.namespace}."
        )
    elif args.command == "get":
        job = jobs.get(args.name)
        if args.output == "json":
            print(json.dumps(job, indent=2))
        elif args.output == "yaml":
            print(yaml.safe_dump(job, sort_keys=False), end="")
        else:
            print(tables.get_text(job, now))
    elif args.command == "describe":
        job = jobs.get(args.name)
        print(tables.describe_text(job, jobs.events(args.name), now))
    elif args.command == "logs":
        pod = None

        def waiting(what: str) -> None:
            print(f"==> {what} <==", file=sys.stderr, flush=True)

        for line in jobs.logs(args.name, stage=args.stage, follow=args.follow, waiting=waiting):
            if args.follow and line.pod != pod:
                pod = line.pod
                print(
                    f"==> pod {pod} (stage {line.stage}, attempt {line.attempt}) <==",
                    file=sys.stderr,
                    flush=True,
                )
            print(line.text, flush=args.follow)
    elif args.command == "wait":
        return _wait(jobs, args)
    elif args.command == "create":
        print(f"alignmentjob.mmalign.io/{jobs.create(args.file)} created")
    return 0


def _wait(jobs: Any, args: argparse.Namespace) -> int:
    from mmalign.client import ProgressDisplay

    show = None if args.quiet else ProgressDisplay(out=sys.stderr, bar=sys.stderr.isatty())
    try:
        status = jobs.wait(args.name, timeout=args.timeout, progress=show or False, raise_on_failure=False)
    except TimeoutError as error:
        print(f"mmalign jobs wait: {error}", file=sys.stderr)
        return EXIT_TIMEOUT
    finally:
        if show is not None:
            show.close()
    print(f"{args.name}: {status.phase}" + (f": {status.message}" if status.phase == "Failed" else ""))
    return 0 if status.phase == "Succeeded" else EXIT_FAILED


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from mmalign.client import InvalidJob

    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except InvalidJob as error:
        print("\n".join(error.problems), file=sys.stderr)
        return EXIT_ERROR
    except (LookupError, OSError) as error:
        print(f"mmalign jobs: {error}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # the API server's answer (kubernetes ApiException): its reason, no traceback
        from kubernetes.client.exceptions import ApiException

        if not isinstance(error, ApiException):
            raise
        print(f"mmalign jobs: {_api_error(error, args)}", file=sys.stderr)
        return EXIT_ERROR


def _api_error(error: Any, args: argparse.Namespace) -> str:
    try:
        message = json.loads(error.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = ""
    if error.status == 404 and getattr(args, "name", None):
        return f"{message or 'not found'} (namespace {args.namespace or 'of the context'}; `mmalign jobs list` shows the jobs)"
    return f"HTTP {error.status} {error.reason}: {message}".strip()
