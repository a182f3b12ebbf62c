"""The API's resources as the emulator serves them: kinds, discovery, and the three patch types.

:data:`KINDS` lists every resource the emulator knows, with its group, version and scope; discovery
(``/api``, ``/apis``, ``/api/v1``, ``/apis/<group>/<version>``) is made from it, so ``kubectl`` (``apply``,
``get``, ``rollout``) finds each one. Patches are applied as an API server applies them:

- JSON merge patch (RFC 7386): maps merge, lists are replaced;
- strategic merge patch, as ``kubectl apply`` and the provider send it: lists of named items (containers,
  env, ports, volumes, ...) merge by their merge key; ``$patch: delete``/``replace``, ``$setElementOrder``,
  ``$retainKeys`` and ``$deleteFromPrimitiveList`` directives are honoured or dropped as the server does;
- JSON patch (RFC 6902), as ``kubectl rollout undo`` sends it: ``add``, ``replace``, ``remove``, ``test``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Kind:
    resource: str  # the plural, as in a URL
    kind: str
    group: str  # "" for the core group
    version: str
    namespaced: bool = True
    short: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


KINDS = (
    Kind("pods", "Pod", "", "v1", short=("po",)),
    Kind("services", "Service", "", "v1", short=("svc",)),
    Kind("events", "Event", "", "v1", short=("ev",)),
    Kind("configmaps", "ConfigMap", "", "v1", short=("cm",)),
    Kind("secrets", "Secret", "", "v1"),
    Kind("serviceaccounts", "ServiceAccount", "", "v1", short=("sa",)),
    Kind("namespaces", "Namespace", "", "v1", namespaced=False, short=("ns",)),
    Kind("deployments", "Deployment", "apps", "v1", short=("deploy",)),
    Kind("replicasets", "ReplicaSet", "apps", "v1", short=("rs",)),
    Kind("jobs", "Job", "batch", "v1"),
    Kind("roles", "Role", "rbac.authorization.k8s.io", "v1"),
    Kind("rolebindings", "RoleBinding", "rbac.authorization.k8s.io", "v1"),
    Kind("poddisruptionbudgets", "PodDisruptionBudget", "policy", "v1", short=("pdb",)),
    Kind("horizontalpodautoscalers", "HorizontalPodAutoscaler", "autoscaling", "v2", short=("hpa",)),
    Kind("networkpolicies", "NetworkPolicy", "networking.k8s.io", "v1", short=("netpol",)),
    Kind("pytorchjobs", "PyTorchJob", "kubeflow.org", "v1"),
    Kind("rollouts", "Rollout", "argoproj.io", "v1alpha1", short=("ro",)),
    Kind("analysisruns", "AnalysisRun", "argoproj.io", "v1alpha1"),
)
BY_RESOURCE = {k.resource: k for k in KINDS}
VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]
SUBRESOURCES = {"deployments": ("scale", "status"), "replicasets": ("scale", "status"), "rollouts": ("status",)}


def discovery(installed: set[str]) -> dict[str, dict]:
    """Discovery documents for the kinds ``installed`` (a CRD's kind only once its operator is installed)."""
    kinds = [k for k in KINDS if k.group not in ("kubeflow.org", "argoproj.io") or k.resource in installed]
    groups: dict[str, list[Kind]] = {}
    for k in kinds:
        groups.setdefault(k.api_version, []).append(k)
    docs: dict[str, dict] = {
        "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
             "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}}
            for gv in groups if "/" in gv]},
    }
    for gv, members in groups.items():
        resources = []
        for k in members:
            resources.append({"name": k.resource, "singularName": k.kind.lower(), "namespaced": k.namespaced,
                              "kind": k.kind, "verbs": VERBS, "shortNames": list(k.short)})
            for sub in SUBRESOURCES.get(k.resource, ()):
                resources.append({"name": f"{k.resource}/{sub}", "singularName": "", "namespaced": k.namespaced,
                                  "kind": "Scale" if sub == "scale" else k.kind, "verbs": ["get", "patch", "update"]})
        docs[members[0].prefix] = {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                                   "resources": resources}
    return docs


