"""The AlignmentJob API in one package: everything the operator and the trainer must agree on.

    groupversion  the resource's identity: group, version, kind, plural, short names
    spec          the spec models (pydantic, no torch): CRD schema, `mmalign validate`, the trainer's input
    status        the status models the operator writes
    conditions    condition types, the reasons the operator sets, the event reasons
    exit_codes    the trainer's exit codes, which the operator's failure policy reads
    keys          label, annotation and environment-variable names on the pods
    progress      the progress line (trainer -> operator through the pod log) and its one parser
    layout        where a job's files live under `spec.storage.uri`: URIs, marker and shard names
    jobfile       the job document the operator writes into the ConfigMap and the trainer reads

Nothing outside this package spells these names. It imports pydantic and PyYAML only, so the slim
operator image and the trainer both carry it.
"""
