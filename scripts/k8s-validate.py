#!/usr/bin/env python3
"""Validate Kubernetes manifests offline.

Usage: python3 scripts/k8s-validate.py [--k8s-version 1.30.0] FILE.yaml...

Every YAML document in every FILE is checked:
  * MPIJob (kubeflow.org/v2beta1): against k8s/schema/mpijob-v2beta1.schema.json (jsonschema,
    draft 7); its metadata as core/v1 ObjectMeta and each mpiReplicaSpecs.<Launcher|Worker>.template
    as a core/v1 PodTemplate, both with kubernetes-validate in strict mode;
  * anything else: with kubernetes-validate in strict mode (unknown fields are errors).
One line per document: `ok kind/name` or `FAIL kind/name: reason`. Exit status 1 if any failed.

Needs: pip install kubernetes-validate (brings jsonschema, PyYAML and the bundled schemas).
"""

import argparse
import json
import os
import sys

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml
from packaging.version import InvalidVersion, Version

DEFAULT_K8S_VERSION = "1.30.0"
SCHEMA_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "k8s", "schema", "mpijob-v2beta1.schema.json"
)
MPIJOB_API_VERSION = "kubeflow.org/v2beta1"


def json_path(path):
    out = ""
    for p in path:
        out += "[%d]" % p if isinstance(p, int) else ("." if out else "") + str(p)
    return out or "<root>"


def k8s_validate(obj, version):
    """Strict kubernetes-validate check; returns a list of error strings (empty if valid)."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = json_path(getattr(e, "absolute_path", None) or getattr(e, "path", []))
        return ["%s: %s" % (path, e.message)]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    except kv_utils.VersionNotSupportedError as e:
        return [e.message]
    except kubernetes_validate.InvalidSchemaError as e:
        return [e.message]
    return []


def validate_mpijob(doc, version, validator):
    errors = [
        "%s: %s" % (json_path(e.absolute_path), e.message)
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    name = doc.get("metadata", {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    name = name or "mpijob"
    # ObjectMeta, checked strictly by borrowing a ConfigMap (which has no required fields besides it).
    if isinstance(doc.get("metadata"), dict):
        errors += k8s_validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}, version
        )
    specs = (doc.get("spec") or {}).get("mpiReplicaSpecs") if isinstance(doc.get("spec"), dict) else None
    if isinstance(specs, dict):
        for replica, rspec in specs.items():
            if not isinstance(rspec, dict) or not isinstance(rspec.get("template"), dict):
                continue  # already reported by the JSON schema
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "%s-%s" % (name, str(replica).lower())},
                "template": rspec["template"],
            }
            # The error path inside the wrapper starts with "template", so rebase it on the replica.
            for err in k8s_validate(wrapped, version):
                errors.append("spec.mpiReplicaSpecs.%s.%s" % (replica, err))
    return errors


def doc_label(doc):
    kind = doc.get("kind") or "?"
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = meta.get("name") or meta.get("generateName") or "?"
    return "%s/%s" % (kind, name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k8s-version", default=DEFAULT_K8S_VERSION,
                    help="Kubernetes version whose schemas to use (default %%(default)s; bundled: %s)"
                    % ", ".join(sorted(set(kv_utils.all_versions()), key=Version)))
    ap.add_argument("--schema", default=SCHEMA_PATH, help="MPIJob JSON schema (default: %(default)s)")
    ap.add_argument("files", nargs="+", metavar="FILE.yaml")
    args = ap.parse_args(argv)
    bundled = kv_utils.all_versions()
    try:
        wanted = Version(kv_utils.major_minor(args.k8s_version.lstrip("v")))
    except InvalidVersion:
        ap.error("--k8s-version %r is not a version" % args.k8s_version)
    if not Version(kv_utils.major_minor(bundled[0])) <= wanted <= Version(kv_utils.major_minor(bundled[-1])):
        ap.error("--k8s-version %s: kubernetes-validate %s bundles schemas for %s to %s only"
                 % (args.k8s_version, kubernetes_validate.version.__version__, bundled[0], bundled[-1]))

    with open(args.schema) as f:
        schema = json.load(f)
    jsonschema.Draft7Validator.check_schema(schema)
    mpijob_validator = jsonschema.Draft7Validator(schema)

    failed = 0
    for path in args.files:
        try:
            with open(path) as f:
                docs = list(yaml.safe_load_all(f))
        except (OSError, yaml.YAMLError) as e:
            print("FAIL %s: %s" % (path, str(e).replace("\n", " ")))
            failed += 1
            continue
        for i, doc in enumerate(docs):
            if doc is None:
                continue  # empty document (e.g. a trailing ---)
            if not isinstance(doc, dict):
                print("FAIL %s#%d: document is a %s, not a mapping" % (path, i, type(doc).__name__))
                failed += 1
                continue
            label = doc_label(doc)
            if not doc.get("apiVersion") or not doc.get("kind"):
                errors = ["apiVersion and kind are required"]
            elif doc.get("kind") == "MPIJob" and doc.get("apiVersion") == MPIJOB_API_VERSION:
                errors = validate_mpijob(doc, args.k8s_version, mpijob_validator)
            else:
                errors = k8s_validate(doc, args.k8s_version)
            if errors:
                failed += 1
                print("FAIL %s: %s" % (label, "; ".join(errors)))
            else:
                print("ok %s" % label)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
