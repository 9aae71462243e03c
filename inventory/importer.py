"""Bulk import of GPU models, sites, nodes and GPUs from a YAML or CSV file.

The whole file is validated first; every problem is reported with its line number, and if
there is any, nothing is written. Otherwise everything is created or updated in one
transaction. Importing the same file twice changes nothing the second time.

YAML (``.yaml`` / ``.yml``)::

    gpu_models:                       # optional catalogue entries, created or updated
      - slug: h100-sxm-80gb
        name: NVIDIA H100 SXM 80GB
        vendor: NVIDIA
        memory_gb: 80
        tdp_watts: 700
        interconnect: NVLink 900 GB/s  # optional
    sites:
      - slug: tx-abilene               # the key: a site with this slug is updated
        name: Abilene (former 40k S19 farm)
        region: us-central
        country: US                    # ISO 3166-1 alpha-2
        grid_operator: ERCOT
        power_capacity_kw: 40000
        pue: 1.12                      # at least 1
        cooling: immersion             # air | hydro | immersion | direct_liquid
        energy_price_per_mwh: 31.50
        energy_currency: usd           # optional, default usd
        renewable_share: 0.35          # 0 to 1
        grid_carbon_g_per_kwh: 390     # optional: the grid's gCO2e/kWh, for emissions
        uplink_gbps: 200
        former_use: bitcoin mining     # optional
        status: active                 # optional, used only when the site is created
        nodes:
          - hostname: abl-h100-001     # the key: a node with this hostname is updated
            gpu_model: h100-sxm-80gb   # in this file's gpu_models or already in the database
            gpu_count: 8               # GPUs get indexes 0..7 and serials <hostname>-gpu<i>
            # gpu_serials: [S0, S1]    # ...or give the serials (their number is the count)
            cpu_model: AMD EPYC 9454   # optional
            cpu_cores: 96
            ram_gb: 1024
            disk_gb: 15360
            nic_gbps: 400
            status: available          # optional, used only when the node is created

CSV (``.csv``): one row per node. The site columns repeat on each row of a site, or may be
left empty on all but its first row; values given twice must agree. GPU models must already
exist (load the catalogue from YAML). Columns: ``site, site_name, region, country,
grid_operator, power_capacity_kw, pue, cooling, energy_price_per_mwh, energy_currency,
renewable_share, grid_carbon_g_per_kwh, uplink_gbps, former_use, site_status, hostname, gpu_model, gpu_count,
gpu_serials, cpu_model, cpu_cores, ram_gb, disk_gb, nic_gbps, node_status``; ``gpu_serials``
separates serials with ``;``.

Import never deletes anything: a node whose gpu_count is lower than the GPUs it already has is
refused (remove GPUs in the admin), and so is a change of an existing node's GPU model. Nor
does it move anything: an existing node under another site, or an existing GPU's serial at
another index, is refused (a node's site and a GPU's node and index are its physical
identity, which placement, jobs, telemetry and health go by).
Statuses are only set on creation; later changes go through the status services so they are
recorded.
"""

import csv
import io
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import yaml
from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, transaction
from django.utils import timezone

from config.errors import ValidationFailed
from inventory.models import (
    Gpu,
    GpuModel,
    Node,
    NodeStatus,
    Site,
    SiteStatus,
)

# --- Batching ------------------------------------------------------------------------------
# PostgreSQL binds at most 65,535 parameters per statement (and with server-side binding,
# as DATABASE_PREPARED_STATEMENTS has it, every value is one). Lookups go in chunks of
# _LOOKUP_BATCH values and inserts in _INSERT_BATCH rows, far below it for every model here.
_LOOKUP_BATCH = 10_000
_INSERT_BATCH = 2_000


def _in_batches(queryset, field_name: str, values) -> list:
    """queryset.filter(<field_name>__in=values), run in chunks; the rows of every chunk."""
    values = list(values)
    rows = []
    for start in range(0, len(values), _LOOKUP_BATCH):
        chunk = values[start : start + _LOOKUP_BATCH]
        rows.extend(queryset.filter(**{f"{field_name}__in": chunk}))
    return rows


# --- Field parsing -------------------------------------------------------------------------


class _Bad(Exception):
    """A value that cannot be used; the message says why."""


