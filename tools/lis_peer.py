#!/usr/bin/env python3
"""A stand-in LIS for the tests of `cinflow lis-bridge`, built only from
independent libraries: an HL7 v2 MLLP receiver (python-hl7's asyncio MLLP
server) that validates every message's structure against HL7 v2.5.1 with
hl7apy and answers with an ACK, and a FHIR R4 server (http.server) that
validates every transaction Bundle with fhir.resources and carries it out
the way a FHIR server does: conditional updates and creates on identifiers,
urn:uuid references resolved to server ids, a transaction-response Bundle.

Like a real LIS it refuses what it cannot file: a patient id starting with
REFUSE gets an AR (HL7) or a 422 with an OperationOutcome (FHIR); a message
or Bundle that does not validate gets an AR or a 400 naming the problem.

Faults on request (GET /_control?hl7_fail=N&fhir_fail=N&hl7_delay_s=S): the
next N messages get no ACK (the connection is closed), the next N Bundles a
503, and each ACK waits S seconds. GET /_store answers every stored resource.
Every message and Bundle received is appended to --log as one JSON line.

Usage: lis_peer.py --mllp-port P --http-port Q --log FILE [--token-file F]
Prints "ready" once both listen.
"""

import argparse
import asyncio
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hl7
import hl7.mllp
from fhir.resources.bundle import Bundle
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

LOCK = threading.Lock()
STATE = {"hl7_fail": 0, "fhir_fail": 0, "hl7_delay_s": 0.0}
STORE = {}  # resourceType -> {id: resource}
VERSIONS = {}  # (type, id) -> version


def log(args, entry):
    with LOCK, open(args.log, "a") as f:
        f.write(json.dumps(entry) + "\n")


def take(name):
    with LOCK:
        if STATE[name] > 0:
            STATE[name] -= 1
            return True
    return False


# ---------------------------------------------------------------- HL7 v2 ----


def validate_v251(text):
    """hl7apy's strict validation of the ORU_R01 structure. hl7apy parses
    OBX-5 (type varies) as ST of at most 199 characters whatever OBX-2 says;
    TX values (up to 65536 characters in 2.5.1) are therefore replaced by a
    placeholder here and read with python-hl7 instead."""
    segs = []
    for seg in text.split("\r"):
        f = seg.split("|")
        if f[0] == "OBX" and len(f) > 5 and f[2] == "TX":
            f[5] = "link"
        segs.append("|".join(f))
    m = parse_message(
        "\r".join(segs), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
    )
    m.validate()
    if m.msh.msh_9.to_er7() != "ORU^R01^ORU_R01":
        raise ValueError(f"MSH-9 is {m.msh.msh_9.to_er7()}, not ORU^R01^ORU_R01")
    if m.msh.msh_12.to_er7() != "2.5.1":
        raise ValueError(f"MSH-12 is {m.msh.msh_12.to_er7()}, not 2.5.1")
    return [c.name for c in m.ORU_R01_PATIENT_RESULT.children]


def fields(msg):
    """Every segment as lists of unescaped field values (python-hl7)."""
    out = []
    for seg in msg:
        name = str(seg[0])
        vals = []
        for i in range(1, len(seg)):
            vals.append(msg.unescape(str(seg[i])))
        out.append([name] + vals)
    return out


async def on_client(reader, writer, args):
    try:
        while not writer.is_closing():
            msg = await reader.readmessage()
            text = str(msg)
            control_id = str(msg.segment("MSH")[10])
            entry = {"kind": "hl7", "control_id": control_id, "text": text}
            if take("hl7_fail"):
                entry["answer"] = "dropped"
                log(args, entry)
                writer.close()
                return
            try:
                entry["groups"] = validate_v251(text.rstrip("\r"))
                entry["valid"] = True
            except Exception as e:  # noqa: BLE001 - any validation failure is the answer
                entry["valid"] = False
                entry["error"] = f"{type(e).__name__}: {e}"
            entry["segments"] = fields(msg)
            pid = [s for s in entry["segments"] if s[0] == "PID"]
            patient = pid[0][3].split("^")[0] if pid else ""
            if not entry["valid"]:
                code, text_ = "AR", "invalid ORU^R01: " + entry["error"]
            elif patient.startswith("REFUSE"):
                code, text_ = "AR", f"unknown patient {patient}"
            else:
                code, text_ = "AA", ""
            entry["answer"] = code
            log(args, entry)
            delay = STATE["hl7_delay_s"]
            if delay:
                await asyncio.sleep(delay)
            ack = msg.create_ack(code, message_id=f"ACK{control_id}"[:20])
            if text_:
                ack.segment("MSA").assign_field(text_.replace("|", "/").replace("^", " "), 3)
            writer.writemessage(ack)
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


async def mllp_server(args, ready):
    server = await hl7.mllp.start_hl7_server(
        lambda r, w: on_client(r, w, args), "127.0.0.1", args.mllp_port
    )
    ready.set()
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------------ FHIR ----


def outcome(code, text):
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


def identifiers_match(resource, token):
    system, _, value = token.partition("|")
    return any(
        i.get("system") == system and i.get("value") == value
        for i in resource.get("identifier", [])
    )


def search(kind, query):
    """The ids of `kind` matching a conditional URL's query (identifier, or
    Provenance's chained target:DiagnosticReport.identifier)."""
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    found = []
    for rid, res in STORE.get(kind, {}).items():
        ok = True
        for name, values in params.items():
            for v in values:
                if name == "identifier":
                    ok &= identifiers_match(res, v)
                elif name == "target:DiagnosticReport.identifier":
                    reports = {
                        f"DiagnosticReport/{i}"
                        for i, r in STORE.get("DiagnosticReport", {}).items()
                        if identifiers_match(r, v)
                    }
                    ok &= any(t.get("reference") in reports for t in res.get("target", []))
                else:
                    raise ValueError(f"unsupported search parameter {name}")
        if ok:
            found.append(rid)
    return found


