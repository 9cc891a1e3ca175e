"""Fuzzing the ingest route of a real ``apmon serve`` on PostgreSQL: valid batches with one leaf
or key replaced by an out-of-range integer, NUL, a lone surrogate, deep nesting or a huge value,
plus deeply nested, oversized (declared and chunked) and broken bodies. No answer is a 5xx."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import live_server, model_sites, step_summaries

from monitor.schema import IngestBatch, RunStart, SiteInfo
from monitor.store import make_engine
from monitor.store.store import SqlStore

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SITES = model_sites(2, units=4)
BODY_LIMIT = 256 * 1024
EXAMPLES = 300


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


NASTY = [
    2**63,
    2**63 - 1,
    -(2**63) - 1,
    2**64,
    10**30,
    -1,
    0,
    1e308,
    -0.0,
    True,
    None,
    "",
    "\x00",
    "net.0\x00#0",
    "\ud800",
    "a\udfffb",
    "x" * 5000,
    [],
    {},
    nested(50),
    {"\x00": 1},
    [2**63, -1],
]


def leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a leaf or a container of the JSON document, through the first item of
    each list only (the others have the same type: this keeps every field equally likely)."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*path, key))
    elif isinstance(value, list) and value:
        yield from leaves(value[0], (*path, 0))


def _walk(document: Any, path: tuple[Any, ...]) -> Any:
    """The container at ``path``, or None where an earlier change removed the way there."""
    for part in path:
        present = (isinstance(document, dict) and part in document) or (
            isinstance(document, list) and isinstance(part, int) and part < len(document)
        )
        if not present:
            return None
        document = document[part]
    return document


def replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of ``document`` with the item at ``path`` replaced (unchanged if it is gone)."""
    if not path:
        return value
    copy = json.loads(json.dumps(document))
    target, last = _walk(copy, path[:-1]), path[-1]
    if isinstance(target, dict) or (
        isinstance(target, list) and isinstance(last, int) and last < len(target)
    ):
        target[last] = value
    return copy


def with_key(document: Any, path: tuple[Any, ...], key: str, value: Any) -> Any:
    """A copy of ``document`` with ``key`` added to the object at ``path``, if it is one."""
    copy = json.loads(json.dumps(document))
    target = _walk(copy, path)
    if isinstance(target, dict):
        target[key] = value
    return copy


@pytest.fixture(scope="module")
def target(
    service_pg_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[httpx.Client, str]]:
    engine = make_engine(service_pg_url)
    store = SqlStore(engine)
    token = store.create_token("fuzz")
    run_id = store.create_run("fuzz", RunStart(name="fuzzed", sites=SITES))
    env = {"APMON_MAX_BODY_BYTES": str(BODY_LIMIT)}
    with live_server(
        service_pg_url, tmp_path_factory.mktemp("fuzz"), workers=1, extra_env=env
    ) as server:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
            yield client, run_id
    engine.dispose()