Parser = Callable[[object], object]


def _text(max_length: int | None) -> Parser:
    def parse(value):
        if isinstance(value, bool | dict | list) or value is None:
            raise _Bad("must be text")
        text = str(value).strip()
        if "\x00" in text:  # PostgreSQL's text cannot hold it: refused here, with its line
            raise _Bad("must not contain a NUL character")
        if max_length is not None and len(text) > max_length:
            raise _Bad(f"must be at most {max_length} characters")
        return text

    return parse


def _pattern(regex: str, what: str, max_length: int) -> Parser:
    compiled = re.compile(regex)

    def parse(value):
        text = _text(None)(value)
        if not compiled.fullmatch(text):  # the format first: it says more than a length
            raise _Bad(f"must be {what}, got {text!r}")
        return _text(max_length)(text)

    return parse


def _integer(minimum: int = 0, maximum: int = 2_147_483_647) -> Parser:
    def parse(value):
        if isinstance(value, bool):
            raise _Bad(f"must be a whole number, got {value!r}")
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                raise _Bad(f"must be a whole number, got {value!r}") from None
        if not minimum <= number <= maximum:
            raise _Bad(f"must be between {minimum} and {maximum}, got {number}")
        return number

    return parse


def _decimal(
    max_digits: int, places: int, minimum: Decimal | None, maximum: Decimal | None
) -> Parser:
    def parse(value):
        if isinstance(value, bool | dict | list) or value is None:
            raise _Bad(f"must be a number, got {value!r}")
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            raise _Bad(f"must be a number, got {value!r}") from None
        if not number.is_finite():
            raise _Bad(f"must be a number, got {value!r}")
        if number != number.quantize(Decimal(1).scaleb(-places)):
            raise _Bad(f"must have at most {places} decimal places, got {value}")
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            if minimum is not None and maximum is not None:
                bounds = f"between {minimum} and {maximum}"
            else:
                bounds = f"≥ {minimum}" if minimum is not None else f"≤ {maximum}"
            raise _Bad(f"must be {bounds}, got {number}")
        if abs(number) >= Decimal(10) ** (max_digits - places):
            raise _Bad(f"is too large, got {number}")
        return number

    return parse


