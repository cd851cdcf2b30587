"""`mmalign` command line: one entry point, one module per command.

Each command lives in the module that owns it and exposes ``main(argv) -> int``; only that module is
imported, so `mmalign validate` never pays for importing torch.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). Modules keep heavy imports (torch, kopf) inside functions.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("mmalign.operator.validate", "check AlignmentJob YAML files offline (field path + line)"),
    "crds": ("mmalign.operator.crds", "write the CRD YAML generated from the API models"),
    "operator": ("mmalign.operator.main", "run the operator against the current kubeconfig"),
    "launch": ("mmalign.trainer.launch", "pod entry point: wait for rendezvous DNS, then torchrun a stage"),
    "train": ("mmalign.trainer.train", "run one stage of a job (the torchrun worker)"),
    "run": ("mmalign.trainer.run", "run a job's stages on this machine (torchrun, --local)"),
    "data": ("mmalign.trainer.data_inspect", "inspect a preference dataset: `mmalign data inspect FILE`"),
    "metrics": ("mmalign.trainer.metrics_report", "RewardBench Acc/Acc+ of a scored-pairs file"),
    "jobs": ("mmalign.client.cli", "AlignmentJobs on the cluster: `mmalign jobs list|get|describe|logs|wait`"),
    "dev": ("mmalign.devcluster.cli", "local control plane: `mmalign dev up|down|env|logs`"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: mmalign COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from mmalign import __version__

        print(__version__)
        return 0
    if args[0] not in COMMANDS:
        print(f"mmalign: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
