#!/usr/bin/env python3
"""POSTs FHIR R4 resources as an LIS would: each file is validated with
fhir.resources first (so what the test sends is valid FHIR R4), then POSTed
as application/fhir+json to URL. Prints each answer as one JSON line
{"status": N, "body": ...}. The tests of `cinflow lis-bridge` use it to send
signed-out DiagnosticReports.

Usage: fhir_post.py URL FILE...
"""

import json
import sys
import urllib.error
import urllib.request

from fhir.resources import get_fhir_model_class


def main():
    url, files = sys.argv[1], sys.argv[2:]
    for f in files:
        doc = json.load(open(f))
        get_fhir_model_class(doc["resourceType"]).parse_obj(doc)
        req = urllib.request.Request(
            url,
            data=json.dumps(doc).encode(),
            method="POST",
            headers={"Content-Type": "application/fhir+json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        print(json.dumps({"status": status, "body": json.loads(body)}), flush=True)


if __name__ == "__main__":
    main()