# -- JSON merge patch and strategic merge patch ---------------------------------------------------------

# Lists of objects that a strategic merge patch merges item by item, by this key (the API's patchMergeKey).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
              "volumes": "name", "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name",
              "conditions": "type", "envFrom": None, "ownerReferences": "uid", "hostAliases": "ip",
              "topologySpreadConstraints": "topologyKey", "resourceClaims": "name"}


def merge(target: dict, patch: dict, *, strategic: bool = False) -> dict:
    """JSON merge patch (RFC 7386); with ``strategic``, a strategic merge patch."""
    if strategic and patch.get("$patch") == "replace":
        target.clear()
        target.update({k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"})
        return target
    for key, value in patch.items():
        if strategic and key.startswith("$"):
            continue  # $retainKeys, $patch at this level: nothing more to do here
        if strategic and key.startswith("$setElementOrder/"):
            continue
        if strategic and key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            target[field] = [v for v in target.get(field, []) if v not in value]
            continue
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value, strategic=strategic)
        elif strategic and isinstance(value, list) and MERGE_KEYS.get(key) and isinstance(target.get(key), list):
            _merge_list(target[key], value, MERGE_KEYS[key])
        else:
            target[key] = _clean(copy.deepcopy(value)) if strategic else copy.deepcopy(value)
    return target


def _merge_list(items: list, patch: list, key: str) -> None:
    if any(isinstance(p, dict) and p.get("$patch") == "replace" for p in patch):
        items[:] = [_clean(copy.deepcopy(p)) for p in patch if not (isinstance(p, dict) and "$patch" in p)]
        return
    by_key = {item.get(key): item for item in items if isinstance(item, dict)}
    for p in patch:
        if not isinstance(p, dict):
            continue
        if p.get("$patch") == "delete":
            items[:] = [i for i in items if not (isinstance(i, dict) and i.get(key) == p.get(key))]
            by_key.pop(p.get(key), None)
        elif p.get(key) in by_key:
            merge(by_key[p[key]], p, strategic=True)
        else:
            item = _clean(copy.deepcopy(p))
            items.append(item)
            by_key[item.get(key)] = item


def _clean(value: Any) -> Any:
    """A value from a strategic merge patch with its directives removed (what is stored)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def strategic_merge(target: dict, patch: dict) -> dict:
    return merge(target, patch, strategic=True)


# -- JSON patch -----------------------------------------------------------------------------------------

class PatchError(ValueError):
    """A JSON patch that cannot apply (the API server answers 422)."""


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise PatchError(f"path {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(target: dict, ops: list[dict]) -> dict:
    """Apply a JSON patch (RFC 6902) to ``target`` in place (all of it or nothing)."""
    result = copy.deepcopy(target)
    for op in ops:
        parts = _pointer(op["path"])
        parent: Any = result
        for part in parts[:-1]:
            if isinstance(parent, list) and part.isdigit() and int(part) < len(parent):
                parent = parent[int(part)]
            elif isinstance(parent, dict) and part in parent:
                parent = parent[part]
            else:
                raise PatchError(f"{op['op']} {op['path']}: no such path")
        last = parts[-1]
        kind = op["op"]
        if kind in ("add", "replace"):
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(index, copy.deepcopy(op["value"]))
                else:
                    parent[index] = copy.deepcopy(op["value"])
            else:
                if kind == "replace" and last not in parent:
                    raise PatchError(f"replace {op['path']}: no such key")
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            elif last in parent:
                del parent[last]
            else:
                raise PatchError(f"remove {op['path']}: no such key")
        elif kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op.get("value"):
                raise PatchError(f"test {op['path']}: {current!r} is not {op.get('value')!r}")
        else:
            raise PatchError(f"JSON patch operation {kind!r} is not supported by this emulator")
    target.clear()
    target.update(result)
    return target
