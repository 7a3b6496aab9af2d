"""Who a task and an adapter *are*: the keys every record is written under.

Why a module of its own: names are labels, not keys. On the embedded backend a task is
(run id, task id) and an adapter is its id, because phase 4 guarantees both are unique in a
run. On Kubernetes a name can be deleted and applied again, and the same name can exist in
two namespaces at once: there a task is its TaskExecution's uid (with the namespace it lives
in and the run id it declares), and an adapter is (namespace, name). Every database row,
ledger entry, event key, log file and circuit breaker is keyed through these two values, so
two identities never share a record by accident.

The breaker scope is the adapter's namespace: TaskExecutions of one namespace share the
breaker of an Adapter there (they use the same tool with the same credentials); nothing is
shared across namespaces.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The scope of the embedded backend's tasks and adapters (a run's own namespace-less world).
EMBEDDED_SCOPE = ""


@dataclass(frozen=True, slots=True, order=True)
class TaskKey:
    """The identity of one task.

    ``uid`` is empty on the embedded backend and the TaskExecution's ``metadata.uid`` on
    Kubernetes; ``scope`` is the namespace (empty on the embedded backend).
    """

    run_id: str
    task_id: str
    uid: str = ""
    scope: str = EMBEDDED_SCOPE

    @property
    def qualified(self) -> str:
        """A stable string naming the task, unique across backends (event keys, messages)."""
        if not self.uid:
            return f"{self.run_id}/{self.task_id}"
        return f"{self.run_id}/{self.scope}/{self.task_id}@{self.uid}"

    @property
    def log_name(self) -> str:
        """File stem of the task's log under ``logs/execution/``.

        ``<task>`` on the embedded backend (the seed's contract); ``<namespace>.<task>.<uid>``
        on Kubernetes. Namespaces and task ids are DNS labels, so the dots are unambiguous.
        """
        if not self.uid:
            return self.task_id
        return f"{self.scope}.{self.task_id}.{self.uid}"

    @property
    def display(self) -> str:
        """How people see the task: its id, with the namespace where there is one."""
        return f"{self.scope}/{self.task_id}" if self.scope else self.task_id


@dataclass(frozen=True, slots=True, order=True)
class AdapterKey:
    """The identity of one adapter (and of its circuit breaker)."""

    scope: str
    adapter_id: str

    @property
    def display(self) -> str:
        return f"{self.scope}/{self.adapter_id}" if self.scope else self.adapter_id