def resolve(v, urls):
    if isinstance(v, dict):
        for k, x in v.items():
            if k == "reference" and isinstance(x, str) and x.startswith("urn:uuid:"):
                if x not in urls:
                    raise ValueError(f"reference {x} is not an entry of the Bundle")
                v[k] = urls[x]
            else:
                resolve(x, urls)
    elif isinstance(v, list):
        for x in v:
            resolve(x, urls)


def transaction(bundle):
    """Carries out a validated transaction; returns (status, body)."""
    if bundle.get("type") != "transaction":
        return 400, outcome("invalid", "Bundle.type must be transaction")
    for e in bundle.get("entry", []):
        res = e["resource"]
        subject = res.get("subject", {}).get("identifier", {}).get("value", "")
        if subject.startswith("REFUSE"):
            return 422, outcome("business-rule", f"test LIS: unknown patient {subject}")
    plan = []
    urls = {}
    next_id = sum(len(v) for v in STORE.values())
    for e in bundle.get("entry", []):
        res, req = e["resource"], e.get("request", {})
        kind = res["resourceType"]
        method, url = req.get("method"), req.get("url", "")
        if method == "PUT":
            path, _, query = url.partition("?")
            if path != kind or not query:
                return 400, outcome("invalid", f"PUT {url}: expected a conditional update of {kind}")
            hits = search(kind, query)
            if len(hits) > 1:
                return 412, outcome("multiple-matches", f"PUT {url} matches {len(hits)} resources")
            rid = hits[0] if hits else None
        elif method == "POST":
            if url != kind:
                return 400, outcome("invalid", f"POST {url} for a {kind}")
            hits = search(kind, req["ifNoneExist"]) if req.get("ifNoneExist") else []
            rid = hits[0] if hits else None
        else:
            return 400, outcome("not-supported", f"method {method}")
        created = rid is None
        if created:
            next_id += 1
            rid = f"{kind.lower()}-{next_id}"
        plan.append((e, kind, rid, method, created))
        urls[e["fullUrl"]] = f"{kind}/{rid}"
    response = []
    for e, kind, rid, method, created in plan:
        res = json.loads(json.dumps(e["resource"]))
        resolve(res, urls)
        if method == "POST" and not created:
            status = "200 OK"
        else:
            res["id"] = rid
            STORE.setdefault(kind, {})[rid] = res
            VERSIONS[(kind, rid)] = VERSIONS.get((kind, rid), 0) + 1
            status = "201 Created" if created else "200 OK"
        response.append(
            {
                "response": {
                    "status": status,
                    "location": f"{kind}/{rid}/_history/{VERSIONS.get((kind, rid), 1)}",
                }
            }
        )
    return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": response}


class Handler(BaseHTTPRequestHandler):
    args = None

    def log_message(self, *a):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        u = urllib.parse.urlparse(self.path)
        if u.path == "/_control":
            with LOCK:
                for k, v in urllib.parse.parse_qs(u.query).items():
                    STATE[k] = float(v[0]) if k.endswith("_s") else int(v[0])
            return self.answer(200, dict(STATE))
        if u.path == "/_store":
            with LOCK:
                return self.answer(200, STORE)
        m = re.fullmatch(r"/fhir/(\w+)", u.path)
        if m:
            with LOCK:
                ids = search(m.group(1), u.query)
                hits = [STORE[m.group(1)][i] for i in ids]
            return self.answer(
                200,
                {
                    "resourceType": "Bundle",
                    "type": "searchset",
                    "total": len(hits),
                    "entry": [{"resource": r} for r in hits],
                },
            )
        self.answer(404, outcome("not-found", self.path))

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        entry = {"kind": "fhir", "path": self.path}
        token = open(self.args.token_file).read().strip() if self.args.token_file else None
        if token and self.headers.get("Authorization") != f"Bearer {token}":
            entry["status"] = 401
            log(self.args, entry)
            return self.answer(401, outcome("security", "bearer token missing or not valid"))
        if take("fhir_fail"):
            entry["status"] = 503
            log(self.args, entry)
            return self.answer(503, outcome("transient", "test LIS: temporarily unavailable"))
        try:
            doc = json.loads(body)
            entry["bundle"] = doc
            Bundle.parse_obj(doc)
            if self.headers.get("Content-Type", "").split(";")[0] != "application/fhir+json":
                raise ValueError(f"Content-Type {self.headers.get('Content-Type')}")
            entry["valid"] = True
        except Exception as e:  # noqa: BLE001 - any validation failure is the answer
            entry["valid"] = False
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["status"] = 400
            log(self.args, entry)
            return self.answer(400, outcome("structure", entry["error"][:2000]))
        with LOCK:
            try:
                status, answer = transaction(doc)
            except Exception as e:  # noqa: BLE001
                status, answer = 400, outcome("processing", f"{type(e).__name__}: {e}")
        entry["status"] = status
        entry["answer"] = answer
        log(self.args, entry)
        self.answer(status, answer)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mllp-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--token-file")
    args = p.parse_args()
    Handler.args = args
    http = ThreadingHTTPServer(("127.0.0.1", args.http_port), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    loop = asyncio.new_event_loop()
    ready = asyncio.Event()

    async def run():
        task = asyncio.create_task(mllp_server(args, ready))
        await ready.wait()
        print("ready", flush=True)
        await task

    loop.run_until_complete(run())


if __name__ == "__main__":
    main()
