"""An in-process Kubernetes emulator, the test suite's stand-in for a cluster, split by role.

- :mod:`.api_server`: the HTTP routes (every resource of :mod:`.objects`, watch and discovery for kubectl), and
  the garbage collector (owned objects go with their owner);
- :mod:`.objects`: the resources, discovery, and the three patch types (merge, strategic merge, JSON patch);
- :mod:`.rbac`: the project's Role on the worker's port: calls recorded in RBAC's verbs, watches refused;
- :mod:`.kubelet`: runs each pod's container as a local subprocess (an image's entrypoint from its Dockerfile),
  probes its readiness, serves its log, preempts it;
- :mod:`.dns`: Service and pod names, as the pods' commands use them, resolved to this machine's loopback;
- :mod:`.jobs`: the Job controller (Indexed Jobs: a pod per index, status and conditions);
- :mod:`.training`: the Kubeflow Training Operator's PyTorchJob controller, once a test installs it;
- :mod:`.exec`: ``pods/exec`` with the ``v4``/``v5.channel.k8s.io`` WebSocket framing;
- :mod:`.workloads`: the Deployment, ReplicaSet and HPA controllers (revisions as ReplicaSets, rolling
  updates, progress deadline, the HPA owning replicas);
- :mod:`.service`: ClusterIP Services, proxying each request to a ready endpoint's process;
- :mod:`.store`: the objects they share, with resourceVersions and change notification;
- :mod:`.emulator`: :class:`KubeEmulator`, which puts them together and is what tests use.
"""

from .emulator import KubeEmulator
from .rbac import rbac_rules

__all__ = ["KubeEmulator", "rbac_rules"]