def _choice(choices: list[str]) -> Parser:
    def parse(value):
        text = str(value).strip().lower()
        if text not in choices:
            raise _Bad(f"must be one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _upper(parse: Parser) -> Parser:
    return lambda value: parse(value).upper()


def _serials(max_length: int) -> Parser:
    def parse(value):
        if isinstance(value, str):
            items = [_text(None)(s) for s in re.split(r"[;\s]+", value) if s]
        elif isinstance(value, list):
            items = [_text(max_length)(s) for s in value]
        else:
            raise _Bad("must be a list of serial numbers")
        if any(not s or len(s) > max_length for s in items):
            raise _Bad(f"must be serial numbers of 1 to {max_length} characters")
        return items

    return parse


@dataclass(frozen=True)
class Spec:
    parse: Parser
    required: bool = True
    default: object = None
    create_only: bool = False  # only used when the row is created (statuses)


def _limits(model_field) -> tuple[Decimal | int | None, Decimal | int | None]:
    """The field's range: its Min/MaxValueValidators (an integer field's include the
    database column's own range), the tightest of each."""
    lows = [v.limit_value for v in model_field.validators if isinstance(v, MinValueValidator)]
    highs = [v.limit_value for v in model_field.validators if isinstance(v, MaxValueValidator)]
    return (max(lows) if lows else None), (min(highs) if highs else None)


def _from_model(
    model,
    name: str,
    *,
    pattern: tuple[str, str] | None = None,
    choices: list[str] | None = None,
    create_only: bool = False,
) -> Spec:
    """A file field read as the model's field of that name: its length, digits, range, choices
    and whether it may be left out (blank, null or a default) come from the model, so a change
    there reaches the import. `pattern` (regex, what) and `choices` add the file's own rules:
    a format, or a narrower set of choices."""
    model_field = model._meta.get_field(name)
    low, high = _limits(model_field)
    if choices is not None or model_field.choices:
        parse = _choice(choices or [str(value) for value, _ in model_field.flatchoices])
    elif isinstance(model_field, models.DecimalField):
        parse = _decimal(model_field.max_digits, model_field.decimal_places, low, high)
    elif isinstance(model_field, models.IntegerField):
        parse = _integer(0 if low is None else low, 2_147_483_647 if high is None else high)
    elif pattern is not None:
        parse = _pattern(*pattern, model_field.max_length)
    else:
        parse = _text(model_field.max_length)
    optional = model_field.blank or model_field.null or model_field.has_default()
    return Spec(
        parse,
        required=not optional,
        default=model_field.get_default() if optional and not create_only else None,
        create_only=create_only,
    )


_SLUG = (r"[a-z0-9]+(?:[-_][a-z0-9]+)*", "a lowercase slug (a-z, 0-9, -)")
_HOSTNAME = (r"[A-Za-z0-9][A-Za-z0-9.-]*", "a hostname")
_COUNTRY = (r"[A-Za-z]{2}", "a two-letter ISO 3166-1 country code")
_CURRENCY = (r"[a-z]{3}", "a three-letter currency code")
_NODE_START_STATUSES = [NodeStatus.AVAILABLE, NodeStatus.DRAINING, NodeStatus.MAINTENANCE]
_MAX_GPUS_PER_NODE = 64  # gpu_count is the file's shorthand, not a column


def field_specs() -> tuple[dict[str, Spec], dict[str, Spec], dict[str, Spec]]:
    """The file's fields for GPU models, sites and nodes, read from the models' fields."""
    gpu_models = {
        "slug": _from_model(GpuModel, "slug", pattern=_SLUG),
        **{n: _from_model(GpuModel, n) for n in ("name", "vendor", "memory_gb", "tdp_watts")},
        "interconnect": _from_model(GpuModel, "interconnect"),
    }
    country = _from_model(Site, "country", pattern=_COUNTRY)
    sites = {
        "slug": _from_model(Site, "slug", pattern=_SLUG),
        "name": _from_model(Site, "name"),
        "region": _from_model(Site, "region", pattern=_SLUG),
        "country": Spec(_upper(country.parse), required=country.required),
        **{
            n: _from_model(Site, n)
            for n in ("grid_operator", "power_capacity_kw", "pue", "cooling")
        },
        "energy_price_per_mwh": _from_model(Site, "energy_price_per_mwh"),
        "energy_currency": _from_model(Site, "energy_currency", pattern=_CURRENCY),
        **{
            n: _from_model(Site, n)
            for n in ("renewable_share", "grid_carbon_g_per_kwh", "uplink_gbps", "former_use")
        },
        "status": _from_model(Site, "status", create_only=True),
    }
    gpu_model_slug = _from_model(GpuModel, "slug", pattern=_SLUG)
    nodes = {
        "hostname": _from_model(Node, "hostname", pattern=_HOSTNAME),
        "gpu_model": gpu_model_slug,
        "gpu_count": Spec(_integer(0, _MAX_GPUS_PER_NODE), required=False),
        "gpu_serials": Spec(_serials(Gpu._meta.get_field("serial").max_length), required=False),
        **{
            n: _from_model(Node, n)
            for n in ("cpu_model", "cpu_cores", "ram_gb", "disk_gb", "nic_gbps")
        },
        "status": _from_model(
            Node, "status", choices=[str(s) for s in _NODE_START_STATUSES], create_only=True
        ),
    }
    return gpu_models, sites, nodes


GPU_MODEL_FIELDS, SITE_FIELDS, NODE_FIELDS = field_specs()

# CSV column -> (kind, field)
CSV_COLUMNS: dict[str, tuple[str, str]] = {
    "site": ("site", "slug"),
    "site_name": ("site", "name"),
    **{name: ("site", name) for name in SITE_FIELDS if name not in {"slug", "name", "status"}},
    "site_status": ("site", "status"),
    **{name: ("node", name) for name in NODE_FIELDS if name != "status"},
    "node_status": ("node", "status"),
}

# --- Parsed records and problems -----------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


class ImportFailed(ValidationFailed):
    """The file has problems; nothing was written."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.message))
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(
            f"{len(self.problems)} problem(s) found; nothing was written:\n{lines}",
            code="import_failed",
        )


@dataclass
class Record:
    kind: str  # gpu_model | site | node
    line: int
    values: dict = field(default_factory=dict)
    lines: dict = field(default_factory=dict)  # field -> line it came from
    bad: set = field(default_factory=set)  # fields that failed to parse (already reported)
    exists: bool = False  # already in the database
    duplicate: bool = False  # its key was already used earlier in the file (reported)
    site_slug: str | None = None  # nodes: their site

    def line_of(self, name: str) -> int:
        return self.lines.get(name, self.line)


@dataclass
class Plan:
    gpu_models: list[Record] = field(default_factory=list)
    sites: list[Record] = field(default_factory=list)
    nodes: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def problem(self, line: int | None, message: str) -> None:
        self.problems.append(Problem(line, message))


_LABELS = {"gpu_model": "gpu model", "site": "site", "node": "node"}
_FIELDS = {"gpu_model": GPU_MODEL_FIELDS, "site": SITE_FIELDS, "node": NODE_FIELDS}


def _clean_into(plan: Plan, record: Record, raw: dict, raw_lines: dict) -> None:
    """Parse the given raw fields into record.values, reporting each bad one."""
    specs = _FIELDS[record.kind]
    for name, value in raw.items():
        line = raw_lines.get(name, record.line)
        if name not in specs:
            plan.problem(
                line, f"{_LABELS[record.kind]} {_key(record, raw)}: unknown field {name!r}"
            )
            continue
        if value is None or (isinstance(value, str) and not value.strip()):
            continue  # empty: treated as absent
        try:
            record.values[name] = specs[name].parse(value)
        except _Bad as bad:
            plan.problem(line, f"{_LABELS[record.kind]} {_key(record, raw)}: {name} {bad}")
            record.bad.add(name)
        else:
            record.lines[name] = line


def _key(record: Record, raw: dict) -> str:
    key = "hostname" if record.kind == "node" else "slug"
    return repr(record.values.get(key) or raw.get(key) or "?")


def _check_required(plan: Plan, record: Record) -> None:
    """A new row needs every required field; an existing one keeps what the file leaves out."""
    if record.exists:
        return
    missing = [
        name
        for name, spec in _FIELDS[record.kind].items()
        if spec.required and name not in record.values and name not in record.bad
    ]
    if missing:
        plan.problem(
            record.line,
            f"{_LABELS[record.kind]} {_key(record, {})}: missing required field(s) "
            f"{', '.join(missing)}",
        )


# --- YAML ----------------------------------------------------------------------------------


class _LineDict(dict):
    line: int
    key_lines: dict


class _LineLoader(yaml.SafeLoader):
    """A safe loader whose mappings remember their line and the line of each key.

    Anchors (&name) and aliases (*name) are refused: an inventory never needs them, and a few
    nested aliases expand a kilobyte into gigabytes (the "billion laughs").
    """

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.composer.ComposerError(
                None,
                None,
                "YAML anchors (&) and aliases (*) are not allowed in an inventory file; "
                "write each value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _construct_line_dict(loader: _LineLoader, node: yaml.MappingNode):
    mapping = _LineDict()
    mapping.line = node.start_mark.line + 1
    mapping.key_lines = {}
    yield mapping  # as SafeConstructor does, so that recursive structures work
    mapping.update(loader.construct_mapping(node))
    mapping.key_lines = {
        loader.construct_object(key): key.start_mark.line + 1 for key, _ in node.value
    }


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_line_dict)


def _parse_yaml(text: str, plan: Plan) -> None:
    try:
        document = yaml.load(text, Loader=_LineLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        plan.problem(mark.line + 1 if mark else None, f"not valid YAML: {exc}")
        return
    if not isinstance(document, dict):
        plan.problem(1, "the file must be a mapping with 'gpu_models' and 'sites'")
        return
    for key in document:
        if key not in {"gpu_models", "sites"}:
            plan.problem(document.key_lines.get(key), f"unknown top-level key {key!r}")
    for item in _list(plan, document, "gpu_models"):
        record = Record("gpu_model", item.line)
        _clean_into(plan, record, dict(item), item.key_lines)
        plan.gpu_models.append(record)
    for item in _list(plan, document, "sites"):
        site = Record("site", item.line)
        nodes = _list(plan, item, "nodes")
        _clean_into(plan, site, {k: v for k, v in item.items() if k != "nodes"}, item.key_lines)
        plan.sites.append(site)
        for node_item in nodes:
            node = Record("node", node_item.line, site_slug=site.values.get("slug"))
            _clean_into(plan, node, dict(node_item), node_item.key_lines)
            plan.nodes.append(node)


def _list(plan: Plan, mapping: _LineDict, key: str) -> list[_LineDict]:
    items = mapping.get(key) or []
    line = mapping.key_lines.get(key, mapping.line)
    if not isinstance(items, list):
        plan.problem(line, f"{key!r} must be a list")
        return []
    good = []
    for item in items:
        if isinstance(item, _LineDict):
            good.append(item)
        else:
            plan.problem(line, f"each entry of {key!r} must be a mapping, got {item!r}")
    return good


# --- CSV -----------------------------------------------------------------------------------


def _csv_rows(reader: csv.DictReader, plan: Plan):
    """The reader's rows, until one the csv module cannot read (a field over its
    field_size_limit, 128 KiB, which no inventory value needs): that one is reported with its
    line and ends the file."""
    try:
        yield from reader
    except csv.Error as exc:
        # The csv reader's own count: DictReader's is updated only after a row is read.
        plan.problem(reader.reader.line_num, f"not valid CSV: {exc}")


def _parse_csv(text: str, plan: Plan) -> None:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
    except csv.Error as exc:
        plan.problem(1, f"not valid CSV: {exc}")
        return
    reader.fieldnames = header
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        plan.problem(1, f"unknown column(s): {', '.join(unknown)}")
    if "site" not in header or "hostname" not in header:
        plan.problem(1, "the header must have at least the columns 'site' and 'hostname'")
        return
    sites: dict[str, Record] = {}
    for row in _csv_rows(reader, plan):
        line = reader.line_num
        if None in row:
            plan.problem(line, "more cells than columns in the header")
        raw = {"site": {}, "node": {}}
        for column, value in row.items():
            if column in CSV_COLUMNS and value is not None:
                kind, name = CSV_COLUMNS[column]
                raw[kind][name] = value
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # a blank line
        partial = Record("site", line)
        _clean_into(plan, partial, raw["site"], {})
        slug = partial.values.get("slug")
        if slug is None:
            if "slug" in raw["site"] and str(raw["site"]["slug"]).strip():
                pass  # bad slug: already reported
            else:
                plan.problem(line, "missing required column value 'site'")
        elif slug not in sites:
            sites[slug] = partial
            plan.sites.append(partial)
        else:
            _merge_site(plan, sites[slug], partial)
        node = Record("node", line, site_slug=slug)
        _clean_into(plan, node, raw["node"], {})
        plan.nodes.append(node)


def _merge_site(plan: Plan, site: Record, partial: Record) -> None:
    for name, value in partial.values.items():
        if name not in site.values:
            site.values[name] = value
            site.lines[name] = partial.line
        elif site.values[name] != value:
            plan.problem(
                partial.line,
                f"site {site.values['slug']!r}: {name} is {value} here but "
                f"{site.values[name]} on line {site.line_of(name)}",
            )


# --- Validation across records -------------------------------------------------------------


def _mark_existing(plan: Plan) -> None:
    for records, model, key in [
        (plan.gpu_models, GpuModel, "slug"),
        (plan.sites, Site, "slug"),
        (plan.nodes, Node, "hostname"),
    ]:
        keys = {r.values[key] for r in records if key in r.values}
        found = set(_in_batches(model.objects.values_list(key, flat=True), key, keys))
        for record in records:
            record.exists = record.values.get(key) in found


def _validate(plan: Plan) -> None:
    _mark_existing(plan)
    seen: dict[tuple[str, str], int] = {}
    for record in [*plan.gpu_models, *plan.sites, *plan.nodes]:
        key_field = "hostname" if record.kind == "node" else "slug"
        key = record.values.get(key_field)
        if key is not None:
            if (record.kind, key) in seen:
                record.duplicate = True
                plan.problem(
                    record.line,
                    f"{_LABELS[record.kind]} {key!r} appears twice in the file "
                    f"(first on line {seen[(record.kind, key)]})",
                )
            else:
                seen[(record.kind, key)] = record.line
        _check_required(plan, record)

    file_models = {r.values["slug"] for r in plan.gpu_models if "slug" in r.values}
    wanted = {r.values["gpu_model"] for r in plan.nodes if "gpu_model" in r.values}
    db_models = set(
        GpuModel.objects.filter(slug__in=wanted - file_models).values_list("slug", flat=True)
    )
    for node in plan.nodes:
        model = node.values.get("gpu_model")
        if model is not None and model not in file_models | db_models:
            plan.problem(
                node.line_of("gpu_model"),
                f"node {node.values.get('hostname', '?')!r}: unknown gpu model {model!r}",
            )
        _resolve_gpus(plan, node)
    _check_against_database(plan)


def _resolve_gpus(plan: Plan, node: Record) -> None:
    """Settle the node's GPU list: explicit serials, or gpu_count generated ones."""
    count = node.values.get("gpu_count")
    serials = node.values.get("gpu_serials")
    hostname = node.values.get("hostname", "?")
    if {"gpu_count", "gpu_serials"} & node.bad:
        return
    if serials is not None and count is not None and count != len(serials):
        plan.problem(
            node.line_of("gpu_count"),
            f"node {hostname!r}: gpu_count is {count} but {len(serials)} gpu_serials are given",
        )
    elif serials is None and count is None:
        if not node.exists:  # an existing node keeps its GPUs
            plan.problem(node.line, f"node {hostname!r}: give gpu_count or gpu_serials")
    elif serials is None:
        node.values["gpu_serials"] = [f"{hostname}-gpu{i}" for i in range(count)]
    node.values.pop("gpu_count", None)


