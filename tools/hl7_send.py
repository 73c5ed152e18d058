#!/usr/bin/env python3
"""Sends HL7 v2 messages over MLLP with python-hl7's client, as an LIS would,
and prints each ACK (segments separated by newlines, one blank line after each).
The tests of `cinflow lis-bridge` use it to send signed-out results.

Usage: hl7_send.py HOST PORT FILE...   (each FILE holds one message; CR, LF or
CRLF between segments)
"""

import sys

import hl7
from hl7.client import MLLPClient


def main():
    host, port, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    with MLLPClient(host, port) as client:
        for f in files:
            text = open(f).read().replace("\r\n", "\r").replace("\n", "\r").strip("\r")
            msg = hl7.parse(text)
            ack = client.send_message(msg)
            if isinstance(ack, bytes):
                ack = ack.decode()
            # Strip the MLLP frame bytes python-hl7 leaves in place.
            ack = ack.strip("\x0b\x1c\r\n")
            print(ack.replace("\r", "\n").strip() + "\n", flush=True)


if __name__ == "__main__":
    main()
