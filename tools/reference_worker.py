#!/usr/bin/env python3
"""A plain Python inference worker: the reference scripts/bench-worker.sh
measures cinflow's worker against, on the same images, broker and S3 server.

What a lab's first in-house worker would be: pika (one consumer, prefetch 1),
boto3, OpenCV (CLAHE on every channel, INTER_AREA resize) and onnxruntime
(default threads), the head and Grad-CAM in numpy, and one overlay per image
(the predicted class's, JPEG) plus a result JSON written back to S3, then the
ack. Not part of serving; not validated beyond the benchmark.

Environment: CINFLOW_AMQP_URL, CINFLOW_S3_ENDPOINT, AWS_REGION,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, CINFLOW_S3_BUCKET.
Arguments: BUNDLE QUEUE RESULTS_PREFIX N (stop after N jobs).
"""
import json
import os
import sys
import time
from pathlib import Path

import boto3
import cv2
import numpy as np
import onnxruntime as ort
import pika
from safetensors.numpy import load_file


def main(bundle: str, queue: str, prefix: str, n: int) -> None:
    b = Path(bundle)
    m = json.loads((b / "manifest.json").read_text())
    head = load_file(str(b / "head.safetensors"))
    w, bias = head["weight"], head["bias"]
    sess = ort.InferenceSession(str(b / "backbone.onnx"), providers=["CPUExecutionProvider"])
    mean = np.array(m["input"]["mean"], np.float32)
    std = np.array(m["input"]["std"], np.float32)
    width, height = m["input"]["width"], m["input"]["height"]
    clahe_cfg = m["preprocess"]["clahe"]
    clahe = cv2.createCLAHE(
        clipLimit=clahe_cfg["clip_limit"], tileGridSize=tuple(clahe_cfg["tile_grid"])
    )
    s3 = boto3.client("s3", endpoint_url=os.environ["CINFLOW_S3_ENDPOINT"],
                      region_name=os.environ.get("AWS_REGION", "garage"))
    bucket = os.environ.get("CINFLOW_S3_BUCKET", "cinflow")
    conn = pika.BlockingConnection(pika.URLParameters(os.environ["CINFLOW_AMQP_URL"]))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1)
    done = 0
    for method, _props, body in ch.consume(queue):
        job = json.loads(body)
        uri = job["images"][0]
        src_bucket, key = uri[len("s3://"):].split("/", 1)
        data = s3.get_object(Bucket=src_bucket, Key=key)["Body"].read()
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        img = cv2.merge([clahe.apply(c) for c in cv2.split(img)])
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        x = ((rgb.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)[None]
        (a,) = sess.run([m["features"]["name"]], {m["input"]["name"]: x})
        a = a[0]
        z = w @ a.mean(axis=(1, 2)) + bias
        e = np.exp(z - z.max())
        probs = e / e.sum()
        c = int(np.argmax(probs))
        cam = np.maximum(np.einsum("k,khw->hw", w[c], a), 0)
        cam = cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)
        heat = cv2.applyColorMap(np.uint8(255 * cam / max(cam.max(), 1e-12)), cv2.COLORMAP_JET)
        overlay = cv2.addWeighted(img, 0.6, heat, 0.4, 0)
        ok, jpg = cv2.imencode(".jpg", overlay)
        out = f"{prefix}/{job['job_id']}"
        s3.put_object(Bucket=bucket, Key=f"{out}/heatmap.jpg", Body=jpg.tobytes())
        s3.put_object(Bucket=bucket, Key=f"{out}/result.json", Body=json.dumps(
            {"job_id": job["job_id"], "probabilities": probs.tolist(), "predicted": c,
             "created_at": time.time()}).encode())
        ch.basic_ack(method.delivery_tag)
        done += 1
        if done >= n:
            break
    conn.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
