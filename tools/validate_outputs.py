#!/usr/bin/env python3
"""Independent validation of cinflow's outputs, for the tests and for a LIS team.

    validate_outputs.py schema SCHEMA.json FILE.json...   JSON Schema (draft 2020-12,
                                                          formats checked)
    validate_outputs.py fhir FILE.json...                 FHIR R4 (4.0.1) DiagnosticReport,
                                                          with the fhir.resources models

Each FILE may also be a JSON array of documents. Prints one line per document
("ok <file>[index]") and every problem found; exits 1 if any document is invalid.
"""
import json
import sys


def documents(path):
    with open(path) as f:
        data = json.load(f)
    items = data if isinstance(data, list) else [data]
    for i, doc in enumerate(items):
        yield (f"{path}[{i}]" if isinstance(data, list) else path), doc


def check_schema(schema_path, files):
    from jsonschema import Draft202012Validator

    with open(schema_path) as f:
        schema = json.load(f)
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    bad = 0
    for path in files:
        for name, doc in documents(path):
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
            if errors:
                bad += 1
                for e in errors:
                    where = "/".join(str(p) for p in e.absolute_path) or "(root)"
                    print(f"INVALID {name}: {where}: {e.message}")
            else:
                print(f"ok {name}")
    return bad


def references(resource):
    """Every `reference` string anywhere in a resource."""
    if isinstance(resource, dict):
        for k, v in resource.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from references(v)
    elif isinstance(resource, list):
        for v in resource:
            yield from references(v)


# http://hl7.org/fhir/R4/valueset-diagnostic-report-status.html
REPORT_STATUS = (
    "registered",
    "partial",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "appended",
    "cancelled",
    "entered-in-error",
    "unknown",
)


def check_fhir(files):
    import fhir.resources
    from fhir.resources.diagnosticreport import DiagnosticReport

    assert fhir.resources.__fhir_version__ == "4.0.1", fhir.resources.__fhir_version__
    bad = 0
    for path in files:
        for name, doc in documents(path):
            problems = []
            try:
                report = DiagnosticReport.parse_obj(doc)
            except Exception as e:  # pydantic.ValidationError names every field
                problems.append(str(e))
                report = None
            if report is not None:
                # Invariants the models do not check: contained resources must be
                # referenced (dom-3) and local references must resolve.
                contained = {r.get("id") for r in doc.get("contained", [])}
                local = {r[1:] for r in references(doc) if r.startswith("#")}
                for missing in sorted(local - contained):
                    problems.append(f"reference #{missing} has no contained resource")
                for orphan in sorted(contained - local):
                    problems.append(f"contained resource {orphan} is not referenced (dom-3)")
                # Required bindings the models leave to a terminology server.
                if doc.get("status") not in REPORT_STATUS:
                    problems.append(f"status {doc.get('status')!r} is not in the R4 value set {REPORT_STATUS}")
                empty = [k for k, v in doc.items() if v == [] or v == {} or v == ""]
                for k in empty:
                    problems.append(f"{k} is empty (FHIR JSON has no empty arrays, objects or strings)")
                for r in doc.get("contained", []):
                    if r.get("resourceType") == "Observation" and r.get("status") not in (
                        "preliminary",
                        "registered",
                    ):
                        problems.append(f"{r.get('id')}: a computer-assisted finding must not be final")
            if problems:
                bad += 1
                for p in problems:
                    print(f"INVALID {name}: {p}")
            else:
                print(f"ok {name}")
    return bad


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("schema", "fhir"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    if sys.argv[1] == "schema":
        bad = check_schema(sys.argv[2], sys.argv[3:])
    else:
        bad = check_fhir(sys.argv[2:])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