def _refuse_new_nodes_at_retired_sites(plan: Plan, existing: dict) -> None:
    """A retired site is final and leaves the fleet only once all its nodes have (the status
    service's rule): no node joins one, whether the site was retired before or is created
    retired by this file."""
    new = [n for n in plan.nodes if n.site_slug and n.values.get("hostname") not in existing]
    file_status = {
        r.values["slug"]: r.values.get("status") for r in plan.sites if "slug" in r.values
    }
    db_status = dict(
        _in_batches(Site.objects.values_list("slug", "status"), "slug", {n.site_slug for n in new})
    )
    for record in new:
        status = db_status.get(record.site_slug, file_status.get(record.site_slug))
        if status == SiteStatus.RETIRED:
            plan.problem(
                record.line,
                f"node {record.values.get('hostname', '?')!r}: site {record.site_slug!r} is "
                "retired; import adds no node to a retired site",
            )


def _check_against_database(plan: Plan) -> None:
    """Refuse what import must not do to existing rows, and serials owned elsewhere."""
    by_host = {n.values["hostname"]: n for n in plan.nodes if "hostname" in n.values}
    existing = {
        node.hostname: node
        for node in _in_batches(
            Node.objects.select_related("gpu_model", "site"), "hostname", by_host
        )
    }
    gpu_counts = Counter(
        _in_batches(
            Gpu.objects.values_list("node__hostname", flat=True), "node__hostname", existing
        )
    )
    for hostname, node in existing.items():
        record = by_host[hostname]
        wanted = record.values.get("gpu_model")
        if wanted is not None and wanted != node.gpu_model.slug:
            plan.problem(
                record.line_of("gpu_model"),
                f"node {hostname!r}: its gpu model is {node.gpu_model.slug!r}; import does not "
                f"change an existing node's GPU model to {wanted!r}",
            )
        if record.site_slug is not None and record.site_slug != node.site.slug:
            # Placement, curtailment and prices go by a node's site: a move is not an edit.
            plan.problem(
                record.line,
                f"node {hostname!r} is at site {node.site.slug!r}; import does not move an "
                f"existing node to site {record.site_slug!r}",
            )
        serials = record.values.get("gpu_serials")
        if serials is not None and len(serials) < gpu_counts[hostname]:
            plan.problem(
                record.line_of("gpu_count") if "gpu_count" in record.lines else record.line,
                f"node {hostname!r} has {gpu_counts[hostname]} GPUs; the file gives "
                f"{len(serials)}; import never removes GPUs (remove them in the admin)",
            )
    _refuse_new_nodes_at_retired_sites(plan, existing)
    owner: dict[str, tuple[str, int, int]] = {}
    for record in plan.nodes:
        if record.duplicate:
            continue
        for index, serial in enumerate(record.values.get("gpu_serials") or []):
            hostname = record.values.get("hostname", "?")
            if serial in owner:
                plan.problem(
                    record.line_of("gpu_serials"),
                    f"node {hostname!r}: GPU serial {serial!r} is also on line {owner[serial][2]}",
                )
            else:
                owner[serial] = (hostname, index, record.line_of("gpu_serials"))
    taken = _in_batches(
        Gpu.objects.values_list("serial", "node__hostname", "index"), "serial", owner
    )
    for serial, hostname, index in taken:
        file_host, file_index, line = owner[serial]
        if hostname == file_host and index != file_index:
            # Jobs, telemetry and health name a GPU by its index on its node.
            plan.problem(
                line,
                f"node {file_host!r}: GPU serial {serial!r} is its gpu {index}; import does "
                f"not change an existing GPU's index (to {file_index})",
            )
        elif (hostname, index) != (file_host, file_index):
            plan.problem(
                line,
                f"node {file_host!r}: GPU serial {serial!r} already belongs to "
                f"{hostname} gpu {index}",
            )