def test_no_ingest_body_gets_a_5xx_on_postgres(target: tuple[httpx.Client, str]) -> None:
    client, run_id = target
    url = f"/api/v1/runs/{run_id}/batches"
    base = IngestBatch(
        seq=0,
        sites=[SiteInfo(name="net.x#0", kind="dense", units=4)],
        summaries=step_summaries(9, 1, SITES),
    ).model_dump(mode="json")
    paths = list(leaves(base))
    seqs = itertools.count()
    statuses: Counter[int] = Counter()

    @st.composite
    def bodies(draw: st.DrawFn) -> tuple[str, Any]:
        """("json", a document to send as a fresh batch), ("raw", bytes) or ("chunks", [bytes])."""
        document = base
        kind = draw(st.sampled_from(["leaf", "key", "deep", "huge", "chunked", "broken"]))
        if kind == "leaf":
            for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
                path, value = draw(st.sampled_from(paths)), draw(st.sampled_from(NASTY))
                document = replaced(document, path, value)
        elif kind == "key":
            key = draw(st.sampled_from(["\x00", "\ud800", "extra", "x" * 300]))
            path, value = draw(st.sampled_from(paths)), draw(st.sampled_from(NASTY))
            document = with_key(document, path, key, value)
        elif kind == "deep":
            depth = draw(st.sampled_from([64, 1_000, 20_000, 200_000]))
            return "raw", b'{"seq": 0, "summaries": ' + b"[" * depth + b"]" * depth + b"}"
        elif kind == "huge":
            return "raw", json.dumps({**document, "pad": "x" * (BODY_LIMIT + 1)}).encode()
        elif kind == "chunked":
            size = draw(st.sampled_from([BODY_LIMIT // 2, BODY_LIMIT * 2]))
            encoded = json.dumps({**document, "pad": "x" * size}).encode()
            return "chunks", [encoded[i : i + 65536] for i in range(0, len(encoded), 65536)]
        else:
            encoded = json.dumps(document).encode()
            cut = draw(st.integers(0, len(encoded)))
            return "raw", encoded[:cut] + draw(st.binary(max_size=8))
        return "json", document

    def fresh(document: Any) -> bytes:
        """The document under a new seq, its steps new: a valid one is processed at once."""
        if isinstance(document, dict):
            document = json.loads(json.dumps(document))
            if document.get("seq") == 0:
                document["seq"] = next(seqs)
            summaries = document.get("summaries")
            if isinstance(summaries, list):
                for summary in summaries:
                    if isinstance(summary, dict) and summary.get("step") == 0:
                        summary["step"] = document["seq"]
        return json.dumps(document).encode()  # ensure_ascii: surrogates travel as \ud800

    @given(body=bodies())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(body: tuple[str, Any]) -> None:
        kind, value = body
        if kind == "chunks":
            content: bytes | Iterator[bytes] = iter(value)  # no Content-Length: chunked
        elif kind == "raw":
            content = value
        else:
            content = fresh(value)
        response = client.post(url, content=content)
        statuses[response.status_code] += 1
        assert response.status_code < 500, response.text[:500]

    fuzz()
    assert sum(statuses.values()) == EXAMPLES
    assert statuses[200] > 0 and statuses[422] > 0 and statuses[413] > 0
    assert set(statuses) <= {200, 409, 413, 422}  # each refusal says why (no bare 400)
    # Nothing the fuzzer sent left the run unable to go on: a clean batch is still processed.
    finish = client.post(f"/api/v1/runs/{run_id}/finish", json={"final_step": 10**6})
    assert finish.status_code == 200, finish.text


def test_no_run_start_gets_a_5xx_on_postgres(target: tuple[httpx.Client, str]) -> None:
    client, _ = target
    base = RunStart(name="n", sites=SITES, config={"lr": 0.1, "opt": "sgd"}).model_dump(mode="json")
    paths = list(leaves(base))
    names = itertools.count()
    statuses: Counter[int] = Counter()

    @given(path=st.sampled_from(paths), value=st.sampled_from(NASTY))
    @settings(
        max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def fuzz(path: tuple[Any, ...], value: Any) -> None:
        body = json.dumps(replaced(base, path, value)).encode()
        response = client.put(f"/api/v1/runs/fuzz-start-{next(names)}", content=body)
        statuses[response.status_code] += 1
        assert response.status_code < 500, response.text[:500]

    fuzz()
    assert statuses[201] > 0 and statuses[422] > 0


def test_the_fuzz_helpers_replace_exactly_one_leaf(tmp_path: Path) -> None:
    document = {"a": [1, {"b": 2}]}
    assert replaced(document, ("a", 1, "b"), "x") == {"a": [1, {"b": "x"}]}
    assert document == {"a": [1, {"b": 2}]}
    assert list(leaves(document)) == [(), ("a",), ("a", 0)]
    assert list(leaves({"a": [{"b": 2}, 1]})) == [(), ("a",), ("a", 0), ("a", 0, "b")]
