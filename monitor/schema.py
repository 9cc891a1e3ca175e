"""Wire schema: the pydantic models that the client and the service share, and nothing else.

Every summary is *mergeable*: it stores sums and counts, never means (STYLE.md item 4). A pattern
is identified on the wire by its 64-bit fingerprint (an unsigned integer, see
``monitor.client.patterns`` for how it is computed and its collision bound).
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

SiteKind = Literal["dense", "conv", "seq"]
SiteMode = Literal["relu", "sign"]
SummarySource = Literal["train", "probe_set"]
ProbeKind = Literal["apt", "sweep"]

# Every integer the store keeps goes into a signed 64-bit column (PostgreSQL BIGINT), so the wire
# refuses larger ones with a 422 that names the field instead of letting the database fail.
MAX_INT = 2**63 - 1
Fingerprint = Annotated[int, Field(ge=0, lt=2**64)]  # kept in JSON documents, never in a column
NonNegInt = Annotated[int, Field(ge=0, le=MAX_INT)]
Count = Annotated[int, Field(ge=1, le=MAX_INT)]  # a pattern that is listed occurred at least once
# Wire payloads from many runs and workers: bound every list so one request cannot blow memory.
MAX_SITES = 4096
MAX_UNITS = 1 << 20
MAX_SCALARS = 64
MAX_CLASSES = 4096  # labels with per-class statistics in one site summary
MAX_RECORDS = 4096  # summaries, and probes, in one ingest batch
MAX_SAMPLE_INDICES = 1 << 20
MAX_CONFIG_KEYS = 1024
MAX_CONFIG_TEXT = 8192  # characters of one config value


def _storable(value: str) -> str:
    """Refuse text a database cannot keep.

    That is NUL (PostgreSQL text cannot hold it) and lone UTF-16 surrogates (not UTF-8).
    """
    if "\x00" in value:
        raise ValueError("text must not contain the NUL character (\\x00)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return value


StoredText = Annotated[str, AfterValidator(_storable)]
Name = Annotated[StoredText, Field(min_length=1, max_length=512)]
ClassLabel = Annotated[StoredText, Field(max_length=64)]
UnitCounts = Annotated[list[NonNegInt], Field(max_length=MAX_UNITS)]


def _no_huge_int(value: Any) -> Any:
    """Refuse an integer outside the store's range rather than let it become a rounded float."""
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not -MAX_INT - 1 <= value <= MAX_INT
    ):
        raise ValueError("integers must lie within [-2**63, 2**63 - 1]")
    return value


ConfigValue = Annotated[
    Annotated[StoredText, Field(max_length=MAX_CONFIG_TEXT)] | int | float | bool | None,
    BeforeValidator(_no_huge_int),
]
ScalarName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")]


_Wire = TypeVar("_Wire", bound="WireModel")
_field_names: dict[type[BaseModel], frozenset[str]] = {}  # each wire model's, for ``trusted``


