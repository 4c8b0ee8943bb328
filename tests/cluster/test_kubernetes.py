"""Kubernetes: the DaskCluster the backend builds, and the manifests in cluster/kubernetes/,
checked against the Dask operator's own CRD schemas (no Kubernetes cluster runs here).

The CRDs are the ones the installed dask-kubernetes ships for its Helm chart. Kubernetes
prunes unknown fields silently, so the check is stricter than the API server: every
field must be one the schema names.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.cluster import check_cluster, cluster_shape
from pipeline.cluster.kubernetes import cluster_spec
from pipeline.config import parse_workflow
from tests.helpers import REPO

BASE = {"input": {"path": "a.tif"}, "model": {"arch": "unet", "num_classes": 2}, "output": {"path": "o.zarr"}}
MANIFESTS = REPO / "cluster" / "kubernetes"


def _crd(kind: str) -> dict[str, Any]:
    import dask_kubernetes

    folder = Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"
    crd = yaml.safe_load((folder / f"{kind.lower()}.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def _strict(schema: Any) -> Any:
    """OpenAPI v3 structural schema -> JSON schema that refuses fields it does not name."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _validate(document: dict[str, Any], kind: str) -> None:
    assert document["apiVersion"] == "kubernetes.dask.org/v1" and document["kind"] == kind
    body = {k: v for k, v in document.items() if k not in ("apiVersion", "kind", "metadata")}
    jsonschema.validate(body, _crd(kind))


def _cfg(**fields):
    return parse_workflow({**BASE, "cluster": {"kind": "kubernetes", **fields}}, source="w.yaml").cluster


def test_the_generated_daskcluster_matches_the_operator_schema() -> None:
    cfg = _cfg(image="ghcr.io/x/gigaseg:1", n_workers=3, namespace="imaging",
               resources={"cpu": "4", "memory": "16Gi"}, environment={"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"})  # fmt: skip
    shape = cluster_shape(cfg, "cpu")
    spec = cluster_spec(cfg, shape, ["pipeline.worker_preload"])
    _validate(spec, "DaskCluster")
    assert spec["metadata"] == {"name": "gigaseg", "namespace": "imaging"}
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 3
    container = worker["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/x/gigaseg:1"
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}
    env = {e["name"]: e["value"] for e in container["env"]}
    # 4 cores: 5 Dask threads, at most 4 forward passes at once (the split is measured at run start)
    assert env["OMP_NUM_THREADS"] == env["PIPELINE_TORCH_THREADS"] == "1" and env["PIPELINE_CORES"] == "4"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.mmap_threshold=1"
    args = container["args"]
    assert args[args.index("--nthreads") + 1] == "5" and args[args.index("--preload") + 1] == "pipeline.worker_preload"
    assert "--resources" not in args


def test_gpu_workers_get_one_device_each_and_the_gpu_resource() -> None:
    cfg = _cfg(image="ghcr.io/x/gigaseg:1-cuda", n_workers=4, gpus_per_worker=1, resources={"cpu": "8", "memory": "32Gi"})
    spec = cluster_spec(cfg, cluster_shape(cfg, "auto"), ["pipeline.worker_preload"])
    _validate(spec, "DaskCluster")
    container = spec["spec"]["worker"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = container["args"]
    assert args[args.index("--resources") + 1] == "GPU=2" and args[args.index("--nthreads") + 1] == "2"


def test_the_schema_check_can_fail() -> None:
    cfg = _cfg(image="img")
    spec = cluster_spec(cfg, cluster_shape(cfg, "cpu"), [])
    wrong = copy.deepcopy(spec)
    wrong["spec"]["worker"]["replicas"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        _validate(wrong, "DaskCluster")
    misspelt = copy.deepcopy(spec)
    misspelt["spec"]["worker"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(jsonschema.ValidationError, match="'resource' was unexpected"):
        _validate(misspelt, "DaskCluster")


def test_the_deployment_manifests_match_the_operator_and_pod_schemas() -> None:
    cluster_docs = list(yaml.safe_load_all((MANIFESTS / "daskcluster.yaml").read_text()))
    assert [d["kind"] for d in cluster_docs] == ["DaskCluster", "DaskWorkerGroup"]
    _validate(cluster_docs[0], "DaskCluster")
    _validate(cluster_docs[1], "DaskWorkerGroup")
    gpu = cluster_docs[1]["spec"]["worker"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1" and "GPU=2" in gpu["args"]
    assert cluster_docs[1]["spec"]["cluster"] == cluster_docs[0]["metadata"]["name"]

    config_map, job = yaml.safe_load_all((MANIFESTS / "driver-job.yaml").read_text())
    assert (config_map["kind"], job["apiVersion"], job["kind"]) == ("ConfigMap", "batch/v1", "Job")
    # a Job's pod template is a PodSpec: the same schema the operator embeds for its pods
    pod_schema = _crd("DaskCluster")["properties"]["spec"]["properties"]["worker"]["properties"]["spec"]
    jsonschema.validate(job["spec"]["template"]["spec"], pod_schema)
    driver = job["spec"]["template"]["spec"]["containers"][0]
    assert driver["args"][:2] == ["pipeline", "run"] and "--resume" in driver["args"]
    # the workflow it runs is a valid workflow that joins the operator's scheduler service
    workflow = parse_workflow(yaml.safe_load(config_map["data"]["workflow.yaml"]), source="driver-job.yaml")
    assert workflow.cluster.kind == "address"
    assert workflow.cluster.address == f"tcp://{cluster_docs[0]['metadata']['name']}-scheduler:8786"


def test_kubernetes_without_the_extra_is_a_clear_error(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match=r"cluster.kind: kubernetes needs dask-kubernetes \(pip install 'gigaseg-pipeline\[kubernetes\]'\)"):
        check_cluster(_cfg(image="img"), "cpu", 1 << 20)


def test_pipeline_run_without_a_reachable_kubernetes_is_one_clear_error(tmp_path) -> None:
    """What users run: no kubeconfig, no service account -> one line, exit 2, no volume."""
    import subprocess
    import sys

    import numpy as np
    import tifffile

    tifffile.imwrite(tmp_path / "img.tif", np.zeros((64, 64), np.uint8))
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump({
        "input": {"path": "img.tif"},
        "model": {"arch": "unet", "num_classes": 2, "width": 4, "depth": 2},
        "output": {"path": "out/labels.zarr"},
        "cluster": {"kind": "kubernetes", "image": "ghcr.io/x/gigaseg:1"},
    }))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env |= {"KUBECONFIG": str(tmp_path / "no-kubeconfig"), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "pipeline"), "run", str(tmp_path / "wf.yaml")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {tmp_path / 'wf.yaml'}: cluster: cannot create DaskCluster gigaseg in namespace (current)")
    assert "needs access to a Kubernetes cluster" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out" / "labels.zarr").exists()