# --- Writing -------------------------------------------------------------------------------


@dataclass
class ImportReport:
    counts: dict[str, Counter] = field(
        default_factory=lambda: {k: Counter() for k in ("gpu models", "sites", "nodes", "gpus")}
    )

    def summary(self) -> str:
        return "; ".join(
            f"{kind}: {c['created']} created, {c['updated']} updated, {c['unchanged']} unchanged"
            for kind, c in self.counts.items()
        )

    @property
    def changed(self) -> bool:
        return any(c["created"] or c["updated"] for c in self.counts.values())


def _upsert(model, lookup: dict, given: dict, on_create: dict, counter: Counter):
    """Create with given + on_create values, or update only the given fields that differ."""
    obj = model.objects.filter(**lookup).first()
    if obj is None:
        obj = model.objects.create(**lookup, **on_create, **given)
        counter["created"] += 1
        return obj
    changed = [name for name, value in given.items() if getattr(obj, name) != value]
    if changed:
        for name in changed:
            setattr(obj, name, given[name])
        if hasattr(obj, "updated_at"):
            changed.append("updated_at")
        obj.save(update_fields=changed)
        counter["updated"] += 1
    else:
        counter["unchanged"] += 1
    return obj


def _split(record: Record, exclude: set[str]) -> tuple[dict, dict]:
    """(fields the file gives, extra fields used only on creation: defaults and statuses)."""
    given, on_create = {}, {}
    for name, spec in _FIELDS[record.kind].items():
        if name in exclude:
            continue
        if name in record.values:
            (on_create if spec.create_only else given)[name] = record.values[name]
        elif spec.default is not None:
            on_create[name] = spec.default
    return given, on_create


