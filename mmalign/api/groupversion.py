"""The AlignmentJob resource's identity (kubebuilder's groupversion_info.go, for this API)."""

from __future__ import annotations

API_GROUP = "mmalign.io"
API_VERSION = "v1alpha1"
API_VERSION_FULL = f"{API_GROUP}/{API_VERSION}"
KIND = "AlignmentJob"
PLURAL = "alignmentjobs"
SINGULAR = "alignmentjob"
SHORT_NAMES = ["aj"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"
