"""Series-classification rules as data: load, validate, and name the bad rule on error.

The default rules ship as ``worker/rules/series.yaml``; a site overrides them with
``settings.rules_file``. :func:`load_rules` is called at worker start-up so a broken file stops the
worker with a message such as ``rules file site.yaml: rule 'flair-ir' (#21): unknown field 'TI'``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.errors import SynthperfError

DEFAULT_RULES = Path(__file__).with_name("series.yaml")
ROLES = ("DWI", "ADC", "FLAIR", "DSC", "OTHER")

#: Feature name -> kind. The classifier computes exactly these for every series.
FEATURES: dict[str, str] = {
    "modality": "text",
    "sop_class": "set",
    "image_type": "set",
    "acquisition_contrast": "set",
    "photometric": "set",
    "samples_per_pixel": "number",
    "colour": "bool",
    "n_orientations": "number",
    "b_standard_max": "number",
    "b_siemens_max": "number",
    "b_ge_max": "number",
    "b_philips_max": "number",
    "b_any_max": "number",
    "has_b_standard": "bool",
    "has_b_private": "bool",
    "diffusion_directionality": "set",
    "diffusion_anisotropy": "set",
    "scanning_sequence": "set",
    "sequence_variant": "set",
    "sequence_name": "text",
    "echo_time": "number",
    "repetition_time": "number",
    "inversion_time": "number",
    "inversion_recovery": "bool",
    "epi": "bool",
    "gradient_echo": "bool",
    "spin_echo": "bool",
    "temporal_positions": "number",
    "volumes_per_position": "number",
    "asl": "bool",
    "bolus_drop": "number",
    "contrast_agent": "text",
    "description": "text",
}

OPS: dict[str, set[str]] = {
    "equals": {"text", "number", "bool"},
    "in": {"text", "number"},
    "not_in": {"text", "number"},
    "any_of": {"set"},
    "none_of": {"set"},
    "gt": {"number"},
    "ge": {"number"},
    "lt": {"number"},
    "le": {"number"},
    "matches": {"text"},
    "present": {"text", "number", "bool", "set"},
}


class RulesError(SynthperfError):
    """The rules file is invalid; the message names the file, the rule and the problem."""


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: Any

    def test(self, features: dict[str, Any]) -> bool:
        v = features.get(self.field)
        op, want = self.op, self.value
        if op == "present":
            has = v is not None and v != "" and v != set() and v != frozenset()
            return has == bool(want)
        if v is None:
            return False
        if op == "equals":
            return v == want
        if op == "in":
            return v in want
        if op == "not_in":
            return v not in want
        if op == "any_of":
            return bool(set(v) & set(want))
        if op == "none_of":
            return not (set(v) & set(want))
        if op == "matches":
            return re.search(want, str(v), re.IGNORECASE) is not None
        num = float(v)
        return {"gt": num > want, "ge": num >= want, "lt": num < want, "le": num <= want}[op]


@dataclass(frozen=True)
class Rule:
    name: str
    role: str
    confidence: float
    why: str
    when: tuple[Condition, ...]


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    b0_max: float
    source: str


def _check_condition(raw: Any, where: str) -> Condition:
    if not isinstance(raw, dict):
        raise RulesError(f"{where}: a condition must be a mapping like {{field: echo_time, ge: 70}}")
    if "field" not in raw:
        raise RulesError(f"{where}: condition {raw} has no 'field'")
    field = raw["field"]
    if field not in FEATURES:
        raise RulesError(f"{where}: unknown field {field!r}; known fields: {', '.join(sorted(FEATURES))}")
    ops = [k for k in raw if k != "field"]
    if len(ops) != 1:
        raise RulesError(f"{where}: condition on {field!r} needs exactly one operator, got {ops or 'none'}")
    op = ops[0]
    if op not in OPS:
        raise RulesError(f"{where}: unknown operator {op!r}; use one of {', '.join(sorted(OPS))}")
    kind = FEATURES[field]
    if kind not in OPS[op]:
        raise RulesError(f"{where}: operator {op!r} does not apply to {kind} field {field!r}")
    value = raw[op]
    if op in {"gt", "ge", "lt", "le"} and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise RulesError(f"{where}: {field} {op} needs a number, got {value!r}")
    if op in {"in", "not_in", "any_of", "none_of"}:
        if not isinstance(value, list) or not value:
            raise RulesError(f"{where}: {field} {op} needs a non-empty list, got {value!r}")
        if op in {"any_of", "none_of"}:
            value = [str(x).upper() if field != "sop_class" else str(x) for x in value]
    if op == "matches":
        try:
            re.compile(str(value))
        except re.error as exc:
            raise RulesError(f"{where}: bad regular expression {value!r}: {exc}") from exc
        value = str(value)
    if op == "present" and not isinstance(value, bool):
        raise RulesError(f"{where}: 'present' takes true or false, got {value!r}")
    if op == "equals" and kind == "bool" and not isinstance(value, bool):
        raise RulesError(f"{where}: {field} equals needs true or false, got {value!r}")
    return Condition(field=field, op=op, value=value)


def parse_rules(data: Any, source: str = "<rules>") -> RuleSet:
    """Validate a rules mapping (as loaded from YAML). Raises RulesError naming the bad rule."""
    if not isinstance(data, dict):
        raise RulesError(f"rules file {source}: must be a mapping with 'version' and 'rules'")
    if data.get("version") != 1:
        raise RulesError(f"rules file {source}: 'version' must be 1, got {data.get('version')!r}")
    b0_max = data.get("b0_max", 50)
    if isinstance(b0_max, bool) or not isinstance(b0_max, int | float) or b0_max < 0:
        raise RulesError(f"rules file {source}: 'b0_max' must be a non-negative number")
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RulesError(f"rules file {source}: 'rules' must be a non-empty list")
    rules: list[Rule] = []
    names: set[str] = set()
    for i, raw in enumerate(raw_rules, start=1):
        label = raw.get("name") if isinstance(raw, dict) else None
        where = f"rules file {source}: rule {label!r} (#{i})" if label else f"rules file {source}: rule #{i}"
        if not isinstance(raw, dict):
            raise RulesError(f"{where}: must be a mapping")
        unknown = set(raw) - {"name", "role", "confidence", "why", "when"}
        if unknown:
            raise RulesError(f"{where}: unknown keys {sorted(unknown)}")
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RulesError(f"{where}: needs a 'name'")
        if name in names:
            raise RulesError(f"{where}: duplicate rule name {name!r}")
        names.add(name)
        role = raw.get("role")
        if role not in ROLES:
            raise RulesError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        conf = raw.get("confidence")
        if isinstance(conf, bool) or not isinstance(conf, int | float) or not 0 < conf <= 1:
            raise RulesError(f"{where}: confidence must be a number in (0, 1], got {conf!r}")
        when = raw.get("when", [])
        if not isinstance(when, list):
            raise RulesError(f"{where}: 'when' must be a list of conditions")
        conds = tuple(_check_condition(c, where) for c in when)
        rules.append(Rule(name=name, role=role, confidence=float(conf), why=str(raw.get("why", "")), when=conds))
    if rules[-1].when:
        raise RulesError(
            f"rules file {source}: the last rule must be a catch-all with 'when: []' so every series gets a role"
        )
    return RuleSet(rules=tuple(rules), b0_max=float(b0_max), source=source)


def load_rules(path: str | Path | None = None) -> RuleSet:
    """Load and validate rules from ``path`` (a site file) or the packaged default."""
    p = Path(path) if path else DEFAULT_RULES
    if not p.is_file():
        raise RulesError(f"rules file {p}: does not exist (setting rules_file / SYNTHPERF_RULES_FILE)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise RulesError(f"rules file {p}: not valid YAML: {exc}") from exc
    return parse_rules(data, str(p))