def _apply(plan: Plan) -> ImportReport:
    report = ImportReport()
    models = {}
    for record in plan.gpu_models:
        given, on_create = _split(record, {"slug"})
        models[record.values["slug"]] = _upsert(
            GpuModel, {"slug": record.values["slug"]}, given, on_create, report.counts["gpu models"]
        )
    wanted = {r.values["gpu_model"] for r in plan.nodes if "gpu_model" in r.values} - set(models)
    models.update({m.slug: m for m in GpuModel.objects.filter(slug__in=wanted)})
    sites = {}
    for record in plan.sites:
        given, on_create = _split(record, {"slug"})
        sites[record.values["slug"]] = _upsert(
            Site, {"slug": record.values["slug"]}, given, on_create, report.counts["sites"]
        )
    nodes = _apply_nodes(plan, models, sites, report.counts["nodes"])
    _apply_gpus(plan, nodes, report.counts["gpus"])
    return report


def _apply_nodes(plan: Plan, models: dict, sites: dict, counter: Counter) -> dict[str, Node]:
    """Create or update every node in batches; returns them by hostname."""
    hostnames = [r.values["hostname"] for r in plan.nodes]
    existing = {n.hostname: n for n in _in_batches(Node.objects.all(), "hostname", hostnames)}
    now = timezone.now()
    created, updated, update_fields, nodes = [], [], set(), {}
    for record in plan.nodes:
        given, on_create = _split(record, {"hostname", "gpu_model", "gpu_serials", "gpu_count"})
        given["site_id"] = sites[record.site_slug].pk
        hostname = record.values["hostname"]
        node = existing.get(hostname)
        if node is None:  # an existing node's model never changes (refused in validation)
            node = Node(
                hostname=hostname,
                gpu_model=models[record.values["gpu_model"]],
                **on_create,
                **given,
            )
            created.append(node)
            counter["created"] += 1
        else:
            changed = [name for name, value in given.items() if getattr(node, name) != value]
            for name in changed:
                setattr(node, name, given[name])
            if changed:
                node.updated_at = now
                update_fields.update(changed)
                updated.append(node)
                counter["updated"] += 1
            else:
                counter["unchanged"] += 1
        nodes[hostname] = node
    Node.objects.bulk_create(created, batch_size=_INSERT_BATCH)
    if updated:
        Node.objects.bulk_update(
            updated, [*sorted(update_fields), "updated_at"], batch_size=_INSERT_BATCH // 4
        )
    return nodes