class WireModel(BaseModel):
    """Base of every wire model: unknown fields are errors, NaN/inf are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=False)

    @classmethod
    def trusted(cls: type[_Wire], **values: Any) -> _Wire:
        """An instance of values the caller built valid, every field given: nothing is checked.

        What ``model_construct`` returns, without its look-up of each field's aliases and
        default, which cost the client ~5 us per site summary and step (as much as measuring a
        small site). Wire models have no aliases, private attributes or post-init hooks, so
        nothing else differs (tests/client/test_trusted.py compares the two). A missing or
        unknown field is a TypeError.
        """
        fields = _field_names.get(cls)
        if fields is None:  # ``model_fields`` is a computed property on recent pydantic
            fields = _field_names[cls] = frozenset(cls.model_fields)
        if values.keys() != fields:
            given = set(values)
            raise TypeError(
                f"{cls.__name__}.trusted needs every field: missing {sorted(fields - given)}, "
                f"unknown {sorted(given - fields)}"
            )
        model = cls.__new__(cls)
        object.__setattr__(model, "__dict__", values)
        object.__setattr__(model, "__pydantic_fields_set__", set(values))
        object.__setattr__(model, "__pydantic_extra__", None)
        object.__setattr__(model, "__pydantic_private__", None)
        return model


class SiteInfo(WireModel):
    """One activation site, as the client discovered it."""

    name: Name
    kind: SiteKind
    mode: SiteMode = "relu"
    units: int = Field(ge=1, le=MAX_UNITS)


class PackedPatterns(WireModel):
    """The compact JSON form of ``SiteSummary.patterns``.

    ``fingerprints`` is the base64 of the fingerprints as little-endian unsigned 64-bit integers
    (12 characters per 8 bytes instead of up to 20 decimal digits), ``counts`` their counts in the
    same order. Summaries are written in this form; the plain list of pairs is read as well.
    """

    fingerprints: str
    counts: list[Count]

    def pairs(self) -> list[tuple[int, int]]:
        """The ``(fingerprint, count)`` pairs; ValueError when the two parts do not match."""
        try:
            raw = base64.b64decode(self.fingerprints, validate=True)
        except binascii.Error as error:
            raise ValueError(f"patterns.fingerprints is not base64: {error}") from None
        if len(raw) % 8:
            raise ValueError("patterns.fingerprints must hold whole 8-byte fingerprints")
        fingerprints = np.frombuffer(raw, dtype="<u8").tolist()
        if len(fingerprints) != len(self.counts):
            raise ValueError(
                f"patterns has {len(fingerprints)} fingerprints but {len(self.counts)} counts"
            )
        return list(zip(fingerprints, self.counts, strict=True))

    @classmethod
    def of(cls, pairs: list[tuple[int, int]]) -> PackedPatterns:
        """The compact form of ``(fingerprint, count)`` pairs."""
        fingerprints = np.array([fp for fp, _ in pairs], dtype="<u8")
        return cls(
            fingerprints=base64.b64encode(fingerprints.tobytes()).decode("ascii"),
            counts=[c for _, c in pairs],
        )


class SiteSummary(WireModel):
    """Activation-pattern statistics of one site over a set of rows (one step or one probe set).

    ``spectrum`` is the count-of-counts: pairs ``(c, m)`` meaning "m distinct patterns occurred
    exactly c times", sorted by c. It determines distinct, max_freq and entropy exactly.
    ``patterns`` holds ``(fingerprint, count)`` pairs sorted by fingerprint: every pattern when
    ``patterns_exact`` is true, otherwise the bottom-k sample (the k smallest fingerprints), which
    weighted Jaccard and changes are estimated from.
    """

    site: Name
    rows: NonNegInt
    distinct: NonNegInt
    spectrum: list[tuple[Count, Count]] = Field(default_factory=list)
    patterns: list[tuple[Fingerprint, Count]] = Field(default_factory=list)
    patterns_exact: bool = True
    sketch_k: int | None = Field(default=None, ge=1, le=MAX_INT)
    unit_on: UnitCounts = Field(default_factory=list)
    nonfinite_rows: NonNegInt = 0
    # Optional per-class statistics when the client was given labels: rows and per-unit on counts.
    class_rows: dict[ClassLabel, NonNegInt] | None = Field(default=None, max_length=MAX_CLASSES)
    class_unit_on: dict[ClassLabel, UnitCounts] | None = Field(default=None, max_length=MAX_CLASSES)
    # Optional preactivation scale over the finite values: sum of squares, largest magnitude.
    sumsq: float | None = Field(default=None, ge=0)
    max_abs: float | None = Field(default=None, ge=0)
    # Only rows, unit_on, nonfinite_rows and the scale were measured (no patterns): the cheap
    # per-step statistics of the detectors between steps with full summaries. Not stored as a
    # site summary; plugins that read patterns skip it.
    scale_only: bool = False

    @field_validator(
        "patterns",
        mode="before",
        json_schema_input_type=list[tuple[Fingerprint, Count]] | PackedPatterns,
    )
    @classmethod
    def _unpack_patterns(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = PackedPatterns.model_validate(value)
        if isinstance(value, PackedPatterns):
            return value.pairs()
        return value

    @field_serializer("patterns", when_used="json")
    def _pack_patterns(
        self, value: list[tuple[int, int]]
    ) -> dict[str, Any] | list[tuple[int, int]]:
        return PackedPatterns.of(value).model_dump() if value else []

    @field_validator("spectrum")
    @classmethod
    def _spectrum_positive(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for count, multiplicity in value:
            if count < 1 or multiplicity < 1:
                raise ValueError("spectrum entries (count, multiplicity) must both be >= 1")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SiteSummary:
        if self.scale_only and (self.spectrum or self.patterns or self.distinct):
            raise ValueError("a scale_only summary has no patterns, spectrum or distinct count")
        if self.spectrum:
            if sum(c * m for c, m in self.spectrum) != self.rows:
                raise ValueError("spectrum does not add up to rows")
            if sum(m for _, m in self.spectrum) != self.distinct:
                raise ValueError("spectrum does not add up to distinct")
        if self.patterns_exact and self.patterns and len(self.patterns) != self.distinct:
            raise ValueError("patterns_exact is set but patterns does not list every pattern")
        return self


# -- activation pattern diagrams (Craighero et al., seed 003; monitor/client/diagram.py) ---------
# Bounds of one diagram: nodes kept per level, edges kept per pair of levels, Fig. 3 cells.
MAX_DIAGRAM_NODES = 256
MAX_DIAGRAM_EDGES = 1024
MAX_DIAGRAM_CELLS = 512


class DiagramLevel(WireModel):
    """One level of a diagram: a site's patterns on the probe subset, or the predicted labels.

    ``counts[i]``/``errors[i]`` are the samples of kept node i and how many of them were
    misclassified, most frequent node first; ``other``/``other_errors`` those of every pattern
    not kept (one "other patterns" node). ``labels[i]`` is node i's label on the label level.
    """

    name: str = Field(min_length=1, max_length=512)
    distinct: NonNegInt
    counts: list[NonNegInt] = Field(max_length=MAX_DIAGRAM_NODES)
    errors: list[NonNegInt] = Field(max_length=MAX_DIAGRAM_NODES)
    other: NonNegInt = 0
    other_errors: NonNegInt = 0
    labels: list[int] | None = Field(default=None, max_length=MAX_DIAGRAM_NODES)


class DiagramFlows(WireModel):
    """The flows of samples from one level to the next.

    ``edges`` holds (source node, target node, samples, errors, top) for the kept edges, largest
    first; node -1 is the level's "other patterns" node, ``top`` the count of the edge's most
    frequent predicted label. ``rest`` is (samples, errors, edges) of the edges not kept.
    A flow cluster is a set of samples with the same pattern at both levels (the source's
    "flows"): ``clusters`` counts them, ``strength_sum`` is sum over samples of their cluster's
    size, ``top_sum`` the sum over clusters of their most frequent predicted label's count (so the
    sample-weighted mean purity is top_sum / samples), and ``cells`` the source's Fig. 3
    histogram: (strength bin b: size in [2^b, 2^(b+1)), purity bin q: purity in [q/10, (q+1)/10),
    the last bin closed, samples, errors).
    """

    edges: list[tuple[int, int, NonNegInt, NonNegInt, NonNegInt]] = Field(
        max_length=MAX_DIAGRAM_EDGES
    )
    rest: tuple[NonNegInt, NonNegInt, NonNegInt] = (0, 0, 0)
    clusters: NonNegInt
    strength_sum: NonNegInt
    top_sum: NonNegInt
    cells: list[tuple[NonNegInt, NonNegInt, NonNegInt, NonNegInt]] = Field(
        max_length=MAX_DIAGRAM_CELLS
    )


class ActivationDiagram(WireModel):
    """An activation pattern diagram of a labelled probe subset (seed 003, Sec. 2, extended).

    ``levels`` are the sites in forward order and, last, the predicted labels; ``flows[i]`` goes
    from ``levels[i]`` to ``levels[i + 1]``.
    """

    samples: NonNegInt
    levels: list[DiagramLevel] = Field(max_length=MAX_SITES + 1)
    flows: list[DiagramFlows] = Field(max_length=MAX_SITES)

    @model_validator(mode="after")
    def _shape(self) -> ActivationDiagram:
        if self.levels and len(self.flows) != len(self.levels) - 1:
            raise ValueError("a diagram has one flows entry per pair of consecutive levels")
        return self


# -- end of activation pattern diagrams ----------------------------------------------------------


class StepSummary(WireModel):
    """All sites' summaries at one step from one source."""

    step: NonNegInt
    source: SummarySource = "train"
    sites: list[SiteSummary] = Field(max_length=MAX_SITES)
    loss: float | None = None
    # Indices of the batch's samples in the data set, when the data loader provides them.
    sample_indices: list[NonNegInt] | None = Field(default=None, max_length=MAX_SAMPLE_INDICES)
    # Step-level numbers the client measured beside the sites (learning rate, a scheduler's
    # target, a norm): stored as measures of the step by the ``scalars`` plugin.
    scalars: dict[ScalarName, float] | None = Field(default=None, max_length=MAX_SCALARS)
    # An activation pattern diagram of the labelled probe subset, on some probe-set evaluations.
    diagram: ActivationDiagram | None = None


