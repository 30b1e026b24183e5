""" A tiny in-memory stand-in for the Hugging Face Hub, for push / download tests without network

Not the Hub: a `http.server` on 127.0.0.1, run in a thread, that speaks only the routes huggingface_hub uses to
create a repo, commit small files and download them (checked against huggingface_hub 2.x):

    POST /api/repos/create                              create_repo (idempotent)
    POST /api/validate-yaml                             README.md metadata check (always valid)
    POST /api/models/{org}/{name}/preupload/{rev}       every file is 'regular' (inline in the commit, no LFS/Xet)
    POST /api/models/{org}/{name}/commit/{rev}          NDJSON: header + base64 'file' lines
    HEAD|GET /{org}/{name}/resolve/{rev}/{path}         hf_hub_download (X-Repo-Commit, ETag, Content-Length)

Point huggingface_hub at it with `HF_ENDPOINT=<endpoint.url>` before importing huggingface_hub.
"""
import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional
from urllib.parse import unquote, urlsplit

__all__ = ['LocalHubEndpoint']


class _Repo:
    def __init__(self):
        self.files: Dict[str, bytes] = {}
        self.commits: List[str] = []

    @property
    def head(self) -> str:
        return self.commits[-1] if self.commits else '0' * 40


class LocalHubEndpoint:
    """Context manager running the stand-in Hub; `url` is its endpoint, `repos` its content, `requests` a log."""

    def __init__(self):
        self.repos: Dict[str, _Repo] = {}
        self.requests: List[str] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
                      content_type: str = 'application/json') -> None:
                self.send_response(status)
                self.send_header('Content-Type', content_type)
                self.send_header('Content-Length', str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != 'HEAD':
                    self.wfile.write(body)

            def _json(self, status: int, payload: dict) -> None:
                self._send(status, json.dumps(payload).encode())

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get('Content-Length') or 0))

            def do_POST(self):
                path = unquote(urlsplit(self.path).path)
                endpoint.requests.append(f'POST {path}')
                body = self._body()
                if path == '/api/repos/create':
                    req = json.loads(body)
                    repo_id = f'{req["organization"]}/{req["name"]}' if req.get('organization') else req['name']
                    endpoint.repos.setdefault(repo_id, _Repo())
                    return self._json(200, {'url': f'{endpoint.url}/{repo_id}', 'name': repo_id})
                if path == '/api/validate-yaml':
                    return self._json(200, {})
                m = re.fullmatch(r'/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)', path)
                if not m or m.group(1) not in endpoint.repos:
                    return self._json(404, {'error': 'Repository not found'})
                repo = endpoint.repos[m.group(1)]
                if m.group(2) == 'preupload':
                    files = json.loads(body)['files']
                    return self._json(200, {'files': [
                        {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False} for f in files]})
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item['key'] == 'file':
                        repo.files[item['value']['path']] = base64.b64decode(item['value']['content'])
                    elif item['key'] == 'deletedFile':
                        repo.files.pop(item['value']['path'], None)
                    elif item['key'] != 'header':
                        return self._json(400, {'error': f'unsupported commit entry {item["key"]}'})
                digest = hashlib.sha1(repr(sorted(repo.files.items())).encode()).hexdigest()
                repo.commits.append(digest)
                return self._json(200, {'commitUrl': f'{endpoint.url}/{m.group(1)}/commit/{digest}',
                                        'commitOid': digest})

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                path = unquote(urlsplit(self.path).path)
                endpoint.requests.append(f'{self.command} {path}')
                m = re.fullmatch(r'/([^/]+/[^/]+)/resolve/([^/]+)/(.+)', path)
                if not m:
                    return self._json(404, {'error': 'not found'})
                repo = endpoint.repos.get(m.group(1))
                if repo is None:
                    return self._send(404, b'{}', {'X-Error-Code': 'RepoNotFound'})
                data = repo.files.get(m.group(3))
                if data is None:
                    return self._send(404, b'{}', {'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': repo.head})
                etag = hashlib.sha256(data).hexdigest()
                self._send(200, data, {'X-Repo-Commit': repo.head, 'ETag': f'"{etag}"'}, 'application/octet-stream')

        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self._server.server_address[1]}'
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> 'LocalHubEndpoint':
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