def _apply_gpus(plan: Plan, nodes: dict[str, Node], counter: Counter) -> None:
    """Create the GPUs the file adds and re-serial the ones it renames, in batches."""
    with_gpus = [r for r in plan.nodes if "gpu_serials" in r.values]
    existing: dict[int, dict[int, Gpu]] = {}
    node_ids = [nodes[r.values["hostname"]].pk for r in with_gpus if r.exists]
    for gpu in _in_batches(Gpu.objects.all(), "node_id", node_ids):
        existing.setdefault(gpu.node_id, {})[gpu.index] = gpu
    created, renamed = [], []
    for record in with_gpus:
        node = nodes[record.values["hostname"]]
        have = existing.get(node.pk, {})
        for index, serial in enumerate(record.values["gpu_serials"]):
            gpu = have.get(index)
            if gpu is None:
                created.append(Gpu(node=node, index=index, serial=serial))
                counter["created"] += 1
            elif gpu.serial != serial:
                gpu.serial = serial
                renamed.append(gpu)
                counter["updated"] += 1
            else:
                counter["unchanged"] += 1
    Gpu.objects.bulk_create(created, batch_size=_INSERT_BATCH)
    Gpu.objects.bulk_update(renamed, ["serial"], batch_size=_INSERT_BATCH)


