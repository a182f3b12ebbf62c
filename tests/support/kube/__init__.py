"""An in-process Kubernetes emulator, the test suite's stand-in for a cluster, split by role.

- :mod:`.api_server`: the HTTP routes (pods, events, Services, Jobs, Deployments, watch and discovery for
  kubectl), and the garbage collector (owned objects go with their owner);
- :mod:`.rbac`: the project's Role on the worker's port: calls recorded in RBAC's verbs, watches refused;
- :mod:`.kubelet`: runs each pod's container as a local subprocess, serves its log, preempts it;
- :mod:`.dns`: Service and pod names, as the pods' commands use them, resolved to this machine's loopback;
- :mod:`.jobs`: the Job controller (Indexed Jobs: a pod per index, status and conditions);
- :mod:`.training`: the Kubeflow Training Operator's PyTorchJob controller, once a test installs it;
- :mod:`.exec`: ``pods/exec`` with the ``v4``/``v5.channel.k8s.io`` WebSocket framing;
- :mod:`.controllers`: the Deployment controller (generations, replicas, progress deadline);
- :mod:`.service`: the serving Service, answering as the last rolled-out template's pods would;
- :mod:`.store`: the objects they share, with resourceVersions and change notification;
- :mod:`.emulator`: :class:`KubeEmulator`, which puts them together and is what tests use.
"""

from .emulator import KubeEmulator
from .rbac import rbac_rules

__all__ = ["KubeEmulator", "rbac_rules"]
