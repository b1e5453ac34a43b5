"""Tiny real fixtures for the eval tests: PNG images, VLMEvalKit TSVs, HF parquet tables."""
import base64
import io
import json

from PIL import Image


def png_bytes(color=(255, 0, 0), size=(6, 4), mode='RGB') -> bytes:
    fill = color if mode != 'RGBA' else color + (128,)
    buffer = io.BytesIO()
    Image.new(mode, size, fill).save(buffer, format='PNG')
    return buffer.getvalue()


def png_b64(color=(255, 0, 0), size=(6, 4), mode='RGB') -> str:
    return base64.b64encode(png_bytes(color, size, mode)).decode()


def write_tsv(path, header, rows):
    lines = ['\t'.join(header)] + ['\t'.join(str(c) for c in row) for row in rows]
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return path


def write_jsonl(path, rows):
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows), encoding='utf-8')
    return path


def send_json(handler, payload: dict) -> None:
    """Reply 200 with a JSON body from a BaseHTTPRequestHandler (the local judge endpoints)."""
    body = json.dumps(payload).encode()
    handler.send_response(200)
    handler.send_header('Content-Type', 'application/json')
    handler.send_header('Content-Length', str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