# --- Entry point ---------------------------------------------------------------------------


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


def inventory_import(*, path: Path, dry_run: bool = False) -> ImportReport:
    """Validate the whole file, then create or update everything in it in one transaction.

    Raises ImportFailed (listing every problem with its line) and writes nothing if any row is
    bad. With dry_run, the changes are made and rolled back, so the report is exact.
    """
    suffix = path.suffix.lower()
    if suffix not in {".yaml", ".yml", ".csv"}:
        raise ValidationFailed(
            f"{path.name}: the file must end in .yaml, .yml or .csv", field="file"
        )
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ValidationFailed(f"{path}: cannot read the file: {exc}", field="file") from None
    limit = settings.INVENTORY_IMPORT_MAX_BYTES
    if size > limit:
        raise ValidationFailed(
            f"{path.name} is {_size(size)}; an inventory file may be at most {_size(limit)} "
            "(INVENTORY_IMPORT_MAX_BYTES). Split it by site and import the parts one after "
            "another.",
            code="file_too_large",
            field="file",
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValidationFailed(f"{path}: cannot read the file: {exc}", field="file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValidationFailed(
            f"{path.name}: line {line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file "
            "as UTF-8 and import it again. Nothing was written.",
            code="file_not_utf8",
            field="file",
        ) from None
    plan = Plan()
    if suffix == ".csv":
        _parse_csv(text, plan)
    else:
        _parse_yaml(text, plan)
    _validate(plan)
    if plan.problems:
        raise ImportFailed(plan.problems)
    with transaction.atomic():
        report = _apply(plan)
        if dry_run:
            transaction.set_rollback(True)
    return report
