"""The MPIJob v2beta1 schema of the Kubeflow MPI operator v0.6.0 (vendored: tests/support/k8s/), for jsonschema.

The CRD's openAPIV3Schema embeds the core Pod template schema (k8s.io/api v0.31) for the launcher and worker
templates. The API server prunes fields a structural schema does not know, and `kubectl apply --validate=strict`
(the default since Kubernetes 1.27) refuses them; `strict` mirrors that by closing every object whose properties the
schema lists, so a misspelt field fails here too. Quantities and names get the API server's own format checks, which
the OpenAPI schema leaves out."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import yaml

CRD = Path(__file__).resolve().parent / "k8s" / "kubeflow.org_mpijobs-v0.6.0.yaml"
# resource.Quantity's grammar (k8s.io/apimachinery/pkg/api/resource): a number and an optional suffix.
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?\Z")
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*\Z")


def strict(schema):
    """A copy of an OpenAPI v3 structural schema in which every object with listed properties refuses others."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                close(v)
        elif isinstance(node, list):
            for v in node:
                close(v)

    close(schema)
    return schema


@functools.cache
def mpijob_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v2beta1"]
    return strict(version["schema"]["openAPIV3Schema"])


def pod_template_schema() -> dict:
    spec = mpijob_schema()["properties"]["spec"]
    return spec["properties"]["mpiReplicaSpecs"]["additionalProperties"]["properties"]["template"]


def container_schema() -> dict:
    return pod_template_schema()["properties"]["spec"]["properties"]["containers"]["items"]


def problems(doc: dict) -> list[str]:
    """Every way `doc` (an MPIJob) breaks the CRD schema, the core Pod/Container schema or the API server's format
    rules for names, environment variables and resource quantities; [] when it would be accepted."""
    import jsonschema  # deferred: a test-only dependency (requirements.txt)

    out = []
    for schema, part, where in [(mpijob_schema(), doc, "MPIJob")] + [
            (pod_template_schema(), t.get("template", {}), f"{role} template")
            for role, t in doc.get("spec", {}).get("mpiReplicaSpecs", {}).items()]:
        validator = jsonschema.Draft7Validator(schema)
        out += [f"{where}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(part)]
    name = doc.get("metadata", {}).get("name", "")
    if not DNS1123_LABEL.match(name) or len(name) > 63 - len("-worker-999") or not name[:1].isalpha():
        out.append(f"metadata.name {name!r}: not a DNS-1035 label short enough for '<name>-worker-<i>'")
    for role, rs in doc.get("spec", {}).get("mpiReplicaSpecs", {}).items():
        spec = rs.get("template", {}).get("spec", {})
        cvalidator = jsonschema.Draft7Validator(container_schema())
        for c in spec.get("containers", []):
            out += [f"{role} container: {e.message}" for e in cvalidator.iter_errors(c)]
            if not DNS1123_LABEL.match(c.get("name", "")):
                out.append(f"{role} container name {c.get('name')!r} is not a DNS-1123 label")
            for e in c.get("env", []):
                if not ENV_NAME.match(e["name"]):
                    out.append(f"{role} env name {e['name']!r} is invalid")
                if ("value" in e) == ("valueFrom" in e):
                    out.append(f"{role} env {e['name']}: exactly one of value and valueFrom")
            for kind in ("limits", "requests"):
                for res, q in c.get("resources", {}).get(kind, {}).items():
                    if not QUANTITY.match(str(q)):
                        out.append(f"{role} {kind}.{res} {q!r} is not a quantity")
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            missing = mounts - {v["name"] for v in spec.get("volumes", [])}
            if missing:
                out.append(f"{role} mounts volumes that are not declared: {sorted(missing)}")
    return out