class SiteProbe(WireModel):
    """Pattern changes of one site on the probe rows.

    ``changed[i]`` of ``rows`` rows changed their pattern when the step's update was applied
    with learning rate ``etas[i]``.
    """

    site: Name
    rows: int = Field(ge=1, le=MAX_INT)
    etas: list[Annotated[float, Field(gt=0)]] = Field(max_length=MAX_UNITS)
    changed: list[NonNegInt] = Field(max_length=MAX_UNITS)

    @model_validator(mode="after")
    def _aligned(self) -> SiteProbe:
        if len(self.etas) != len(self.changed):
            raise ValueError("etas and changed must have the same length")
        if any(c > self.rows for c in self.changed):
            raise ValueError("changed rows cannot exceed rows")
        return self


class ProbeRecord(WireModel):
    """One APT probe (``kind='apt'``, one eta: the used learning rate) or one sensitivity sweep."""

    step: NonNegInt
    kind: ProbeKind
    lr: float = Field(gt=0)
    sites: list[SiteProbe] = Field(max_length=MAX_SITES)
    nonfinite: bool = False


class RunStart(WireModel):
    """What the client says when a monitored run begins."""

    name: StoredText = Field(default="", max_length=256)
    sites: list[SiteInfo] = Field(default_factory=list, max_length=MAX_SITES)
    config: dict[
        Annotated[StoredText, Field(max_length=256)],
        ConfigValue,
    ] = Field(default_factory=dict, max_length=MAX_CONFIG_KEYS)
    mlflow_run_id: StoredText | None = Field(default=None, max_length=64)
    # Who ran what, for MLflow's "Created by" and "Source" on runs apmon creates.
    user: StoredText | None = Field(default=None, max_length=256)
    source_name: StoredText | None = Field(default=None, max_length=500)


