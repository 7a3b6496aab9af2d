"""The names of a task's start and end Events: one per TaskExecution object and fact."""

from __future__ import annotations

import re

from core.kube.status_writer import MAX_NAME, event_name

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
UID = "0f6f3b1e-8a7c-4d2b-9e1f-2c3d4e5f6a7b"


def te(name: str, uid: str = UID) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": "demo", "uid": uid}}


def test_the_name_is_the_object_its_uid_and_the_fact() -> None:
    assert event_name(te("add-multiply"), "started-2") == f"add-multiply.{UID}.started-2"
    assert event_name(te("add-multiply"), "finished") != event_name(te("add-multiply"), "started-1")
    other = UID.replace("0f6f", "1f6f")
    assert event_name(te("add-multiply"), "finished") != event_name(
        te("add-multiply", other), "finished"
    )


def test_a_longest_name_is_cut_to_a_valid_dns_subdomain() -> None:
    # 253 characters is the longest name a TaskExecution may have; the cut (here after 205
    # characters) must not leave a '-' or '.' before the uid
    tail = f".{UID}.started-12"
    keep = MAX_NAME - len(tail)
    for sep in ("-", "."):
        name = "a" * (keep - 1) + sep + "b" * (MAX_NAME - keep)
        assert len(name) == MAX_NAME and DNS_SUBDOMAIN.match(name)
        got = event_name(te(name), "started-12")
        assert got == "a" * (keep - 1) + tail
        assert DNS_SUBDOMAIN.match(got), got