class IngestBatch(WireModel):
    """A batch of records from one client stream, idempotent per (run, stream, seq)."""

    stream: StoredText = Field(default="main", min_length=1, max_length=64)
    seq: NonNegInt
    sites: list[SiteInfo] = Field(default_factory=list, max_length=MAX_SITES)
    summaries: list[StepSummary] = Field(default_factory=list, max_length=MAX_RECORDS)
    probes: list[ProbeRecord] = Field(default_factory=list, max_length=MAX_RECORDS)


# ---------------------------------------------------------------------------------------------
# What plugins produce. The service stores these; the client sees alerts in the ingest response.
# ---------------------------------------------------------------------------------------------


class MeasureValue(WireModel):
    """One scalar measure; ``site`` None means run-level (e.g. the mean over sites)."""

    name: str
    value: float
    site: str | None = None
    source: SummarySource | ProbeKind = "train"

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("measure values must be finite")
        return value


class FitValue(WireModel):
    """Transition-model fit of one sweep: D(eta) ~ Phi((ln eta - mu) / sigma)."""

    site: str | None = None
    mu: float | None = None
    sigma: float | None = None
    residual: float | None = None
    points: int = 0
    ok: bool = False
    reason: str = ""


Severity = Literal["info", "warning", "critical"]


class AlertValue(WireModel):
    """An alert raised by a detector."""

    kind: str = Field(min_length=1, max_length=64)
    step: NonNegInt
    severity: Severity = "warning"
    message: str
    site: str | None = None
    evidence: dict[str, object] = Field(default_factory=dict)
